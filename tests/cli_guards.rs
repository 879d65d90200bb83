//! The command line refuses what would leave a node worse than it found it: flag values that
//! cannot work (exit status 2, as the design's contract says for bad flags), a NodePort address
//! nobody knows, and a sync whose input holds no Service. The sync and namespace cases run the
//! real binary in throwaway network namespaces.

mod common;

use std::process::{Command, Output};

use common::netns::{kernel_tests_possible, Netns};

const KPROXY: &str = env!("CARGO_BIN_EXE_kproxy");
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/my-service.yaml");

fn kproxy(args: &[&str]) -> Output {
    Command::new(KPROXY)
        .args(args)
        .output()
        .expect("kproxy runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_cidr_flags_exit_2_and_name_the_value() {
    for (flag, value) in [
        ("--cluster-cidr", "10.244.0.0/33"),
        ("--cluster-cidr", "10.244.0.0/16,nonsense"),
        ("--service-cidr", "172.30.0.0"),
        ("--nodeport-addresses", "192.168.0.0/24,primary"),
        ("--nodeport-addresses", "everything"),
    ] {
        let out = kproxy(&["render", "--hostname", "n1", flag, value, EXAMPLE]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{flag} {value}: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains(flag),
            "{flag} {value}: the message names the flag: {}",
            stderr(&out)
        );
        assert!(out.stdout.is_empty(), "{flag} {value}: no rules printed");
    }
}

#[test]
fn comma_separated_cidrs_are_read_like_repeated_flags() {
    let joined = kproxy(&[
        "render",
        "--hostname",
        "n1",
        "--ip-family",
        "dual",
        "--node-ip",
        "192.168.0.2",
        "--node-ip",
        "fd00::2",
        "--cluster-cidr",
        "10.244.0.0/16,fd00:10:244::/56",
        EXAMPLE,
    ]);
    let repeated = kproxy(&[
        "render",
        "--hostname",
        "n1",
        "--ip-family",
        "dual",
        "--node-ip",
        "192.168.0.2",
        "--node-ip",
        "fd00::2",
        "--cluster-cidr",
        "10.244.0.0/16",
        "--cluster-cidr",
        "fd00:10:244::/56",
        EXAMPLE,
    ]);
    assert_eq!(joined.status.code(), Some(0), "{}", stderr(&joined));
    assert_eq!(joined.stdout, repeated.stdout);
    let rules = String::from_utf8_lossy(&joined.stdout);
    assert!(rules.contains("! -s 10.244.0.0/16"), "{rules}");
}

#[test]
fn node_ips_of_the_wrong_family_exit_2() {
    for (family, ips) in [
        ("ipv6", &["192.168.0.2"][..]),
        ("ipv4", &["fd00::2"][..]),
        ("dual", &["192.168.0.2"][..]),
        ("dual", &["fd00::2", "fd00::3"][..]),
    ] {
        let mut args = vec!["render", "--hostname", "n1", "--ip-family", family];
        for ip in ips {
            args.extend(["--node-ip", ip]);
        }
        args.push(EXAMPLE);
        let out = kproxy(&args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "--ip-family {family} --node-ip {ips:?}: {}",
            stderr(&out)
        );
        assert!(stderr(&out).contains("--node-ip"), "{}", stderr(&out));
    }
}

/// A NodePort Service, so that where NodePorts are accepted shows in the rules.
const NODE_PORT_SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 172.30.0.10
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints: [{addresses: [10.244.1.5], conditions: {ready: true}}]
ports: [{name: http, port: 8080, protocol: TCP}]
"#;

/// `primary` NodePort addresses (explicit, or the nftables default) without a node IP: in a
/// namespace with no route to find the primary address from, refused; with one, the address
/// the kernel would send from is used — never every address.
#[test]
fn primary_nodeport_address_is_detected_or_refused() {
    if !kernel_tests_possible(&[]) {
        return;
    }
    let ns = Netns::new("primary");
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("web.yaml");
    std::fs::write(&input, NODE_PORT_SERVICE).expect("write input");
    let input = input.to_str().expect("utf-8 path");
    let render = |extra: &[&str]| {
        let mut argv = vec![KPROXY, "render", "--hostname", "n1"];
        argv.extend(extra);
        argv.push(input);
        ns.run(&argv, None)
    };
    let cases: [&[&str]; 2] = [
        &["--mode", "nftables"],
        &["--mode", "iptables", "--nodeport-addresses", "primary"],
    ];

    for extra in cases {
        let out = render(extra);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("primary IPv4 address") && stderr(&out).contains("--node-ip"),
            "{extra:?}: {}",
            stderr(&out)
        );
    }

    for argv in [
        &[
            "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
        ][..],
        &["ip", "link", "set", "eth0", "up"],
        &["ip", "link", "set", "eth1", "up"],
    ] {
        let out = ns.run(argv, None);
        assert!(out.status.success(), "{argv:?}: {}", stderr(&out));
    }
    ns.run(
        &["ip", "addr", "add", "198.51.100.7/24", "dev", "eth0"],
        None,
    );
    ns.run(
        &["ip", "addr", "add", "203.0.113.9/24", "dev", "eth0"],
        None,
    );
    let route = ns.run(
        &[
            "ip",
            "route",
            "add",
            "default",
            "via",
            "203.0.113.1",
            "src",
            "203.0.113.9",
        ],
        None,
    );
    assert!(route.status.success(), "{}", stderr(&route));
    for extra in cases {
        let out = render(extra);
        assert_eq!(out.status.code(), Some(0), "{extra:?}: {}", stderr(&out));
        let rules = String::from_utf8_lossy(&out.stdout);
        assert!(
            rules.contains("203.0.113.9") && !rules.contains("198.51.100.7"),
            "{extra:?}: NodePorts only on the route's source address:\n{rules}"
        );
        assert!(
            stderr(&out).contains("203.0.113.9"),
            "{extra:?}: the detected address is reported: {}",
            stderr(&out)
        );
    }
}

/// A sync of an input without Services would remove every service rule: refused, with the
/// rules of the previous sync left in place, unless `--allow-empty` says so.
#[test]
fn sync_of_an_input_without_services_is_refused() {
    if !kernel_tests_possible(&["nft"]) {
        return;
    }
    let ns = Netns::new("empty");
    let sync = |extra: &[&str], input: &str, stdin: Option<&str>| {
        let mut argv = vec![
            KPROXY,
            "sync",
            "--once",
            "--mode",
            "nftables",
            "--hostname",
            "n1",
            "--node-ip",
            "192.0.2.10",
        ];
        argv.extend(extra);
        argv.push(input);
        ns.run(&argv, stdin)
    };
    let service_rules = || {
        let out = ns.run(&["nft", "list", "table", "ip", "kube-proxy"], None);
        String::from_utf8_lossy(&out.stdout)
            .matches("172.30.0.41")
            .count()
    };
    let first = sync(&[], EXAMPLE, None);
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    let before = service_rules();
    assert!(before > 0, "the example's cluster IP is in the rules");

    let empty_dir = tempfile::tempdir().expect("tempdir");
    let dangling = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink("/nonexistent/a.yaml", dangling.path().join("a.yaml"))
        .expect("symlink");
    let invalid_dir = tempfile::tempdir().expect("tempdir");
    let invalid = invalid_dir.path().join("invalid-only.yaml");
    std::fs::write(
        &invalid,
        "apiVersion: v1\nkind: Service\nmetadata: {name: Bad_Name}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}\n",
    )
    .expect("write");
    let empty_path = empty_dir.path().to_str().expect("utf-8");
    let dangling_path = dangling.path().to_str().expect("utf-8");
    let invalid_path = invalid.to_str().expect("utf-8");
    for (input, stdin) in [
        (empty_path, None),
        ("-", Some("")),
        (dangling_path, None),
        (invalid_path, None),
    ] {
        let out = sync(&[], input, stdin);
        assert_eq!(out.status.code(), Some(1), "{input}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("refusing to sync") && stderr(&out).contains("--allow-empty"),
            "{input}: {}",
            stderr(&out)
        );
        assert_eq!(service_rules(), before, "{input}: rules untouched");
    }

    let allowed = sync(&["--allow-empty"], empty_path, None);
    assert_eq!(allowed.status.code(), Some(0), "{}", stderr(&allowed));
    assert_eq!(service_rules(), 0, "--allow-empty syncs the empty cluster");
}
