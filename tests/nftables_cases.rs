//! nftables mode on cases the kube-proxy vectors do not cover (IPv6, UDP/SCTP, traffic
//! policies with local endpoints, masquerade-all, match-all NodePorts, long names, dual-stack).
//! Expected lines are written from the spec (§5, §5A, §8), not taken from kproxy's output; chain
//! name hashes are recomputed here from §5.6.

mod common;

use data_encoding::BASE32;
use kproxy::config::{NodeConfig, NodePortAddresses};
use kproxy::family::FamilyMode;
use kproxy::pipeline;
use kproxy::source::Manifests;
use sha2::{Digest, Sha256};

use common::nftables_consistency;

/// `HASH8-name` of §5.6, computed independently of kproxy's names module.
fn base(name: &str) -> String {
    let hash = BASE32.encode(&Sha256::digest(name.as_bytes()));
    format!("{}-{name}", &hash[..8])
}

fn render(config: &NodeConfig, yaml: &str) -> String {
    let mut manifests = Manifests::default();
    manifests.add_text(yaml, "case").expect("case parses");
    let plan = pipeline::plan(&manifests.state, config);
    assert!(plan.notes.is_empty(), "{:?}", plan.notes);
    let script: String = pipeline::nftables_rulesets(&plan, config)
        .iter()
        .map(|r| r.to_nft_script())
        .collect();
    let problems = nftables_consistency(&script);
    assert!(problems.is_empty(), "{problems:#?}\n{script}");
    script
}

#[track_caller]
fn assert_has(script: &str, line: &str) {
    assert!(
        script.lines().any(|l| l == line),
        "missing line\n  {line}\nin\n{script}"
    );
}

#[track_caller]
fn assert_lacks(script: &str, fragment: &str) {
    assert!(
        !script.contains(fragment),
        "unexpected {fragment:?} in\n{script}"
    );
}

/// The rules of one chain, in order, without the `add rule ip kube-proxy CHAIN ` prefix.
fn rules_of<'a>(script: &'a str, family: &str, chain: &str) -> Vec<&'a str> {
    let prefix = format!("add rule {family} kube-proxy {chain} ");
    script
        .lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .collect()
}

fn service(name: &str, spec: &str) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns}}\nspec:\n{spec}\n---\n")
}

/// An EndpointSlice of `ns/<service>` with one port and `(ip, nodeName)` endpoints.
fn slice(service: &str, family: &str, port: &str, endpoints: &[(&str, &str)]) -> String {
    let mut text = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-1\n  namespace: ns\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: {family}\nports: [{port}]\nendpoints:\n"
    );
    for (ip, node) in endpoints {
        text.push_str(&format!("- {{addresses: [\"{ip}\"], nodeName: {node}}}\n"));
    }
    text.push_str("---\n");
    text
}

fn v4_config() -> NodeConfig {
    let mut config = NodeConfig::new("this-node");
    config.node_ips = vec!["192.168.0.2".parse().unwrap()];
    config.cluster_cidrs = vec!["10.244.0.0/16".parse().unwrap()];
    config
}

fn v6_config() -> NodeConfig {
    let mut config = NodeConfig::new("this-node");
    config.family_mode = FamilyMode::V6;
    config.node_ips = vec!["2001:db8::2".parse().unwrap()];
    config.cluster_cidrs = vec!["fd00:10:244::/64".parse().unwrap()];
    config.service_cidrs = vec!["fd00:10:96::/112".parse().unwrap()];
    config
}

#[test]
fn ipv6_udp_service_uses_ip6_table_and_forms() {
    let yaml = service(
        "dns",
        "  clusterIP: fd00:10:96::a\n  clusterIPs: [fd00:10:96::a]\n  ipFamilies: [IPv6]\n  ports: [{name: dns, protocol: UDP, port: 53}]",
    ) + &slice(
        "dns",
        "IPv6",
        "{name: dns, protocol: UDP, port: 5353}",
        &[("fd00:10:244::2", "other-node"), ("fd00:10:244::1", "this-node")],
    );
    let script = render(&v6_config(), &yaml);
    let chain = format!("service-{}", base("ns/dns/udp/dns"));
    for line in [
        "add table ip6 kube-proxy { comment \"rules for kube-proxy\" ; }".to_string(),
        "add set ip6 kube-proxy hairpin-connections { type ipv6_addr . ipv6_addr . inet_proto . inet_service ; comment \"service hairpin connections\" ; }".into(),
        "add set ip6 kube-proxy cluster-ips { type ipv6_addr ; comment \"Active ClusterIPs\" ; }".into(),
        "add map ip6 kube-proxy service-ips { type ipv6_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }".into(),
        "add rule ip6 kube-proxy masquerading ct status dnat ip6 saddr . ip6 daddr . meta l4proto . th dport @hairpin-connections masquerade fully-random".into(),
        "add rule ip6 kube-proxy cluster-ips-check ip6 daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"".into(),
        "add rule ip6 kube-proxy cluster-ips-check ip6 daddr { fd00:10:96::/112 } drop comment \"Drop traffic to unallocated ClusterIPs\"".into(),
        "add rule ip6 kube-proxy services ip6 daddr @cluster-ips ip6 saddr != fd00:10:244::/64 mark set mark or 0x00004000 comment \"masquerade clusterIP traffic from outside cluster\"".into(),
        "add rule ip6 kube-proxy services ip6 daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports".into(),
        "add element ip6 kube-proxy nodeport-ips { 2001:db8::2 }".into(),
        "add element ip6 kube-proxy cluster-ips { fd00:10:96::a }".into(),
        format!("add element ip6 kube-proxy service-ips {{ fd00:10:96::a . udp . 53 : goto {chain} }}"),
        // Sorted by endpoint string; the slice's port, not the service port, is the target.
        format!("add rule ip6 kube-proxy {chain} meta l4proto udp dnat ip6 addr . port to numgen random mod 2 map {{ 0 : fd00:10:244::1 . 5353 , 1 : fd00:10:244::2 . 5353 }}"),
        "add element ip6 kube-proxy hairpin-connections { fd00:10:244::1 . fd00:10:244::1 . udp . 5353 }".into(),
    ] {
        assert_has(&script, &line);
    }
    assert_lacks(&script, " ip kube-proxy");
    assert_lacks(&script, "ipv4_addr");
    assert_lacks(&script, "fd00:10:244::2 . fd00:10:244::2");
}

#[test]
fn ipv6_affinity_and_match_all_nodeports() {
    let mut config = v6_config();
    config.nodeport_addresses = Some(NodePortAddresses::Cidrs(vec!["::/0".parse().unwrap()]));
    let yaml = service(
        "web",
        "  type: NodePort\n  clusterIP: fd00:10:96::b\n  ipFamilies: [IPv6]\n  ports: [{name: http, protocol: TCP, port: 80, nodePort: 30080}]\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}",
    ) + &slice(
        "web",
        "IPv6",
        "{name: http, protocol: TCP, port: 8080}",
        &[("fd00:10:244::1", "other-node")],
    );
    let script = render(&config, &yaml);
    let port = base("ns/web/tcp/http");
    let endpoint = base("ns/web/tcp/http__fd00.10.244..1/8080");
    let (service_chain, external) = (format!("service-{port}"), format!("external-{port}"));
    let (endpoint_chain, affinity) = (
        format!("endpoint-{endpoint}"),
        format!("affinity-{endpoint}"),
    );
    assert_has(
        &script,
        &format!("add set ip6 kube-proxy {affinity} {{ type ipv6_addr ; flags dynamic,timeout ; timeout 60s ; }}"),
    );
    assert_eq!(
        rules_of(&script, "ip6", &service_chain),
        vec![
            format!("ip6 saddr @{affinity} goto {endpoint_chain}"),
            format!("numgen random mod 1 vmap {{ 0 : goto {endpoint_chain} }}"),
        ]
    );
    assert_eq!(
        rules_of(&script, "ip6", &endpoint_chain),
        vec![
            format!("update @{affinity} {{ ip6 saddr }}"),
            "meta l4proto tcp dnat to [fd00:10:244::1]:8080".to_string(),
        ]
    );
    assert_eq!(
        rules_of(&script, "ip6", &external),
        vec![
            "mark set mark or 0x00004000 comment \"masquerade\"".to_string(),
            format!("goto {service_chain}"),
        ]
    );
    // Every local address accepts NodePorts: no nodeport-ips set, loopback excluded instead.
    assert_eq!(
        rules_of(&script, "ip6", "nodeport-endpoints-check"),
        vec!["ip6 daddr != ::1 meta l4proto . th dport vmap @no-endpoint-nodeports"]
    );
    assert_eq!(
        rules_of(&script, "ip6", "services")[2],
        "fib daddr type local ip6 daddr != ::1 meta l4proto . th dport vmap @service-nodeports"
    );
    assert_lacks(&script, "nodeport-ips");
    assert_has(
        &script,
        &format!(
            "add element ip6 kube-proxy service-nodeports {{ tcp . 30080 : goto {external} }}"
        ),
    );
}

#[test]
fn masquerade_all_and_no_detector() {
    let yaml = service(
        "a",
        "  clusterIP: 10.96.0.10\n  ports: [{name: p, protocol: SCTP, port: 9}]",
    ) + &slice(
        "a",
        "IPv4",
        "{name: p, protocol: SCTP, port: 9}",
        &[("10.244.1.1", "n1")],
    );
    let mut config = v4_config();
    config.masquerade_all = true;
    let script = render(&config, &yaml);
    assert_eq!(
        rules_of(&script, "ip", "services")[0],
        "ip daddr @cluster-ips mark set mark or 0x00004000 comment \"masquerade all clusterIP traffic\""
    );
    let chain = format!("service-{}", base("ns/a/sctp/p"));
    assert_eq!(
        rules_of(&script, "ip", &chain),
        vec!["meta l4proto sctp dnat ip addr . port to numgen random mod 1 map { 0 : 10.244.1.1 . 9 }"]
    );
    assert_has(
        &script,
        &format!(
            "add element ip kube-proxy service-ips {{ 10.96.0.10 . sctp . 9 : goto {chain} }}"
        ),
    );

    // Neither masquerade-all nor a pod CIDR: `services` only dispatches.
    let mut config = v4_config();
    config.cluster_cidrs.clear();
    let script = render(&config, &yaml);
    assert_eq!(
        rules_of(&script, "ip", "services"),
        vec![
            "ip daddr . meta l4proto . th dport vmap @service-ips",
            "ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
        ]
    );
    // No ServiceCIDR known: only the reject rule.
    assert_eq!(rules_of(&script, "ip", "cluster-ips-check").len(), 1);
}

#[test]
fn external_policy_local_with_local_endpoint() {
    let yaml = service(
        "lb",
        "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  clusterIP: 10.96.0.20\n  ports: [{name: p, protocol: TCP, port: 80, nodePort: 30001}]\n  loadBalancerSourceRanges: [192.168.0.0/16, 10.1.0.0/16]\nstatus: {loadBalancer: {ingress: [{ip: 5.6.7.8}]}}",
    ) + &slice(
        "lb",
        "IPv4",
        "{name: p, protocol: TCP, port: 8080}",
        &[("10.244.1.1", "this-node"), ("10.244.2.1", "other-node")],
    );
    let script = render(&v4_config(), &yaml);
    let port = base("ns/lb/tcp/p");
    let (service_chain, local, external, firewall) = (
        format!("service-{port}"),
        format!("local-{port}"),
        format!("external-{port}"),
        format!("firewall-{port}"),
    );
    assert_eq!(
        rules_of(&script, "ip", &external),
        vec![
            format!(
                "ip saddr 10.244.0.0/16 goto {service_chain} comment \"short-circuit pod traffic\""
            ),
            "fib saddr type local mark set mark or 0x00004000 comment \"masquerade local traffic\""
                .to_string(),
            format!(
                "fib saddr type local goto {service_chain} comment \"short-circuit local traffic\""
            ),
            format!("goto {local}"),
        ]
    );
    assert_eq!(
        rules_of(&script, "ip", &local),
        vec!["meta l4proto tcp dnat ip addr . port to numgen random mod 1 map { 0 : 10.244.1.1 . 8080 }"]
    );
    assert_eq!(
        rules_of(&script, "ip", &service_chain),
        vec!["meta l4proto tcp dnat ip addr . port to numgen random mod 2 map { 0 : 10.244.1.1 . 8080 , 1 : 10.244.2.1 . 8080 }"]
    );
    // The node IP 192.168.0.2 is inside a source range, so the LB IP is allowed as a source.
    assert_eq!(
        rules_of(&script, "ip", &firewall),
        vec!["ip saddr != { 192.168.0.0/16 , 10.1.0.0/16 , 5.6.7.8 } drop"]
    );
    for line in [
        format!("add element ip kube-proxy service-ips {{ 10.96.0.20 . tcp . 80 : goto {service_chain} }}"),
        format!("add element ip kube-proxy service-ips {{ 5.6.7.8 . tcp . 80 : goto {external} }}"),
        format!("add element ip kube-proxy firewall-ips {{ 5.6.7.8 . tcp . 80 : goto {firewall} }}"),
        format!("add element ip kube-proxy service-nodeports {{ tcp . 30001 : goto {external} }}"),
        "add element ip kube-proxy hairpin-connections { 10.244.1.1 . 10.244.1.1 . tcp . 8080 }".to_string(),
    ] {
        assert_has(&script, &line);
    }
    assert_lacks(&script, "add element ip kube-proxy no-endpoint-");
    assert_lacks(&script, "10.244.2.1 . 10.244.2.1");
}

#[test]
fn internal_policy_local() {
    let yaml = service(
        "local",
        "  clusterIP: 10.96.0.30\n  internalTrafficPolicy: Local\n  ports: [{name: p, protocol: TCP, port: 80}]",
    ) + &slice(
        "local",
        "IPv4",
        "{name: p, protocol: TCP, port: 80}",
        &[("10.244.1.1", "this-node"), ("10.244.2.1", "other-node")],
    ) + &service(
        "nolocal",
        "  clusterIP: 10.96.0.31\n  internalTrafficPolicy: Local\n  ports: [{name: p, protocol: UDP, port: 53}]",
    ) + &slice(
        "nolocal",
        "IPv4",
        "{name: p, protocol: UDP, port: 53}",
        &[("10.244.2.2", "other-node")],
    );
    let script = render(&v4_config(), &yaml);
    let local = format!("local-{}", base("ns/local/tcp/p"));
    assert_has(
        &script,
        &format!(
            "add element ip kube-proxy service-ips {{ 10.96.0.30 . tcp . 80 : goto {local} }}"
        ),
    );
    assert_eq!(
        rules_of(&script, "ip", &local),
        vec!["meta l4proto tcp dnat ip addr . port to numgen random mod 1 map { 0 : 10.244.1.1 . 80 }"]
    );
    // Cluster endpoints are unused: no service chain for either port.
    assert_lacks(&script, &format!("service-{}", base("ns/local/tcp/p")));
    assert_lacks(&script, &format!("service-{}", base("ns/nolocal/udp/p")));
    assert_has(
        &script,
        "add element ip kube-proxy no-endpoint-services { 10.96.0.31 . udp . 53 comment \"ns/nolocal:p\" : drop }",
    );
    assert_has(
        &script,
        "add element ip kube-proxy cluster-ips { 10.96.0.31 }",
    );
}

#[test]
fn several_service_cidrs_are_joined_tightly() {
    let mut config = v4_config();
    config.service_cidrs = vec![
        "10.96.0.0/16".parse().unwrap(),
        "fd00::/108".parse().unwrap(),
        "10.97.0.0/16".parse().unwrap(),
    ];
    let script = render(&config, "");
    assert_eq!(
        rules_of(&script, "ip", "cluster-ips-check")[1],
        "ip daddr { 10.96.0.0/16,10.97.0.0/16 } drop comment \"Drop traffic to unallocated ClusterIPs\""
    );
}

#[test]
fn long_comments_are_cut_to_128_bytes() {
    let ns = "n".repeat(63);
    let name = "s".repeat(63);
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  clusterIP: 10.96.0.40\n  ports: [{{name: pppp, protocol: TCP, port: 80}}]\n"
    );
    let script = render(&v4_config(), &yaml);
    let spn = format!("{ns}/{name}:pppp");
    assert_eq!(spn.len(), 132);
    assert_has(
        &script,
        &format!(
            "add element ip kube-proxy no-endpoint-services {{ 10.96.0.40 . tcp . 80 comment \"{}\" : goto reject-chain }}",
            &spn[..128]
        ),
    );
}

#[test]
fn dual_stack_renders_both_tables() {
    let yaml = service(
        "dual",
        "  clusterIP: 10.96.0.50\n  clusterIPs: [10.96.0.50, fd00:10:96::50]\n  ipFamilies: [IPv4, IPv6]\n  ports: [{name: p, protocol: TCP, port: 80}]",
    ) + &slice(
        "dual",
        "IPv4",
        "{name: p, protocol: TCP, port: 80}",
        &[("10.244.1.1", "n1")],
    ) + &slice(
        "dual-v6",
        "IPv6",
        "{name: p, protocol: TCP, port: 80}",
        &[("fd00:10:244::1", "n1")],
    )
    .replace("service-name: dual-v6", "service-name: dual");
    let mut config = v4_config();
    config.family_mode = FamilyMode::Dual;
    config.node_ips.push("2001:db8::2".parse().unwrap());
    config
        .cluster_cidrs
        .push("fd00:10:244::/64".parse().unwrap());
    let script = render(&config, &yaml);
    let chain = format!("service-{}", base("ns/dual/tcp/p"));
    let v4_table = script.find("add table ip kube-proxy").expect("ip table");
    let v6_table = script.find("add table ip6 kube-proxy").expect("ip6 table");
    assert!(v4_table < v6_table);
    assert_has(
        &script,
        &format!("add rule ip kube-proxy {chain} meta l4proto tcp dnat ip addr . port to numgen random mod 1 map {{ 0 : 10.244.1.1 . 80 }}"),
    );
    assert_has(
        &script,
        &format!("add rule ip6 kube-proxy {chain} meta l4proto tcp dnat ip6 addr . port to numgen random mod 1 map {{ 0 : fd00:10:244::1 . 80 }}"),
    );
    assert_has(
        &script,
        "add element ip6 kube-proxy nodeport-ips { 2001:db8::2 }",
    );
    assert_has(
        &script,
        "add element ip kube-proxy nodeport-ips { 192.168.0.2 }",
    );
}

/// Same input in another order, same output: nothing depends on input or hash-map order.
#[test]
fn output_is_deterministic() {
    let a = service(
        "a",
        "  clusterIP: 10.96.0.1\n  ports: [{name: p, protocol: TCP, port: 80}]",
    ) + &slice(
        "a",
        "IPv4",
        "{name: p, protocol: TCP, port: 80}",
        &[
            ("10.244.0.10", "this-node"),
            ("10.244.0.9", "x"),
            ("10.244.0.2", "y"),
        ],
    );
    let b = service("b", "  clusterIP: 10.96.0.2\n  ports: [{name: q, protocol: UDP, port: 53}]\n  sessionAffinity: ClientIP")
        + &slice(
            "b",
            "IPv4",
            "{name: q, protocol: UDP, port: 53}",
            &[("10.244.0.3", "this-node"), ("10.244.0.4", "x")],
        );
    let config = v4_config();
    let first = render(&config, &(a.clone() + &b));
    assert_eq!(first, render(&config, &(b + &a)));
    // Byte-wise endpoint-string order (§2.4): "10.244.0.10" sorts before "10.244.0.2".
    assert!(
        first.contains("map { 0 : 10.244.0.10 . 80 , 1 : 10.244.0.2 . 80 , 2 : 10.244.0.9 . 80 }")
    );
    // The API default timeout applies when the Service gives none (§2.3).
    assert!(first.contains("timeout 10800s ;"));
}
