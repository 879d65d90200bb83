//! A small cluster in network namespaces, for tests with real traffic:
//!
//! ```text
//!   client ns                     node ns                          backend ns (one per backend)
//!   10.100.0.2..9/24  ── veth ──  10.100.0.1/24   (rules here)
//!   default via .1                10.244.N.1/24   ── veth ──       10.244.N.2/24, default via .1
//! ```
//!
//! Each "client" is one source address of the client namespace. Each backend runs a TCP and a
//! UDP server on port 8080 that answer with the backend's name, over IPv4 and (where the kernel
//! has it) IPv6. [`Topology::add_ipv6`] gives every link IPv6 addresses as well
//! (`fd00:100::N/64` on the client link, `fd00:244:N::2/64` for backend N). Everything is torn
//! down on drop. Addresses exist only inside these namespaces.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::netns::Netns;

/// The pod network of the topology (the node's `--cluster-cidr`).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The node's address on the client link (its `--node-ip`).
pub const NODE_IP: &str = "10.100.0.1";
/// The IPv6 pod network, with [`Topology::add_ipv6`].
pub const CLUSTER_CIDR6: &str = "fd00:244::/48";
/// The node's IPv6 address on the client link, with [`Topology::add_ipv6`].
pub const NODE_IP6: &str = "fd00:100::1";
/// The port every backend server listens on.
pub const BACKEND_PORT: u16 = 8080;

pub struct Topology {
    pub client: Netns,
    pub node: Netns,
    pub backends: Vec<Backend>,
    servers: Vec<Child>,
}

pub struct Backend {
    pub name: String,
    pub ip: String,
    /// Configured by [`Topology::add_ipv6`].
    pub ip6: String,
    pub ns: Netns,
}

/// Answers every TCP connection and UDP datagram on port 8080 with the backend name, on IPv4
/// and, when the kernel has IPv6, on IPv6 (separate sockets, `IPV6_V6ONLY`).
const SERVER: &str = r#"
import socket, sys, threading
name = sys.argv[1].encode()
def sock(family, kind, wildcard):
    s = socket.socket(family, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((wildcard, 8080))
    return s
def tcp(s):
    s.listen(128)
    while True:
        c, _ = s.accept()
        try: c.sendall(name + b"\n")
        finally: c.close()
def udp(s):
    while True:
        _, peer = s.recvfrom(2048)
        s.sendto(name + b"\n", peer)
servers = [(tcp, sock(socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0")),
           (udp, sock(socket.AF_INET, socket.SOCK_DGRAM, "0.0.0.0"))]
try:
    servers += [(tcp, sock(socket.AF_INET6, socket.SOCK_STREAM, "::")),
                (udp, sock(socket.AF_INET6, socket.SOCK_DGRAM, "::"))]
except OSError:
    pass
for serve, s in servers:
    threading.Thread(target=serve, args=(s,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#;

/// Connects `count` times from `source` to `target:port` and prints one answer (or `ERR:<why>`)
/// per line. UDP sends one datagram per new socket (a new conntrack flow each time); the socket
/// is connected, so that an ICMP refusal reaches it (`ERR:ConnectionRefusedError`).
const CLIENT: &str = r#"
import socket, sys
proto, source, target, port, count, timeout = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
family = socket.AF_INET6 if ":" in target else socket.AF_INET
for i in range(count):
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(family, kind)
    s.settimeout(timeout)
    try:
        s.bind((source, 0))
        s.connect((target, port))
        if proto == "udp":
            s.send(b"hi")
        data = s.recv(100)
        print(data.decode().strip() or "ERR:empty", flush=True)
    except Exception as e:
        print("ERR:" + type(e).__name__, flush=True)
    finally:
        s.close()
"#;

impl Topology {
    /// A client namespace, a node namespace and `backends` backend namespaces with servers.
    pub fn new(backends: usize) -> Topology {
        let client = Netns::new("client");
        let node = Netns::new("node");
        must(&node, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        // Source addresses of the client link count as local for route_localnet-free NodePorts.
        link(&client, "c0", &node, "n0");
        must(
            &node,
            &["ip", "addr", "add", &format!("{NODE_IP}/24"), "dev", "n0"],
        );
        for i in 2..10 {
            must(
                &client,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("10.100.0.{i}/24"),
                    "dev",
                    "c0",
                ],
            );
        }
        must(&client, &["ip", "route", "add", "default", "via", NODE_IP]);

        let mut topology = Topology {
            client,
            node,
            backends: Vec::new(),
            servers: Vec::new(),
        };
        for i in 1..=backends {
            let ns = Netns::new("backend");
            let name = format!("backend-{i}");
            let ip = format!("10.244.{i}.2");
            link(&ns, "b0", &topology.node, &format!("nb{i}"));
            must(
                &topology.node,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("10.244.{i}.1/24"),
                    "dev",
                    &format!("nb{i}"),
                ],
            );
            must(
                &ns,
                &["ip", "addr", "add", &format!("{ip}/24"), "dev", "b0"],
            );
            must(
                &ns,
                &[
                    "ip",
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("10.244.{i}.1"),
                ],
            );
            let server = spawn_server(&ns, &name);
            topology.servers.push(server);
            let ip6 = format!("fd00:244:{i}::2");
            topology.backends.push(Backend { name, ip, ip6, ns });
        }
        topology
    }

    /// `count` connections from client address `10.100.0.<client>` (`fd00:100::<client>` to an
    /// IPv6 target) to `target:port`; returns one answer per connection (a backend name, or
    /// `ERR:<why>`).
    pub fn connect(
        &self,
        proto: &str,
        client: u8,
        target: &str,
        port: u16,
        count: usize,
    ) -> Vec<String> {
        let out = self.client.run(
            &[
                "python3",
                "-c",
                CLIENT,
                proto,
                &client_address(client, target.contains(':')),
                target,
                &port.to_string(),
                &count.to_string(),
                "2",
            ],
            None,
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Gives the node a default route, as a real node has one: packets to addresses nobody
    /// has (e.g. a cluster IP without rules) are then forwarded, passing the FORWARD chain,
    /// instead of being refused by routing. The gateway (10.100.0.254) does not exist, so what
    /// is forwarded there goes nowhere. The gateway shares the client link, so ICMP redirects
    /// are turned off: they would use up the per-host ICMP rate limit that REJECT's replies
    /// need.
    pub fn add_node_default_route(&self) {
        for conf in ["all", "n0"] {
            must(
                &self.node,
                &[
                    "sysctl",
                    "-qw",
                    &format!("net.ipv4.conf.{conf}.send_redirects=0"),
                ],
            );
        }
        must(
            &self.node,
            &["ip", "route", "add", "default", "via", "10.100.0.254"],
        );
    }

    /// Gives every link IPv6 addresses too (without duplicate address detection, so that they
    /// are usable at once): `fd00:100::1/64` on the node's client link and `fd00:100::2..9` on
    /// the client's, `fd00:244:N::1/64` on the node's link to backend N and `fd00:244:N::2/64`
    /// on the backend's, default routes towards the node, and IPv6 forwarding in the node.
    pub fn add_ipv6(&self) {
        must(
            &self.node,
            &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"],
        );
        let add = |ns: &Netns, address: &str, dev: &str| {
            must(
                ns,
                &["ip", "-6", "addr", "add", address, "dev", dev, "nodad"],
            );
        };
        add(&self.node, &format!("{NODE_IP6}/64"), "n0");
        for client in 2..10 {
            add(
                &self.client,
                &format!("{}/64", client_address(client, true)),
                "c0",
            );
        }
        must(
            &self.client,
            &["ip", "-6", "route", "add", "default", "via", NODE_IP6],
        );
        for (i, backend) in self.backends.iter().enumerate() {
            let n = i + 1;
            add(
                &self.node,
                &format!("fd00:244:{n}::1/64"),
                &format!("nb{n}"),
            );
            add(&backend.ns, &format!("{}/64", backend.ip6), "b0");
            must(
                &backend.ns,
                &[
                    "ip",
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("fd00:244:{n}::1"),
                ],
            );
        }
    }

    /// Runs the real `kproxy` binary in the node namespace.
    pub fn kproxy(&self, args: &[&str]) -> std::process::Output {
        let mut argv = vec![env!("CARGO_BIN_EXE_kproxy")];
        argv.extend_from_slice(args);
        self.node.run(&argv, None)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for server in &mut self.servers {
            let _ = server.kill();
            let _ = server.wait();
        }
    }
}

/// Client `n`'s source address: `10.100.0.<n>`, or `fd00:100::<n>`.
pub fn client_address(client: u8, ipv6: bool) -> String {
    if ipv6 {
        format!("fd00:100::{client}")
    } else {
        format!("10.100.0.{client}")
    }
}

fn must(ns: &Netns, argv: &[&str]) {
    let out = ns.run(argv, None);
    assert!(
        out.status.success(),
        "{} in {}: {}",
        argv.join(" "),
        ns.name,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A veth pair between two namespaces, both ends up.
fn link(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    static LINKS: AtomicUsize = AtomicUsize::new(0);
    let tmp = format!(
        "kpt{}x{}",
        std::process::id() % 100000,
        LINKS.fetch_add(1, Ordering::Relaxed)
    );
    let status = Command::new("ip")
        .args([
            "link",
            "add",
            &tmp,
            "type",
            "veth",
            "peer",
            "name",
            &format!("{tmp}p"),
        ])
        .status()
        .expect("ip runs");
    assert!(status.success(), "creating a veth pair failed");
    for (dev, ns, name) in [(tmp.clone(), a, a_if), (format!("{tmp}p"), b, b_if)] {
        let status = Command::new("ip")
            .args(["link", "set", &dev, "netns", &ns.name, "name", name])
            .status()
            .expect("ip runs");
        assert!(status.success(), "moving {dev} into {} failed", ns.name);
        must(ns, &["ip", "link", "set", name, "up"]);
    }
}

fn spawn_server(ns: &Netns, name: &str) -> Child {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "python3", "-c", SERVER, name])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 server starts");
    // Wait for "ready" so that the first connection does not race the bind.
    let stdout = child.stdout.take().expect("stdout piped");
    let mut line = String::new();
    let start = Instant::now();
    let mut reader = BufReader::new(stdout);
    while line.trim() != "ready" {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0
            || start.elapsed() > Duration::from_secs(10)
        {
            panic!("backend server {name} did not start");
        }
    }
    child
}
