//! `kproxy cleanup` and `kproxy run --cleanup` against the real kernel, in network
//! namespaces: all of kproxy's rules go or none (a user rule jumping to one of kproxy's
//! chains stops it before anything is removed, and is named), without `--mode` both modes are
//! cleaned, and stderr says what was removed.

mod common;

use common::netns::{kernel_tests_possible, Netns};

const TOOLS: [&str; 4] = [
    "iptables-nft-save",
    "iptables-nft-restore",
    "ip6tables-nft-save",
    "nft",
];

const MANIFEST: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, protocol: TCP, port: 8080}]
endpoints:
- addresses: ["10.244.1.2"]
  conditions: {ready: true}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  clusterIP: 10.96.0.11
  selector: {app: empty}
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]
"#;

fn kproxy(ns: &Netns, args: &[&str]) -> (Option<i32>, String) {
    let mut argv = vec![env!("CARGO_BIN_EXE_kproxy")];
    argv.extend_from_slice(args);
    let out = ns.run(&argv, None);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn sync(ns: &Netns, mode: &str) {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), MANIFEST).expect("write manifest");
    let path = file.path().to_str().expect("utf-8 path");
    let (code, stderr) = kproxy(
        ns,
        &[
            "sync",
            "--once",
            "--mode",
            mode,
            "--hostname",
            "node-1",
            "--node-ip",
            "192.0.2.10",
            path,
        ],
    );
    assert_eq!(code, Some(0), "{stderr}");
}

fn must(ns: &Netns, argv: &[&str]) -> String {
    let out = ns.run(argv, None);
    assert!(
        out.status.success(),
        "{}: {}",
        argv.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Both families' iptables chains and rules (nft backend), without comments, counters, table
/// headers and built-in chains (the tools create empty tables on first look).
fn iptables_state(ns: &Netns) -> Vec<String> {
    ["iptables-nft-save", "ip6tables-nft-save"]
        .iter()
        .flat_map(|tool| {
            must(ns, &[tool])
                .lines()
                .filter(|l| {
                    let noise = l.starts_with('#') || l.starts_with('*') || *l == "COMMIT";
                    let builtin_chain = l.starts_with(':') && l.contains(" ACCEPT");
                    !noise && !builtin_chain
                })
                .map(|l| match l.find(" [") {
                    Some(i) if l.starts_with(':') => l[..i].to_string(),
                    _ => l.to_string(),
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn kube_lines(state: &[String]) -> Vec<&String> {
    state.iter().filter(|l| l.contains("KUBE-")).collect()
}

fn nft_tables(ns: &Netns) -> String {
    must(ns, &["nft", "list", "tables"])
}

const USER_RULES: [&[&str]; 2] = [
    &[
        "iptables",
        "-t",
        "filter",
        "-A",
        "FORWARD",
        "-j",
        "KUBE-FIREWALL",
    ],
    &[
        "iptables",
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-s",
        "192.0.2.9",
        "-j",
        "KUBE-MARK-MASQ",
    ],
];

#[test]
fn a_user_rule_holding_a_kproxy_chain_stops_the_cleanup_before_anything_is_removed() {
    if !kernel_tests_possible(&TOOLS) {
        return;
    }
    let ns = Netns::new("cleanup-held");
    sync(&ns, "iptables");
    sync(&ns, "nftables");
    for rule in USER_RULES {
        must(&ns, rule);
    }
    let before = iptables_state(&ns);
    let tables_before = nft_tables(&ns);
    assert!(tables_before.contains("kube-proxy"));

    for args in [&["cleanup"][..], &["cleanup", "--mode", "iptables"][..]] {
        let (code, stderr) = kproxy(&ns, args);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("-t filter -A FORWARD -j KUBE-FIREWALL"),
            "{args:?}: the filter rule is not named: {stderr}"
        );
        assert!(
            stderr.contains("-t nat -A PREROUTING -s 192.0.2.9/32 -j KUBE-MARK-MASQ"),
            "{args:?}: the nat rule is not named: {stderr}"
        );
        assert!(stderr.contains("nothing was removed"), "{stderr}");
        assert_eq!(
            iptables_state(&ns),
            before,
            "{args:?}: a refused cleanup changed the rules"
        );
        assert_eq!(nft_tables(&ns), tables_before, "{args:?}");
    }
    // `run --cleanup` takes the same path.
    let (code, stderr) = kproxy(&ns, &["run", "--cleanup", "--hostname", "node-1"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("-A FORWARD -j KUBE-FIREWALL"), "{stderr}");
    assert_eq!(iptables_state(&ns), before);

    // Without the user's rules, everything of kproxy's goes, the user's chains stay.
    for rule in USER_RULES {
        let mut delete: Vec<&str> = rule.to_vec();
        delete[3] = "-D";
        must(&ns, &delete);
    }
    let (code, stderr) = kproxy(&ns, &["cleanup", "--mode", "iptables"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("removed iptables-nft IPv4: ") && stderr.contains("14 jump rules"),
        "{stderr}"
    );
    let after = iptables_state(&ns);
    assert!(kube_lines(&after).is_empty(), "{:#?}", kube_lines(&after));
    // --mode iptables leaves nftables alone.
    assert!(nft_tables(&ns).contains("kube-proxy"));
}

#[test]
fn cleanup_without_mode_removes_both_modes_and_says_what() {
    if !kernel_tests_possible(&TOOLS) {
        return;
    }
    let ns = Netns::new("cleanup-both");
    must(&ns, &["iptables", "-N", "USER-CHAIN"]);
    must(
        &ns,
        &[
            "iptables",
            "-A",
            "INPUT",
            "-s",
            "192.0.2.2",
            "-j",
            "USER-CHAIN",
        ],
    );
    let user = iptables_state(&ns);
    sync(&ns, "iptables");
    sync(&ns, "nftables");
    // A second copy of a jump rule, as two writers at once used to leave: it goes too.
    must(
        &ns,
        &[
            "iptables",
            "-t",
            "nat",
            "-I",
            "PREROUTING",
            "-m",
            "comment",
            "--comment",
            "kubernetes service portals",
            "-j",
            "KUBE-SERVICES",
        ],
    );
    let (code, stderr) = kproxy(&ns, &["cleanup"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("removed iptables-nft IPv4: "), "{stderr}");
    assert!(stderr.contains("15 jump rules"), "{stderr}");
    assert!(stderr.contains("nftables: table ip kube-proxy"), "{stderr}");
    assert_eq!(
        iptables_state(&ns),
        user,
        "cleanup left kproxy's rules or took the user's"
    );
    assert!(!nft_tables(&ns).contains("kube-proxy"));

    let (code, stderr) = kproxy(&ns, &["cleanup"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("nothing to remove"), "{stderr}");

    // `run --cleanup` cleans both modes too, whatever its --mode.
    sync(&ns, "iptables");
    sync(&ns, "nftables");
    let (code, stderr) = kproxy(
        &ns,
        &[
            "run",
            "--cleanup",
            "--mode",
            "nftables",
            "--hostname",
            "node-1",
        ],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("removed iptables-nft IPv4: "), "{stderr}");
    assert!(stderr.contains("nftables: table ip kube-proxy"), "{stderr}");
    assert_eq!(iptables_state(&ns), user);
    assert!(!nft_tables(&ns).contains("kube-proxy"));
}
