//! Bad objects are reported with namespace/name and a reason, skipped, and never take the
//! other services down; no field can inject rule text; no input makes kproxy panic.

use kproxy::config::NodeConfig;
use kproxy::pipeline;
use kproxy::source::{Manifests, Note};
use proptest::prelude::*;

/// A valid Service and slice that must survive whatever else is in the input.
const GOOD: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: good, namespace: default}
spec:
  clusterIP: 10.96.0.1
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: good-1
  namespace: default
  labels: {kubernetes.io/service-name: good}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.0.9]}]
"#;

fn service(name: &str, spec: &str) -> String {
    format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bad}}\nspec:\n{spec}\n")
}

/// Renders GOOD plus `bad`; returns the skip messages and the rules.
fn render_with(bad: &str) -> (Vec<String>, String) {
    let mut manifests = Manifests::default();
    manifests
        .add_text(&format!("{GOOD}{bad}"), "test.yaml")
        .expect("parses");
    let config = NodeConfig::new("node-1");
    let plan = pipeline::plan(&manifests.state, &config);
    let notes = manifests
        .notes
        .iter()
        .chain(&plan.notes)
        .map(Note::to_string)
        .collect();
    let rules = pipeline::iptables_rulesets(&plan, &config)[0].to_restore_text();
    (notes, rules)
}

/// Each bad object yields exactly one message, naming it and the reason, and GOOD still renders.
fn assert_skipped(bad: &str, object: &str, reason: &str) {
    let (notes, rules) = render_with(bad);
    assert_eq!(
        notes.len(),
        1,
        "one message expected for {object}: {notes:?}"
    );
    let expected_start = format!("skipped {object}: ");
    assert!(
        notes[0].starts_with(&expected_start) && notes[0].contains(reason),
        "message {:?} should start with {expected_start:?} and contain {reason:?}",
        notes[0]
    );
    assert!(
        rules.contains("-d 10.96.0.1 --dport 80 -j KUBE-SVC-")
            && rules.contains("--to-destination 10.244.0.9:8080"),
        "the good service must still be rendered:\n{rules}"
    );
    assert!(
        !rules.contains("bad/"),
        "nothing of the bad object may be rendered:\n{rules}"
    );
}

#[test]
fn unparsable_cluster_ip() {
    assert_skipped(
        &service("s", "  clusterIP: 10.0.0.300\n  ports: [{port: 80}]"),
        "Service bad/s",
        "spec.clusterIP \"10.0.0.300\" is not an IP address",
    );
}

#[test]
fn cluster_ip_of_the_wrong_family() {
    assert_skipped(
        &service(
            "s",
            "  clusterIP: 10.0.0.3\n  ipFamilies: [IPv6]\n  ports: [{port: 80}]",
        ),
        "Service bad/s",
        "cluster IP 10.0.0.3 is IPv4 but spec.ipFamilies[0] is \"IPv6\"",
    );
}

#[test]
fn endpoint_address_of_the_wrong_family() {
    let (notes, rules) = render_with(&service_with_endpoints("IPv4", "fd00::1"));
    assert_eq!(
        notes,
        vec![
            "skipped part of EndpointSlice bad/e: endpoints[1].addresses[0] \"fd00::1\" is not an IPv4 address, but the slice's addressType is IPv4; that endpoint is left out"
        ]
    );
    assert!(
        rules.contains("--to-destination 10.244.0.20:8080"),
        "{rules}"
    );
}

#[test]
fn port_out_of_range() {
    assert_skipped(
        &service("s", "  clusterIP: 10.0.0.3\n  ports: [{port: 70000}]"),
        "Service bad/s",
        "spec.ports[0].port 70000 is outside 1..65535",
    );
    assert_skipped(
        &service(
            "s",
            "  clusterIP: 10.0.0.3\n  ports: [{port: 80, nodePort: -1}]",
        ),
        "Service bad/s",
        "spec.ports[0].nodePort -1 is outside 1..65535",
    );
}

#[test]
fn unknown_protocol() {
    assert_skipped(
        &service(
            "s",
            "  clusterIP: 10.0.0.3\n  ports: [{port: 80, protocol: ICMP}]",
        ),
        "Service bad/s",
        "spec.ports[0].protocol \"ICMP\" is unknown",
    );
}

#[test]
fn affinity_timeout_out_of_range() {
    for timeout in ["0", "86401", "-5"] {
        assert_skipped(
            &service(
                "s",
                &format!("  clusterIP: 10.0.0.3\n  ports: [{{port: 80}}]\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {timeout}}}}}"),
            ),
            "Service bad/s",
            &format!("timeoutSeconds {timeout} is outside 1..86400"),
        );
    }
}

#[test]
fn affinity_timeout_defaults_to_10800() {
    let (notes, rules) = render_with(&service(
        "sticky",
        "  clusterIP: 10.0.0.3\n  ports: [{port: 80}]\n  sessionAffinity: ClientIP",
    ));
    assert!(notes.is_empty(), "{notes:?}");
    // No endpoints, so no affinity rules; check the model instead.
    assert!(rules.contains("bad/sticky has no endpoints"));
    let mut manifests = Manifests::default();
    manifests
        .add_text(
            &service(
                "sticky",
                "  clusterIP: 10.0.0.3\n  ports: [{port: 80}]\n  sessionAffinity: ClientIP",
            ),
            "x",
        )
        .unwrap();
    let plan = pipeline::plan(&manifests.state, &NodeConfig::new("n"));
    assert_eq!(plan.models[0].ports[0].affinity_timeout, Some(10800));
}

#[test]
fn duplicate_port_names() {
    assert_skipped(
        &service(
            "s",
            "  clusterIP: 10.0.0.3\n  ports: [{name: web, port: 80}, {name: web, port: 81}]",
        ),
        "Service bad/s",
        "spec.ports[1].name \"web\" is used by more than one port",
    );
}

#[test]
fn slice_without_service_name_label() {
    let slice = "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: e, namespace: bad}\naddressType: IPv4\nendpoints: []\n";
    assert_skipped(
        slice,
        "EndpointSlice bad/e",
        "label kubernetes.io/service-name is missing",
    );
}

#[test]
fn names_the_api_server_would_refuse() {
    assert_skipped(
        &service("Bad_Name", "  clusterIP: 10.0.0.3\n  ports: [{port: 80}]"),
        "Service bad/Bad_Name",
        "metadata.name \"Bad_Name\" is not a valid DNS-1035 label",
    );
    assert_skipped(
        &service(
            "s",
            "  clusterIP: 10.0.0.3\n  ports: [{name: \"web port\", port: 80}]",
        ),
        "Service bad/s",
        "spec.ports[0].name \"web port\" is not a valid DNS-1123 label",
    );
}

#[test]
fn rule_text_cannot_be_injected() {
    // A name that would close the comment quote and add a target.
    assert_skipped(
        &service(
            "'x\" -j ACCEPT #'",
            "  clusterIP: 10.0.0.3\n  ports: [{port: 80}]",
        ),
        "Service bad/x\" -j ACCEPT #",
        "is not a valid DNS-1035 label",
    );
    // An address with extra words.
    assert_skipped(
        &service(
            "s",
            "  clusterIP: 10.0.0.3\n  externalIPs: [\"1.2.3.4 -j ACCEPT\"]\n  ports: [{port: 80}]",
        ),
        "Service bad/s",
        "spec.externalIPs[0] \"1.2.3.4 -j ACCEPT\" is not an IP address",
    );
    assert_skipped(
        &service(
            "s",
            "  type: LoadBalancer\n  clusterIP: 10.0.0.3\n  loadBalancerSourceRanges: [\"0.0.0.0/0\\n-A X\"]\n  ports: [{port: 80}]",
        ),
        "Service bad/s",
        "spec.loadBalancerSourceRanges[0]",
    );
}

#[test]
fn field_of_the_wrong_type() {
    assert_skipped(
        &service("s", "  clusterIP: 10.0.0.3\n  ports: [{port: eighty}]"),
        "Service bad/s",
        "does not match the API schema",
    );
}

#[test]
fn unknown_kinds_are_noted_not_fatal() {
    let (notes, _) =
        render_with("---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n");
    assert_eq!(
        notes,
        vec!["note: test.yaml: ignoring object of kind apps/v1/Deployment"]
    );
}

#[test]
fn headless_and_external_name_services_are_not_proxied_and_not_errors() {
    let (notes, rules) = render_with(&format!(
        "{}{}",
        service("headless", "  clusterIP: None\n  ports: [{port: 80}]"),
        service("ext", "  type: ExternalName\n  externalName: example.com"),
    ));
    assert!(notes.is_empty(), "{notes:?}");
    assert!(!rules.contains("bad/"), "{rules}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever strings land in the fields that reach rule text, kproxy does not panic, and
    /// every rendered line is one of kproxy's own line shapes with no stray quote or newline.
    #[test]
    fn arbitrary_field_values_never_panic_or_inject(
        name in "\\PC{0,20}",
        port_name in "\\PC{0,20}",
        ip in "\\PC{0,20}",
        range in "\\PC{0,20}",
        ep in "\\PC{0,20}",
        port in any::<i32>(),
    ) {
        let esc = |s: &str| serde_json::to_string(s).unwrap();
        let bad = format!(
            "---\n{{\"apiVersion\":\"v1\",\"kind\":\"Service\",\"metadata\":{{\"name\":{},\"namespace\":\"bad\"}},\"spec\":{{\"type\":\"LoadBalancer\",\"clusterIP\":{},\"loadBalancerSourceRanges\":[{}],\"ports\":[{{\"name\":{},\"port\":{port},\"nodePort\":30000}}]}}}}\n---\n{{\"apiVersion\":\"discovery.k8s.io/v1\",\"kind\":\"EndpointSlice\",\"metadata\":{{\"name\":\"e\",\"namespace\":\"bad\",\"labels\":{{\"kubernetes.io/service-name\":{}}}}},\"addressType\":\"IPv4\",\"ports\":[{{\"name\":{},\"port\":{port}}}],\"endpoints\":[{{\"addresses\":[{}]}}]}}\n",
            esc(&name), esc(&ip), esc(&range), esc(&port_name), esc(&name), esc(&port_name), esc(&ep),
        );
        let (_, rules) = render_with(&bad);
        for line in rules.lines() {
            let shape_ok = line.starts_with("-A KUBE-") || line.starts_with(":KUBE-")
                || line.starts_with('*') || line == "COMMIT";
            prop_assert!(shape_ok, "unexpected line {:?}", line);
            prop_assert!(line.matches('"').count() % 2 == 0, "unbalanced quotes in {:?}", line);
        }
    }
}

/// A slice of Service `bad/s` (cluster IP 10.0.0.3, port 80) with one good endpoint
/// (10.244.0.20) after `bad`, and the Service itself.
fn service_with_endpoints(address_type: &str, bad: &str) -> String {
    format!(
        "{}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: e, namespace: bad, labels: {{kubernetes.io/service-name: s}}}}\naddressType: {address_type}\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [\"10.244.0.10\"]}}, {{addresses: [{bad:?}]}}, {{addresses: [\"10.244.0.20\"]}}]\n",
        service("s", "  clusterIP: 10.0.0.3\n  ports: [{port: 80}]"),
    )
}

/// api-validation.md §4.5 and kproxy's own policy: an endpoint address the API server refuses
/// (or that would DNAT to the node itself, the metadata server, a multicast group, ...) is left
/// out, with its field path and class; the slice's other endpoints stay.
#[test]
fn endpoint_addresses_in_refused_classes_are_dropped_alone() {
    for (address, class) in [
        ("127.0.0.1", "a loopback address"),
        ("169.254.169.254", "a link-local address"),
        ("0.0.0.0", "the unspecified address"),
        ("224.0.0.5", "a multicast address"),
        ("239.1.1.1", "a multicast address"),
        ("255.255.255.255", "the broadcast address"),
        ("::ffff:10.244.0.30", "an IPv4-mapped IPv6 address"),
    ] {
        let (notes, rules) = render_with(&service_with_endpoints("IPv4", address));
        assert_eq!(notes.len(), 1, "{address}: {notes:?}");
        let expected = format!(
            "skipped part of EndpointSlice bad/e: endpoints[1].addresses[0] {address:?} is {class}"
        );
        assert!(
            notes[0].starts_with(&expected),
            "{address}: {:?} should start with {expected:?}",
            notes[0]
        );
        assert!(
            rules.contains("--to-destination 10.244.0.10:8080")
                && rules.contains("--to-destination 10.244.0.20:8080"),
            "{address}: the slice's good endpoints must stay:\n{rules}"
        );
        assert!(
            !rules.contains(&format!("{address}:8080")) && !rules.contains("10.244.0.30"),
            "{address} must not be programmed:\n{rules}"
        );
    }
}

#[test]
fn an_unparsable_endpoint_address_drops_only_its_endpoint() {
    let (notes, rules) = render_with(&service_with_endpoints("IPv4", "10.244.0.300"));
    assert_eq!(
        notes,
        vec![
            "skipped part of EndpointSlice bad/e: endpoints[1].addresses[0] \"10.244.0.300\" is not an IP address; that endpoint is left out"
        ]
    );
    assert!(
        rules.contains("--to-destination 10.244.0.20:8080"),
        "{rules}"
    );
}

/// The API server never allocates these (its allocator hands out addresses of the service
/// CIDR); a Service holding one is skipped whole, with the field, the value and the class.
#[test]
fn cluster_ips_in_refused_classes_skip_the_service() {
    for (address, class) in [
        ("127.0.0.53", "a loopback address"),
        ("0.0.0.0", "the unspecified address"),
        ("255.255.255.255", "the broadcast address"),
        ("169.254.0.1", "a link-local address"),
        ("224.0.0.1", "a multicast address"),
        ("::ffff:10.0.0.3", "an IPv4-mapped IPv6 address"),
    ] {
        assert_skipped(
            &service(
                "s",
                &format!("  clusterIP: {address:?}\n  ports: [{{port: 80}}]"),
            ),
            "Service bad/s",
            &format!("spec.clusterIP {address:?} is {class}"),
        );
    }
    assert_skipped(
        &service(
            "s",
            "  clusterIP: 10.0.0.3\n  clusterIPs: [10.0.0.3, \"::1\"]\n  ipFamilyPolicy: PreferDualStack\n  ports: [{port: 80}]",
        ),
        "Service bad/s",
        "spec.clusterIPs[1] \"::1\" is a loopback address",
    );
}

/// The API server refuses a Service with an externalIP of the endpoint-IP classes (§5.7); other
/// classes are kproxy's own policy, so only that address is left out.
#[test]
fn external_ips_refused_by_the_api_server_skip_the_service() {
    for (address, class) in [
        ("127.0.0.1", "a loopback address"),
        ("0.0.0.0", "the unspecified address"),
        ("169.254.169.254", "a link-local address"),
        ("224.0.0.5", "a multicast address"),
    ] {
        assert_skipped(
            &service(
                "s",
                &format!("  clusterIP: 10.0.0.3\n  externalIPs: [192.0.2.1, {address:?}]\n  ports: [{{port: 80}}]"),
            ),
            "Service bad/s",
            &format!("spec.externalIPs[1] {address:?} is {class}"),
        );
    }
}

#[test]
fn external_and_load_balancer_ips_of_kproxys_own_classes_are_dropped_alone() {
    let bad = service(
        "s",
        "  type: LoadBalancer\n  clusterIP: 10.0.0.3\n  externalIPs: [192.0.2.1, 255.255.255.255, 239.1.1.1]\n  ports: [{port: 80, nodePort: 30080}]\nstatus: {loadBalancer: {ingress: [{ip: 127.0.0.1}, {ip: 198.51.100.7}, {ip: \"::ffff:198.51.100.8\"}]}}",
    );
    let (notes, rules) = render_with(&bad);
    let expected = [
        "skipped part of Service bad/s: spec.externalIPs[1] \"255.255.255.255\" is the broadcast address",
        "skipped part of Service bad/s: spec.externalIPs[2] \"239.1.1.1\" is a multicast address",
        "skipped part of Service bad/s: status.loadBalancer.ingress[0].ip \"127.0.0.1\" is a loopback address",
        "skipped part of Service bad/s: status.loadBalancer.ingress[2].ip \"::ffff:198.51.100.8\" is an IPv4-mapped IPv6 address",
    ];
    assert_eq!(notes.len(), expected.len(), "{notes:?}");
    for (note, expected) in notes.iter().zip(expected) {
        assert!(
            note.starts_with(expected),
            "{note:?} should start with {expected:?}"
        );
    }
    assert!(rules.contains("-d 192.0.2.1 --dport 80"), "{rules}");
    assert!(rules.contains("-d 198.51.100.7 --dport 80"), "{rules}");
    for gone in [
        "255.255.255.255",
        "239.1.1.1",
        "127.0.0.1/32",
        "198.51.100.8",
    ] {
        assert!(
            !rules.contains(gone),
            "{gone} must not be programmed:\n{rules}"
        );
    }
}

/// With `--service-cidr`, a cluster IP outside it (or its network or IPv4 broadcast address,
/// which the allocator never hands out, §7.1) is refused.
#[test]
fn cluster_ips_outside_the_service_cidr_skip_the_service() {
    let mut config = NodeConfig::new("node-1");
    config.service_cidrs = vec!["10.96.0.0/16".parse().unwrap()];
    for (ip, reason) in [
        ("10.0.0.3", "spec.clusterIP \"10.0.0.3\" is outside the service CIDR 10.96.0.0/16 (--service-cidr); the API server allocates cluster IPs only from it"),
        ("10.96.0.0", "spec.clusterIP \"10.96.0.0\" is the network address of the service CIDR 10.96.0.0/16, which is never allocated"),
        ("10.96.255.255", "spec.clusterIP \"10.96.255.255\" is the broadcast address of the service CIDR 10.96.0.0/16, which is never allocated"),
    ] {
        let mut manifests = Manifests::default();
        let text = format!("{GOOD}{}", service("s", &format!("  clusterIP: {ip}\n  ports: [{{port: 80}}]")));
        manifests.add_text(&text, "test.yaml").expect("parses");
        let plan = pipeline::plan(&manifests.state, &config);
        let notes: Vec<String> = plan.notes.iter().map(Note::to_string).collect();
        assert_eq!(notes, vec![format!("skipped Service bad/s: {reason}")]);
        let rules = pipeline::iptables_rulesets(&plan, &config)[0].to_restore_text();
        assert!(rules.contains("-d 10.96.0.1 --dport 80 -j KUBE-SVC-"), "{rules}");
        assert!(!rules.contains("bad/s"), "{rules}");
    }
}

/// One Service of a small pool whose values collide often (cluster IPs, node ports, external
/// and load-balancer IPs), with arbitrary text and numbers mixed in.
fn pooled_service() -> impl Strategy<Value = serde_json::Value> {
    let ip = prop_oneof![
        Just("10.96.0.1".to_string()),
        Just("10.96.0.2".to_string()),
        Just("192.0.2.1".to_string()),
        Just("127.0.0.1".to_string()),
        Just("::ffff:10.96.0.1".to_string()),
        Just("fd00::1".to_string()),
        "\\PC{0,12}",
    ];
    let port = prop_oneof![Just(80), Just(53), Just(30000), any::<i32>()];
    let node_port = prop_oneof![Just(0), Just(30000), Just(30001), any::<i32>()];
    (
        (
            prop_oneof![Just("a"), Just("b")],
            prop::option::of(0u8..3),
            prop_oneof![Just("ClusterIP"), Just("NodePort"), Just("LoadBalancer"), Just("x")],
            ip.clone(),
            prop::collection::vec(ip.clone(), 0..3),
            prop::collection::vec(ip, 0..3),
        ),
        (
            prop::collection::vec((port, node_port.clone(), prop_oneof![Just("TCP"), Just("UDP"), Just("tcp")]), 0..3),
            node_port,
            prop_oneof![Just("Local"), Just("Cluster")],
        ),
    )
        .prop_map(|((namespace, created, kind, cluster_ip, external, ingress), (ports, hcnp, policy))| {
            let ports: Vec<serde_json::Value> = ports
                .iter()
                .enumerate()
                .map(|(i, (port, node_port, protocol))| {
                    serde_json::json!({"name": format!("p{i}"), "port": port, "nodePort": node_port, "protocol": protocol})
                })
                .collect();
            let mut metadata = serde_json::json!({"namespace": namespace});
            if let Some(year) = created {
                metadata["creationTimestamp"] = format!("202{year}-01-01T00:00:00Z").into();
            }
            serde_json::json!({
                "apiVersion": "v1", "kind": "Service", "metadata": metadata,
                "spec": {"type": kind, "clusterIP": cluster_ip, "externalIPs": external, "ports": ports,
                         "healthCheckNodePort": hcnp, "externalTrafficPolicy": policy},
                "status": {"loadBalancer": {"ingress": ingress.iter().map(|ip| serde_json::json!({"ip": ip})).collect::<Vec<_>>()}}
            })
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever typed objects come in, validation does not panic, and the outcome (which
    /// Service holds a contested address or port, which frontends are programmed) does not
    /// depend on the order the objects come in; nftables never gets a frontend twice.
    #[test]
    fn conflicting_services_settle_the_same_in_any_order(
        services in prop::collection::vec(pooled_service(), 1..8),
    ) {
        let config = NodeConfig::new("node-1");
        let plan_of = |order: &[serde_json::Value]| {
            let mut state = kproxy::source::ClusterState::default();
            for (i, value) in order.iter().enumerate() {
                let mut value = value.clone();
                // Unique names, fixed by position in the original list.
                value["metadata"]["name"] = value["metadata"]["name"].as_str().map_or(format!("s{i}"), str::to_string).into();
                if let Ok(service) = serde_json::from_value(value) {
                    state.services.push(service);
                }
            }
            pipeline::plan(&state, &config)
        };
        let named: Vec<serde_json::Value> = services
            .iter()
            .enumerate()
            .map(|(i, v)| { let mut v = v.clone(); v["metadata"]["name"] = format!("s{i}").into(); v })
            .collect();
        let forward = plan_of(&named);
        let reversed: Vec<serde_json::Value> = named.iter().rev().cloned().collect();
        let backward = plan_of(&reversed);
        prop_assert_eq!(format!("{:?}", forward.models), format!("{:?}", backward.models));
        // Each frontend leads to one service port, each node port to one Service.
        let mut frontends = std::collections::BTreeSet::new();
        let mut node_ports = std::collections::BTreeMap::new();
        for port in &forward.models[0].ports {
            let addresses = std::iter::once(port.cluster_ip)
                .chain(port.external_ips.iter().copied())
                .chain(port.load_balancer_ips.iter().copied());
            for ip in addresses {
                prop_assert!(
                    frontends.insert((ip, port.name.protocol, port.port)),
                    "{} {:?} {} is programmed twice", ip, port.name.protocol, port.port
                );
            }
            for number in port.node_port.iter().chain(&port.health_check_node_port) {
                let owner = node_ports.entry(*number).or_insert_with(|| port.name.service());
                prop_assert_eq!(owner.clone(), port.name.service(), "node port {} shared", number);
            }
        }
        let script = pipeline::nftables_rulesets(&forward, &config)[0].to_nft_script();
        let mut keys = std::collections::BTreeSet::new();
        for line in script.lines().filter(|l| l.starts_with("add element ip kube-proxy service-")) {
            let key = line.split(" : ").next().unwrap_or(line).to_string();
            prop_assert!(keys.insert(key.clone()), "duplicate map key {}", key);
        }
    }
}

/// The API server's single-object rules for Services that were not checked before
/// (api-validation.md §5.3, §5.4, §5.8, §7.1 item 5): each skips the Service with its reason.
#[test]
fn service_rules_of_the_api_server() {
    for (spec, reason) in [
        ("  clusterIP: 10.0.0.3\n  ports: []", "spec.ports is empty"),
        ("  clusterIP: 10.0.0.3\n  ports: [{port: 80, nodePort: 30080}]", "spec.ports[0].nodePort is set on a Service of type ClusterIP"),
        (
            "  type: NodePort\n  clusterIP: 10.0.0.3\n  ports: [{name: a, port: 80, nodePort: 30080}, {name: b, port: 81, nodePort: 30080}]",
            "spec.ports[1].nodePort 30080/tcp is used by more than one port",
        ),
        (
            "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 30080\n  clusterIP: 10.0.0.3\n  ports: [{port: 80, nodePort: 30080}]",
            "spec.healthCheckNodePort 30080 is also spec.ports[0].nodePort",
        ),
        ("  clusterIPs: [10.0.0.3]\n  ports: [{port: 80}]", "spec.clusterIPs is set but spec.clusterIP is empty"),
        ("  clusterIP: None\n  clusterIPs: [None, 10.0.0.3]\n  ports: [{port: 80}]", "\"None\" must be the only entry"),
        ("  type: NodePort\n  clusterIP: None\n  ports: [{port: 80}]", "headless) is only allowed for type ClusterIP"),
        (
            "  clusterIP: 10.0.0.3\n  clusterIPs: [10.0.0.3, \"fd00::3\", 10.0.0.4]\n  ports: [{port: 80}]",
            "spec.clusterIPs has 3 entries",
        ),
        ("  clusterIP: 10.0.0.3\n  ipFamilies: [IPv5]\n  ports: [{port: 80}]", "spec.ipFamilies[0] \"IPv5\" is unknown"),
        ("  clusterIP: 10.0.0.3\n  ipFamilies: [IPv4, IPv4]\n  ports: [{port: 80}]", "spec.ipFamilies[1] IPv4 is listed twice"),
        ("  clusterIP: 10.0.0.3\n  ipFamilyPolicy: DualStack\n  ports: [{port: 80}]", "spec.ipFamilyPolicy \"DualStack\" is unknown"),
        (
            "  clusterIP: 10.0.0.3\n  clusterIPs: [10.0.0.3, \"fd00::3\"]\n  ipFamilyPolicy: SingleStack\n  ports: [{port: 80}]",
            "spec.ipFamilyPolicy is SingleStack but spec.clusterIPs has two entries",
        ),
        (
            "  clusterIP: 10.0.0.3\n  loadBalancerSourceRanges: [10.0.0.0/8]\n  ports: [{port: 80}]",
            "spec.loadBalancerSourceRanges is set, but only LoadBalancer Services may have it",
        ),
        (
            "  clusterIP: 10.0.0.3\n  allocateLoadBalancerNodePorts: true\n  ports: [{port: 80}]",
            "spec.allocateLoadBalancerNodePorts is set on a Service of type ClusterIP",
        ),
    ] {
        assert_skipped(&service("s", spec), "Service bad/s", reason);
    }
    // Load-balancer status on a Service of another type is left out alone.
    let (notes, rules) = render_with(&service(
        "s",
        "  type: NodePort\n  clusterIP: 10.0.0.3\n  ports: [{port: 80}]\nstatus: {loadBalancer: {ingress: [{ip: 192.0.2.7}]}}",
    ));
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].starts_with("skipped part of Service bad/s: status.loadBalancer.ingress[0].ip \"192.0.2.7\" is set on a Service of type NodePort"), "{notes:?}");
    assert!(
        rules.contains("bad/s") && !rules.contains("192.0.2.7"),
        "{rules}"
    );
}

/// §6.3–§6.5 for EndpointSlices: a malformed slice is skipped whole, a malformed endpoint or
/// port number is left out alone.
#[test]
fn endpoint_slice_rules_of_the_api_server() {
    let slice = |ports: &str, endpoints: &str| {
        format!(
            "{}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: e, namespace: bad, labels: {{kubernetes.io/service-name: s}}}}\naddressType: IPv4\nports: {ports}\nendpoints: {endpoints}\n",
            service("s", "  clusterIP: 10.0.0.3\n  ports: [{name: p, port: 80}, {name: q, port: 53, protocol: UDP}]"),
        )
    };
    let good = "{addresses: [10.244.0.20]}";
    let ports = "[{name: p, port: 8080}, {name: q, port: 5353, protocol: UDP}]";
    let whole = |text: &str| render_with(text).0;
    let notes = whole(&slice(
        "[{name: p, port: 8080}, {name: p, port: 5353, protocol: UDP}]",
        &format!("[{good}]"),
    ));
    assert_eq!(notes, vec!["skipped EndpointSlice bad/e: ports[1].name \"p\" is used by more than one port (whatever the protocol)"]);
    let many: Vec<&str> = std::iter::repeat_n(good, 1001).collect();
    let notes = whole(&slice(ports, &format!("[{}]", many.join(","))));
    assert_eq!(notes, vec!["skipped EndpointSlice bad/e: endpoints has 1001 entries; the API server allows at most 1000"]);

    for (endpoint, reason) in [
        ("{addresses: []}", "endpoints[0].addresses has 0 entries"),
        (
            "{addresses: [10.244.0.10, 10.244.0.300]}",
            "endpoints[0].addresses[1] \"10.244.0.300\" is not an IP address",
        ),
        (
            "{addresses: [10.244.0.10], hostname: Web_1}",
            "endpoints[0].hostname \"Web_1\" is not a valid DNS-1123 label",
        ),
        (
            "{addresses: [10.244.0.10], nodeName: \"node 1\"}",
            "endpoints[0].nodeName \"node 1\" is not a valid node name",
        ),
        (
            "{addresses: [10.244.0.10], hints: {forZones: [{name: a}, {name: a}]}}",
            "endpoints[0].hints.forZones[1].name \"a\" is listed twice",
        ),
        (
            "{addresses: [10.244.0.10], hints: {forNodes: [{name: \"-n\"}]}}",
            "endpoints[0].hints.forNodes[0].name \"-n\" is not a valid node name",
        ),
    ] {
        let (notes, rules) = render_with(&slice(ports, &format!("[{endpoint}, {good}]")));
        assert_eq!(notes.len(), 1, "{endpoint}: {notes:?}");
        assert!(
            notes[0].starts_with(&format!("skipped part of EndpointSlice bad/e: {reason}"))
                && notes[0].ends_with("; that endpoint is left out"),
            "{endpoint}: {notes:?}"
        );
        assert!(
            rules.contains("--to-destination 10.244.0.20:8080"),
            "{rules}"
        );
        assert!(!rules.contains("10.244.0.10:"), "{rules}");
    }
    // A port number out of range is not checked by the API server; it is left out (§7.3).
    let (notes, rules) = render_with(&slice(
        "[{name: p, port: 8080}, {name: q, port: 70000, protocol: UDP}]",
        &format!("[{good}]"),
    ));
    assert_eq!(notes, vec!["skipped part of EndpointSlice bad/e: ports[1].port 70000 is outside 1..65535; that port is left out"]);
    assert!(
        rules.contains("--to-destination 10.244.0.20:8080"),
        "{rules}"
    );
}
