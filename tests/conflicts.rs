//! Objects that conflict with each other (api-validation.md §7): a cluster IP or node port
//! claimed by two Services, a frontend offered by two. The older Service (creationTimestamp,
//! then namespace/name) keeps it, the other is reported, and both modes agree.

use kproxy::config::NodeConfig;
use kproxy::pipeline;
use kproxy::source::{Manifests, Note};

/// A Service `namespace/name` created at `created` (or without a timestamp), with `spec`
/// lines, and a slice with one endpoint when `endpoint` is given.
fn service(
    namespace: &str,
    name: &str,
    created: Option<&str>,
    spec: &str,
    endpoint: Option<&str>,
) -> String {
    let created = created
        .map(|t| format!(", creationTimestamp: \"{t}\""))
        .unwrap_or_default();
    let mut text = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}{created}}}\nspec:\n{spec}\n"
    );
    if let Some(ip) = endpoint {
        text.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: {namespace}, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: p, port: 8080, protocol: TCP}}, {{name: q, port: 5353, protocol: UDP}}]\nendpoints: [{{addresses: [{ip}]}}]\n"
        ));
    }
    text
}

struct Rendered {
    notes: Vec<String>,
    iptables: String,
    nftables: String,
}

fn render(text: &str) -> Rendered {
    let mut manifests = Manifests::default();
    manifests.add_text(text, "test.yaml").expect("parses");
    let config = NodeConfig::new("node-1");
    let plan = pipeline::plan(&manifests.state, &config);
    Rendered {
        notes: plan.notes.iter().map(Note::to_string).collect(),
        iptables: pipeline::iptables_rulesets(&plan, &config)[0].to_restore_text(),
        nftables: pipeline::nftables_rulesets(&plan, &config)[0].to_nft_script(),
    }
}

impl Rendered {
    /// Both modes program `service` (by its `namespace/name` in comments and chain names).
    fn assert_present(&self, service: &str) {
        assert!(
            self.iptables.contains(service),
            "{service} missing in iptables:\n{}",
            self.iptables
        );
        assert!(
            self.nftables.contains(service),
            "{service} missing in nftables:\n{}",
            self.nftables
        );
    }

    fn assert_absent(&self, service: &str) {
        assert!(
            !self.iptables.contains(service),
            "{service} programmed in iptables:\n{}",
            self.iptables
        );
        assert!(
            !self.nftables.contains(service),
            "{service} programmed in nftables:\n{}",
            self.nftables
        );
    }

    /// The nftables `service-ips` map has exactly one element for `key` (`ip . proto . port`),
    /// going to `service`'s chain.
    fn assert_one_frontend(&self, key: &str, service: &str) {
        let elements: Vec<&str> = self
            .nftables
            .lines()
            .filter(|l| l.contains(&format!("{{ {key} : ")))
            .collect();
        assert_eq!(elements.len(), 1, "{key}: {elements:?}");
        assert!(
            elements[0].contains(service),
            "{key} must go to {service}: {}",
            elements[0]
        );
    }
}

const PORTS: &str = "  ports: [{name: p, port: 80, protocol: TCP}]";

#[test]
fn a_cluster_ip_belongs_to_the_older_service() {
    // tenant/web is older than ops/api though second by name: the timestamp decides.
    let text = [
        service(
            "ops",
            "api",
            Some("2025-01-01T00:00:00Z"),
            &format!("  clusterIP: 10.96.0.5\n{PORTS}"),
            None,
        ),
        service(
            "tenant",
            "web",
            Some("2020-01-01T00:00:00Z"),
            &format!("  clusterIP: 10.96.0.5\n{PORTS}"),
            Some("10.244.0.5"),
        ),
    ]
    .concat();
    let out = render(&text);
    assert_eq!(
        out.notes,
        vec!["skipped Service ops/api: spec.clusterIP 10.96.0.5 is already used by Service tenant/web (older); the API server gives a cluster IP to one Service only"]
    );
    out.assert_present("tenant/web");
    out.assert_absent("ops/api");
    assert!(
        !out.iptables.contains("REJECT"),
        "the loser must not reject the winner's traffic:\n{}",
        out.iptables
    );
    out.assert_one_frontend("10.96.0.5 . tcp . 80", "tenant/web");
}

#[test]
fn without_timestamps_namespace_and_name_decide_and_a_missing_timestamp_is_newest() {
    let text = [
        service(
            "b",
            "second",
            None,
            &format!("  clusterIP: 10.96.0.5\n{PORTS}"),
            Some("10.244.0.6"),
        ),
        service(
            "a",
            "first",
            None,
            &format!("  clusterIP: 10.96.0.5\n{PORTS}"),
            Some("10.244.0.5"),
        ),
        service(
            "c",
            "stamped",
            Some("2030-01-01T00:00:00Z"),
            &format!("  clusterIP: 10.96.0.7\n{PORTS}"),
            None,
        ),
        service(
            "a",
            "unstamped",
            None,
            &format!("  clusterIP: 10.96.0.7\n{PORTS}"),
            None,
        ),
    ]
    .concat();
    let out = render(&text);
    out.assert_present("a/first");
    out.assert_absent("b/second");
    out.assert_present("c/stamped");
    out.assert_absent("a/unstamped");
    assert!(
        out.notes[0].starts_with("skipped Service b/second: spec.clusterIP 10.96.0.5 is already used by Service a/first (created at the same time or without a creationTimestamp, and first by namespace/name)"),
        "{:?}",
        out.notes
    );
    assert!(out.notes[1].starts_with("skipped Service a/unstamped: spec.clusterIP 10.96.0.7 is already used by Service c/stamped (older)"), "{:?}", out.notes);
}

/// One node-port pool for every protocol (§7.1 item 4), health-check node ports included
/// (item 5); before, iptables kept the first and nftables the last, silently.
#[test]
fn a_node_port_belongs_to_the_older_service_whatever_the_protocol() {
    let text = [
        service("x", "tcp", Some("2021-01-01T00:00:00Z"), "  type: NodePort\n  clusterIP: 10.96.0.5\n  ports: [{name: p, port: 80, protocol: TCP, nodePort: 30080}]", Some("10.244.0.5")),
        service("x", "udp", Some("2022-01-01T00:00:00Z"), "  type: NodePort\n  clusterIP: 10.96.0.6\n  ports: [{name: q, port: 53, protocol: UDP, nodePort: 30080}]", Some("10.244.0.6")),
        service("x", "health", Some("2023-01-01T00:00:00Z"), "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 30080\n  clusterIP: 10.96.0.7\n  ports: [{name: p, port: 80, protocol: TCP, nodePort: 30081}]", Some("10.244.0.7")),
    ]
    .concat();
    let out = render(&text);
    assert_eq!(
        out.notes,
        vec![
            "skipped Service x/udp: spec.ports[0].nodePort 30080 is already used by Service x/tcp (older); node ports and health-check node ports are one pool for all protocols",
            "skipped Service x/health: spec.healthCheckNodePort 30080 is already used by Service x/tcp (older); node ports and health-check node ports are one pool for all protocols",
        ]
    );
    out.assert_present("x/tcp");
    out.assert_absent("x/udp");
    out.assert_absent("x/health");
    assert!(
        out.nftables.contains("{ tcp . 30080 : goto external-"),
        "{}",
        out.nftables
    );
    assert!(!out.nftables.contains("udp . 30080"), "{}", out.nftables);
}

/// §7.2/§7.3: the same (IP, protocol, port) through external IPs, load-balancer IPs or a
/// cluster IP: each frontend is programmed once, for the older Service (a cluster IP always
/// for its own Service), the other Service keeps everything else.
#[test]
fn a_frontend_offered_twice_is_programmed_once() {
    let text = [
        service("f", "old", Some("2021-01-01T00:00:00Z"), "  clusterIP: 10.96.0.5\n  externalIPs: [192.0.2.10]\n  ports: [{name: p, port: 80, protocol: TCP}]", Some("10.244.0.5")),
        service("f", "new", Some("2022-01-01T00:00:00Z"), "  type: LoadBalancer\n  clusterIP: 10.96.0.6\n  externalIPs: [192.0.2.10, 10.96.0.5]\n  ports: [{name: p, port: 80, protocol: TCP, nodePort: 30080}, {name: q, port: 53, protocol: UDP, nodePort: 30053}]\nstatus: {loadBalancer: {ingress: [{ip: 192.0.2.10}]}}", Some("10.244.0.6")),
    ]
    .concat();
    let out = render(&text);
    assert_eq!(
        out.notes,
        vec![
            "skipped part of Service f/new: spec.externalIPs 10.96.0.5 port 80/tcp is the cluster IP of Service f/old; this Service's rule for it is left out",
            "skipped part of Service f/new: spec.externalIPs 192.0.2.10 port 80/tcp is already offered by Service f/old (older); this Service's rule for it is left out",
            "skipped part of Service f/new: status.loadBalancer.ingress 192.0.2.10 port 80/tcp is already offered by Service f/old (older); this Service's rule for it is left out",
            // Its own external IP for the port it keeps.
            "skipped part of Service f/new: status.loadBalancer.ingress 192.0.2.10 port 53/udp is also one of this Service's external IPs; this Service's rule for it is left out",
        ]
    );
    out.assert_one_frontend("192.0.2.10 . tcp . 80", "f/old");
    out.assert_one_frontend("10.96.0.5 . tcp . 80", "f/old");
    // f/new keeps its cluster IP and its other port on the shared addresses.
    out.assert_one_frontend("10.96.0.6 . tcp . 80", "f/new");
    out.assert_one_frontend("192.0.2.10 . udp . 53", "f/new");
    out.assert_one_frontend("10.96.0.5 . udp . 53", "f/new");
    // iptables: the same winner, one rule per frontend.
    let rules_for = |dst: &str| -> Vec<&str> {
        out.iptables
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES") && l.contains(dst))
            .collect()
    };
    let tcp = rules_for("-d 192.0.2.10 --dport 80");
    assert_eq!(tcp.len(), 1, "{tcp:?}");
    assert!(tcp[0].contains("f/old"), "{tcp:?}");
    assert!(rules_for("-d 10.96.0.5 --dport 80")
        .iter()
        .all(|l| l.contains("f/old")));
}

/// The same address listed twice inside one Service, or as its own external and
/// load-balancer IP, makes one frontend, not a duplicate map key.
#[test]
fn a_service_repeating_its_own_address_offers_it_once() {
    let text = service(
        "f",
        "self",
        None,
        "  type: LoadBalancer\n  clusterIP: 10.96.0.5\n  externalIPs: [192.0.2.10, 192.0.2.10, 10.96.0.5]\n  ports: [{name: p, port: 80, protocol: TCP, nodePort: 30080}]\nstatus: {loadBalancer: {ingress: [{ip: 192.0.2.10}, {ip: 192.0.2.10}]}}",
        Some("10.244.0.5"),
    );
    let out = render(&text);
    assert_eq!(
        out.notes,
        vec![
            "skipped part of Service f/self: spec.externalIPs 10.96.0.5 port 80/tcp is this Service's own cluster IP; this Service's rule for it is left out",
            "skipped part of Service f/self: status.loadBalancer.ingress 192.0.2.10 port 80/tcp is also one of this Service's external IPs; this Service's rule for it is left out",
        ]
    );
    out.assert_one_frontend("192.0.2.10 . tcp . 80", "external-");
    out.assert_one_frontend("10.96.0.5 . tcp . 80", "service-");
}
