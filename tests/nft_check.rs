//! The kernel accepts kproxy's nftables output as printed: `nft -c -f` (check) and then a real
//! `nft -f`, each in a fresh network namespace, for the example (through the `kproxy` binary),
//! an IPv6 and a dual-stack case, every golden case and every `-edca5633` conformance input.
//!
//! Needs root and `nft`. Without them the tests print why and pass, unless
//! `KPROXY_REQUIRE_KERNEL_TESTS=1`, which turns that into a failure.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::netns::{kernel_tests_possible, Netns};

use kproxy::config::NodeConfig;
use kproxy::family::FamilyMode;
use kproxy::pipeline;
use kproxy::source::Manifests;

/// Whether the kernel test can run (root, `ip`, `nft`); panics instead when required.
fn possible() -> bool {
    kernel_tests_possible(&["nft"])
}

/// Checks, then loads, the script in a fresh namespace and returns `nft list ruleset`, or what
/// nft said when it refused.
fn try_load(script: &str) -> Result<String, String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("ruleset.nft");
    fs::write(&file, script).expect("write script");
    let file = file.to_string_lossy().to_string();
    let ns = Netns::new("nft");
    for args in [vec!["nft", "-c", "-f", &file], vec!["nft", "-f", &file]] {
        let out = ns.run(&args, None);
        if !out.status.success() {
            return Err(format!(
                "`{}` refused it:\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    let out = ns.run(&["nft", "list", "ruleset"], None);
    if !out.status.success() {
        return Err("nft list ruleset failed".into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

fn load(script: &str, what: &str) -> String {
    try_load(script).unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn render(config: &NodeConfig, input: &Path) -> String {
    let manifests = Manifests::read_paths(&[input]).expect("input reads");
    let plan = pipeline::plan(&manifests.state, config);
    pipeline::nftables_rulesets(&plan, config)
        .iter()
        .map(|r| r.to_nft_script())
        .collect()
}

#[test]
fn example_from_the_cli_loads() {
    if !possible() {
        return;
    }
    let example = common::repo_dir().join("examples/my-service.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_kproxy"))
        .args([
            "render",
            "--mode",
            "nftables",
            "--hostname",
            "node-1",
            "--node-ip",
            "192.168.0.2",
            "--cluster-cidr",
            "10.244.0.0/16",
            "--service-cidr",
            "172.30.0.0/16",
        ])
        .arg(&example)
        .output()
        .expect("kproxy runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script = String::from_utf8(out.stdout).expect("utf-8");
    let listing = load(&script, "examples/my-service.yaml");
    // What the kernel holds: the affinity sets with their timeout, the service dispatch.
    assert!(listing.contains("table ip kube-proxy"), "{listing}");
    assert!(
        listing.contains("set affinity-XEPWXLQR-default/my-service/tcp/http__10.244.1.5/80"),
        "{listing}"
    );
    assert!(listing.contains("flags dynamic,timeout"), "{listing}");
    assert!(
        listing
            .contains("172.30.0.41 . tcp . 80 : goto service-6NGMIUMF-default/my-service/tcp/http"),
        "{listing}"
    );
}

#[test]
fn ipv6_and_dual_stack_load() {
    if !possible() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("dual.yaml");
    fs::write(
        &input,
        r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: ns}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  clusterIP: 10.96.0.50
  clusterIPs: [10.96.0.50, fd00:10:96::50]
  ipFamilies: [IPv4, IPv6]
  ports:
  - {name: http, protocol: TCP, port: 80, nodePort: 30080}
  - {name: dns, protocol: UDP, port: 53, nodePort: 30053}
  - {name: sctp, protocol: SCTP, port: 9}
  loadBalancerSourceRanges: [203.0.113.0/24, "2001:db8:1::/64"]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
status:
  loadBalancer:
    ingress: [{ip: 5.6.7.8}, {ip: "2001:db8:2::8"}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, namespace: ns, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports:
- {name: http, protocol: TCP, port: 8080}
- {name: dns, protocol: UDP, port: 5353}
- {name: sctp, protocol: SCTP, port: 9}
endpoints:
- {addresses: ["fd00:10:244::1"], nodeName: this-node}
- {addresses: ["fd00:10:244::2"], nodeName: other-node}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: ns}
spec:
  clusterIP: 10.96.0.51
  clusterIPs: [10.96.0.51, fd00:10:96::51]
  ipFamilies: [IPv4, IPv6]
  ports: [{name: p, protocol: TCP, port: 80}]
"#,
    )
    .expect("write input");

    let mut config = NodeConfig::new("this-node");
    config.family_mode = FamilyMode::V6;
    config.node_ips = vec!["2001:db8::2".parse().unwrap()];
    config.cluster_cidrs = vec!["fd00:10:244::/64".parse().unwrap()];
    config.service_cidrs = vec!["fd00:10:96::/112".parse().unwrap()];
    let listing = load(&render(&config, &input), "IPv6 case");
    assert!(listing.contains("table ip6 kube-proxy"), "{listing}");
    assert!(!listing.contains("table ip kube-proxy"), "{listing}");

    config.family_mode = FamilyMode::Dual;
    config.node_ips.push("192.168.0.2".parse().unwrap());
    config.cluster_cidrs.push("10.244.0.0/16".parse().unwrap());
    config.service_cidrs.push("10.96.0.0/16".parse().unwrap());
    let listing = load(&render(&config, &input), "dual-stack case");
    assert!(listing.contains("table ip kube-proxy"), "{listing}");
    assert!(listing.contains("table ip6 kube-proxy"), "{listing}");
}

#[test]
fn conformance_inputs_load() {
    if !possible() {
        return;
    }
    let root = common::shared_dir().join("conformance/kube-proxy");
    let mut checked = 0;
    for entry in fs::read_dir(root).expect("conformance directory") {
        let dir = entry.expect("entry").path();
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        if !(name.starts_with("nftables-") && name.ends_with("-edca5633")) {
            continue;
        }
        let input = if dir.join("input.yaml").is_file() {
            dir.join("input.yaml")
        } else {
            dir.join("input-step01.yaml")
        };
        let mut config = NodeConfig::new("test-node");
        config.node_ips = vec!["192.168.0.2".parse().unwrap()];
        config.cluster_cidrs = vec!["10.0.0.0/8".parse().unwrap()];
        config.service_cidrs = vec!["172.30.0.0/16".parse().unwrap()];
        load(&render(&config, &input), &name);
        checked += 1;
    }
    assert_eq!(checked, 4);
}

/// The check is real: nft refuses a rule that jumps to a chain the script never creates.
/// The nftables constructs the `maps` layout needs (numgen-keyed endpoint maps, a dynamic
/// affinity map with per-element timeouts, `ct original` keys, a negated interval lookup), as
/// kproxy renders them: the kernel takes them.
#[test]
fn maps_layout_constructs_load() {
    if !possible() {
        return;
    }
    let text =
        fs::read_to_string(common::repo_dir().join("tests/data/nft/maps-layout-constructs.nft"))
            .expect("the constructs file");
    let ruleset = kproxy::nftables::Ruleset::from_nft_script(&text).expect("reads");
    let listed = load(&ruleset.to_nft_script(), "maps layout constructs");
    assert!(
        listed.contains("numgen random mod 3 map @cluster-endpoints"),
        "{listed}"
    );
}

#[test]
fn kernel_check_can_fail() {
    if !possible() {
        return;
    }
    let broken = "add table ip kube-proxy\nadd chain ip kube-proxy services\nadd rule ip kube-proxy services goto service-missing\n";
    assert!(try_load(broken).is_err());
    assert!(try_load("add table ip kube-proxy\nadd chain ip kube-proxy services\n").is_ok());
}

#[test]
fn golden_nftables_outputs_load() {
    if !possible() {
        return;
    }
    let root = common::repo_dir().join("rules-golden");
    let mut checked = 0;
    for entry in fs::read_dir(root).expect("rules-golden") {
        let path = entry.expect("entry").path().join("nftables.txt");
        let Ok(script) = fs::read_to_string(&path) else {
            continue;
        };
        let listing = load(&script, &path.display().to_string());
        assert!(listing.contains("kube-proxy"), "{listing}");
        checked += 1;
    }
    assert!(
        checked >= 10,
        "only {checked} golden nftables outputs found"
    );
}

/// Every golden case's input, rendered in the `maps` layout with the case's own flags (through
/// the `kproxy` binary, as tests/golden.rs renders it), is checked and loaded by the kernel.
/// Where this nft cannot write the IPv6 affinity updates (common::nft), a case that has them
/// must be refused, and loads without them.
#[test]
fn golden_inputs_load_in_the_maps_layout() {
    if !possible() {
        return;
    }
    let probe = Netns::new("nft-probe");
    let ipv6_updates = common::nft::writes_ipv6_affinity_updates(&probe);
    drop(probe);
    let root = common::repo_dir().join("rules-golden");
    let mut cases: Vec<_> = fs::read_dir(root)
        .expect("rules-golden")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("input.yaml").is_file())
        .collect();
    cases.sort();
    let mut without_updates = Vec::new();
    for case in &cases {
        let name = case.display().to_string();
        let flags = fs::read_to_string(case.join("flags")).unwrap_or_default();
        let out = Command::new(env!("CARGO_BIN_EXE_kproxy"))
            .args(["render", "--mode", "nftables", "--nftables-layout", "maps"])
            .args(flags.split_whitespace())
            .arg(case.join("input.yaml"))
            .output()
            .expect("kproxy runs");
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let script = String::from_utf8(out.stdout).expect("utf-8");
        let (stripped, updates) = common::nft::without_ipv6_affinity_updates(&script);
        let listing = if ipv6_updates || updates == 0 {
            load(&script, &name)
        } else {
            let refusal = try_load(&script).expect_err("this nft cannot write the updates");
            assert!(refusal.contains("reg_low"), "{name}: {refusal}");
            without_updates.push(name.clone());
            load(&stripped, &name)
        };
        assert!(listing.contains(" kproxy {"), "{listing}");
        assert!(!listing.contains("kube-proxy"), "{listing}");
    }
    assert!(cases.len() >= 10, "only {} golden cases found", cases.len());
    if !without_updates.is_empty() {
        eprintln!(
            "this nft cannot write IPv6 affinity map updates (nft < 1.0.6.1 / 1.1.0); loaded \
             without them: {}",
            without_updates.join(", ")
        );
    }
}

/// Regression: source ranges that nest or repeat (and a load-balancer IP inside a range that
/// holds the node IP) were separate `firewall-allow` elements in the `maps` layout, and the
/// kernel refuses overlapping intervals in a concatenated set ("File exists"). The inner ones
/// are left out; the allowed sources are the same.
#[test]
fn maps_layout_nested_source_ranges_load() {
    if !possible() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("ranges.yaml");
    fs::write(
        &input,
        r#"apiVersion: v1
kind: Service
metadata: {name: lb, namespace: ns}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.50
  ports: [{name: http, protocol: TCP, port: 80, nodePort: 30080}]
  loadBalancerSourceRanges: [203.0.113.200/32, 203.0.113.0/24, 203.0.113.0/24, 192.168.0.0/16, 0.0.0.0/0]
status:
  loadBalancer:
    ingress: [{ip: 192.168.7.7}, {ip: 198.51.100.7}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: lb-1, namespace: ns, labels: {kubernetes.io/service-name: lb}}
addressType: IPv4
ports: [{name: http, protocol: TCP, port: 8080}]
endpoints:
- {addresses: [10.244.1.5], nodeName: other-node}
"#,
    )
    .expect("write input");
    let mut config = NodeConfig::new("this-node");
    config.node_ips = vec!["192.168.0.2".parse().unwrap()];
    config.cluster_cidrs = vec!["10.244.0.0/16".parse().unwrap()];
    config.nftables_layout = kproxy::config::NftablesLayout::Maps;
    let listing = load(&render(&config, &input), "nested source ranges");
    assert!(
        listing.contains("198.51.100.7 . tcp . 80 . 0.0.0.0/0"),
        "{listing}"
    );
    assert!(!listing.contains("203.0.113.0/24"), "{listing}");
}
