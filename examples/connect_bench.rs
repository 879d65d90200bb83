//! Connection-setup cost through the rules (issue 11):
//! `cargo run --release --example connect_bench -- [--seconds S] [--rounds R] [--send] [CASE ...]`
//! (root, `ip` and `nft` needed). A CASE is `LAYOUT:N` (`maps:100000`,
//! `kube-proxy:5000`) or `N` (both layouts); the default is
//! `maps:1 maps:100000 kube-proxy:1 kube-proxy:5000`.
//!
//! Each case gets namespaces of its own:
//!
//! ```text
//!   client ns                        node ns (the rules)              backend ns
//!   10.244.0.100..131/24 ── veth ──  10.244.0.1/24
//!   default via .1                   10.244.1.1/24     ── veth ──     10.244.1.2/24, default via .1
//!                                                                     TCP listener :8080
//! ```
//!
//! and the rules, loaded through kproxy's nftables backend (`NftablesBackend`; the `maps` layout
//! with its elements over netlink, kube-proxy's layout through `nft -f`), of the synthetic
//! cluster `kproxy::synthetic::cluster(N, 10)` plus two real Services whose single endpoint is
//! the backend's listener: `bench/plain` (cluster IP 10.111.255.10:80, no affinity) and
//! `bench/sticky` (10.111.255.11:80, ClientIP affinity: after the warm-up every client address
//! has its affinity entry, so each measured connection finds one). The client is a pod
//! (10.244.0.0/16 is a cluster CIDR): no masquerading. Before the load a connection to the
//! cluster IP must fail (the node has no route for it), after it both must succeed: what the
//! loop measures goes through the rules' DNAT.
//!
//! Once every case is loaded, rounds go round the cases and their two Services (so that the
//! shared machine's drift spreads over all of them): a thread in the client namespace runs a
//! tight loop for S seconds (default 3): a new socket bound to the next of 32 client addresses
//! (the port is picked at `connect()`, `IP_BIND_ADDRESS_NO_PORT`), `connect()` to the cluster
//! IP (timed: SYN out through the node's DNAT, SYN-ACK back; on veth the whole path runs in the
//! sending thread's softirq), optionally one byte sent (`--send`), and `close()` with
//! `SO_LINGER` 0 (an RST: no TIME_WAIT). R rounds (default 3) per case and Service, after a
//! 0.5 s warm-up. The backend accepts and closes.
//!
//! Kept out of the measure: reuse of a 4-tuple whose conntrack entry still exists (32
//! addresses: a tuple comes back after about half a million connections); a full conntrack
//! table (`nf_conntrack_tcp_timeout_close` is 1 s in the node namespace instead of 10 s, which
//! at ~45,000 connections/s would hold more than `nf_conntrack_max`); a full accept queue
//! (backlog 65535: a dropped SYN costs the client a 1 s retransmit). stderr says how many SYNs
//! were retransmitted and dropped during the rounds, and how many of the connections the backend
//! accepted.
//!
//! Each round also connects to the backend's own address (`direct`): the same path and rules,
//! no service lookup hit, no DNAT; the floor the Services' figures stand on.
//!
//! Printed, one line per case and target: the load time, connections per second (median and
//! range of the rounds; the whole loop: socket, connect, close), the median, 99th percentile
//! and maximum of `connect()` over all rounds, and failed connects. Per-round figures go to
//! stderr.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kproxy::backend::{Backend, NftablesBackend};
use kproxy::config::{NftablesLayout, NodeConfig};
use kproxy::nftables::{MAPS_TABLE_NAME, TABLE_NAME};
use kproxy::source::Manifests;
use kproxy::sync::nftables::{NftApplier, SyncOptions};

#[path = "common/netns.rs"]
mod netns;
use netns::Netns;

const PLAIN: &str = "10.111.255.10:80";
const STICKY: &str = "10.111.255.11:80";
const BACKEND: &str = "10.244.1.2:8080";

/// The two real Services, each with the backend listener as its only endpoint (on another
/// node, so that nothing about it is local).
const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: bench}
spec:
  clusterIP: 10.111.255.10
  ports: [{name: http, port: 80, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: plain-1
  namespace: bench
  labels: {kubernetes.io/service-name: plain}
addressType: IPv4
endpoints: [{addresses: [10.244.1.2], nodeName: backend-node}]
ports: [{name: http, port: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: bench}
spec:
  clusterIP: 10.111.255.11
  ports: [{name: http, port: 80, protocol: TCP}]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 10800}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: sticky-1
  namespace: bench
  labels: {kubernetes.io/service-name: sticky}
addressType: IPv4
endpoints: [{addresses: [10.244.1.2], nodeName: backend-node}]
ports: [{name: http, port: 8080, protocol: TCP}]
"#;

/// Runs a command that must succeed.
fn run(argv: &[&str]) {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|err| panic!("{}: {err}", argv[0]));
    assert!(
        out.status.success(),
        "{} failed (root?): {}",
        argv.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A veth pair `a_if` (in `a`) – `b_if` (in `b`), both up.
fn link(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    static LINKS: AtomicUsize = AtomicUsize::new(0);
    let tmp = format!(
        "kpc{}x{}",
        std::process::id() % 100_000,
        LINKS.fetch_add(1, Ordering::Relaxed)
    );
    let peer = format!("{tmp}p");
    run(&[
        "ip", "link", "add", &tmp, "type", "veth", "peer", "name", &peer,
    ]);
    for (dev, ns, name) in [(&tmp, a, a_if), (&peer, b, b_if)] {
        run(&["ip", "link", "set", dev, "netns", &ns.name, "name", name]);
        ns.run_ok(&["ip", "link", "set", name, "up"]);
    }
}

struct Topology {
    client: Netns,
    node: Netns,
    backend: Netns,
}

impl Topology {
    fn new() -> Topology {
        let client = Netns::new("connect-client");
        let node = Netns::new("connect-node");
        let backend = Netns::new("connect-backend");
        node.run_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        link(&client, "c0", &node, "n0");
        link(&backend, "b0", &node, "n1");
        for i in 0..CLIENTS {
            let address = format!("{}/24", client_ip(i));
            client.run_ok(&["ip", "addr", "add", &address, "dev", "c0"]);
        }
        client.run_ok(&["ip", "route", "add", "default", "via", "10.244.0.1"]);
        node.run_ok(&["ip", "addr", "add", "10.244.0.1/24", "dev", "n0"]);
        node.run_ok(&["ip", "addr", "add", "10.244.1.1/24", "dev", "n1"]);
        backend.run_ok(&["ip", "addr", "add", "10.244.1.2/24", "dev", "b0"]);
        backend.run_ok(&["ip", "route", "add", "default", "via", "10.244.1.1"]);
        backend.run_ok(&["sysctl", "-qw", "net.core.somaxconn=65535"]);
        Topology {
            client,
            node,
            backend,
        }
    }
}

/// The backend's listener: accepts and closes, counting, until [`Listener::stop`].
struct Listener {
    fd: i32,
    accepted: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<()>,
}

impl Listener {
    fn start(ns: &Netns) -> Listener {
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let (ready, fd) = std::sync::mpsc::channel();
        let thread = ns.spawn(move || {
            let listener = listen(BACKEND.parse().expect("constant address"))
                .expect("the backend listener listens");
            ready.send(listener.0).expect("the main thread waits");
            // Ends when stop() shuts the socket down (accept then fails with EINVAL).
            loop {
                // SAFETY: accept on the listening socket this thread owns; the new descriptor
                // is closed at once.
                let fd = unsafe {
                    libc::accept4(
                        listener.0,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC,
                    )
                };
                if fd < 0 {
                    let err = std::io::Error::last_os_error();
                    if err.kind() == std::io::ErrorKind::Interrupted
                        || err.raw_os_error() == Some(libc::ECONNABORTED)
                    {
                        continue;
                    }
                    break;
                }
                count.fetch_add(1, Ordering::Relaxed);
                drop(Socket(fd));
            }
        });
        let fd = fd.recv().expect("the listener starts");
        Listener {
            fd,
            accepted,
            thread,
        }
    }

    fn stop(self) -> usize {
        // SAFETY: the listener thread owns this socket until it returns from accept, which
        // shutdown() makes it do.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        let _ = self.thread.join();
        self.accepted.load(Ordering::Relaxed)
    }
}

/// A listening TCP socket with a long accept queue: the accepting thread shares two cores
/// with the client and the kernel's packet processing, and a full queue drops SYNs (the
/// client then waits 1 s for its retransmit).
fn listen(addr: SocketAddrV4) -> std::io::Result<Socket> {
    // SAFETY: plain socket calls on a descriptor owned by the returned `Socket`.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    check(fd)?;
    let socket = Socket(fd);
    set_option(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &1i32)?;
    let addr = sockaddr(addr);
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a valid address of the length passed.
    check(unsafe { libc::bind(fd, (&addr as *const libc::sockaddr_in).cast(), len) })?;
    // SAFETY: as above.
    check(unsafe { libc::listen(fd, 65535) })?;
    Ok(socket)
}

/// The client namespace's source addresses, 10.244.0.100 and on, used in turn (module docs).
const CLIENTS: u8 = 32;

fn client_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 0, 100 + i)
}

/// One round of the client loop.
#[derive(Default)]
struct Round {
    connects: usize,
    failures: usize,
    /// The time of each successful `connect()`.
    latencies: Vec<Duration>,
    elapsed: Duration,
}

/// A socket closed on drop.
struct Socket(i32);

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: the descriptor is this value's own.
        unsafe { libc::close(self.0) };
    }
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn set_option<T>(fd: i32, level: libc::c_int, name: libc::c_int, value: &T) -> std::io::Result<()> {
    // SAFETY: a valid socket and a value of the size passed.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    })
}

/// One connection from `source` (a port the kernel picks at `connect()`): returns the time
/// `connect()` took. With `send`, one byte goes out; the close is an RST (`SO_LINGER` 0).
fn connect_once(source: Ipv4Addr, target: SocketAddrV4, send: bool) -> std::io::Result<Duration> {
    // SAFETY: plain socket calls on a descriptor this function owns (closed by `Socket`).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    check(fd)?;
    let socket = Socket(fd);
    set_option(fd, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, &1i32)?;
    // A blocking connect gives up after 2 s (SYN retransmits after 1 s).
    let timeout = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    set_option(fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, &timeout)?;
    let from = sockaddr(SocketAddrV4::new(source, 0));
    let to = sockaddr(target);
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: valid addresses of the length passed.
    check(unsafe { libc::bind(fd, (&from as *const libc::sockaddr_in).cast(), len) })?;
    let start = Instant::now();
    // SAFETY: as above.
    check(unsafe { libc::connect(fd, (&to as *const libc::sockaddr_in).cast(), len) })?;
    let latency = start.elapsed();
    if send {
        // SAFETY: one byte from a valid buffer.
        check(unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) } as libc::c_int)?;
    }
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    set_option(fd, libc::SOL_SOCKET, libc::SO_LINGER, &linger)?;
    drop(socket);
    Ok(latency)
}

/// Connects to `target` over and over for `duration`, from each client address in turn.
fn client_round(target: SocketAddrV4, duration: Duration, send: bool) -> Round {
    let mut round = Round::default();
    let start = Instant::now();
    while start.elapsed() < duration {
        let source = client_ip((round.connects % usize::from(CLIENTS)) as u8);
        round.connects += 1;
        match connect_once(source, target, send) {
            Ok(latency) => round.latencies.push(latency),
            Err(_) => round.failures += 1,
        }
    }
    round.elapsed = start.elapsed();
    round
}

fn config(layout: NftablesLayout) -> NodeConfig {
    let mut config = NodeConfig::new("node-1");
    config.node_ips = vec!["10.244.0.1".parse().expect("constant address")];
    config.cluster_cidrs = vec![
        "10.128.0.0/9".parse().expect("constant CIDR"),
        "10.244.0.0/16".parse().expect("constant CIDR"),
    ];
    config.nftables_layout = layout;
    config
}

/// The synthetic cluster of `n` Services plus the two real ones.
fn cluster(n: usize) -> kproxy::source::ClusterState {
    let mut state = kproxy::synthetic::cluster(n, 10).unwrap_or_else(|err| {
        eprintln!("{err}");
        std::process::exit(2)
    });
    let mut real = Manifests::default();
    real.add_text(SERVICES, "connect_bench")
        .expect("the bench Services parse");
    state.services.extend(real.state.services);
    state.endpoint_slices.extend(real.state.endpoint_slices);
    state
}

fn layout_name(layout: NftablesLayout) -> &'static str {
    match layout {
        NftablesLayout::Maps => "maps",
        NftablesLayout::KubeProxy => "kube-proxy",
    }
}

/// One connect through the client namespace, for the checks around the measurement.
fn connects_once(topology: &Topology, target: SocketAddrV4) -> bool {
    topology
        .client
        .spawn(move || connect_once(client_ip(0), target, false).is_ok())
        .join()
        .expect("the client thread")
}

struct Settings {
    seconds: f64,
    rounds: usize,
    send: bool,
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

/// One loaded case: its namespaces, with the rules and the listener in place.
struct Case {
    layout: NftablesLayout,
    services: usize,
    topology: Topology,
    listener: Listener,
    load: Duration,
    /// The rounds against each of [`TARGETS`].
    rounds: [Vec<Round>; 3],
    accepted_before: usize,
    disturbed_before: [u64; 2],
}

impl Case {
    fn name(&self) -> String {
        format!("{}:{}", layout_name(self.layout), self.services)
    }
}

/// What the rounds connect to: the two Services, and the backend itself (past the same
/// rules, without a DNAT: the cost of the path without the service lookup).
const TARGETS: [&str; 3] = ["plain", "sticky", "direct"];

fn plain() -> SocketAddrV4 {
    PLAIN.parse().expect("constant address")
}

fn sticky() -> SocketAddrV4 {
    STICKY.parse().expect("constant address")
}

/// Builds the namespaces of one case and loads its rules.
fn load(layout: NftablesLayout, n: usize, settings: &Settings) -> Case {
    let config = config(layout);
    let state = cluster(n);
    let models = kproxy::pipeline::plan(&state, &config).models;
    drop(state);

    let topology = Topology::new();
    // Closed entries go after 1 s, not 10 (module docs).
    topology.node.run_ok(&[
        "sysctl",
        "-qw",
        "net.netfilter.nf_conntrack_tcp_timeout_close=1",
    ]);
    let listener = Listener::start(&topology.backend);
    assert!(
        !connects_once(&topology, plain()),
        "the cluster IP answers without rules: the measure would not go through them"
    );

    let applier = match layout {
        NftablesLayout::Maps => NftApplier::in_netns(&topology.node.name)
            .with_table(MAPS_TABLE_NAME, Some(TABLE_NAME))
            .with_netlink_elements(),
        NftablesLayout::KubeProxy => NftApplier::in_netns(&topology.node.name),
    };
    let mut backend = NftablesBackend::new(applier, SyncOptions::default());
    let start = Instant::now();
    for family in backend.sync(&models, &config) {
        if let Err(err) = family.result {
            panic!("the load failed: {err}");
        }
    }
    let load = start.elapsed();
    drop(models);
    assert!(
        connects_once(&topology, plain()) && connects_once(&topology, sticky()),
        "the cluster IPs do not answer through the rules"
    );
    let send = settings.send;
    topology
        .client
        .spawn(move || {
            // Warm-up: neighbour entries, every client's affinity entry, caches.
            client_round(plain(), Duration::from_millis(250), send);
            client_round(sticky(), Duration::from_millis(250), send);
        })
        .join()
        .expect("the client thread");
    std::thread::sleep(Duration::from_millis(100));
    let case = Case {
        layout,
        services: n,
        accepted_before: listener.accepted.load(Ordering::Relaxed),
        disturbed_before: disturbances(&topology),
        topology,
        listener,
        load,
        rounds: [Vec::new(), Vec::new(), Vec::new()],
    };
    eprintln!("{}: loaded in {:.2} s", case.name(), load.as_secs_f64());
    case
}

/// One round of one case against one of [`TARGETS`].
fn measure(case: &mut Case, service: usize, settings: &Settings) {
    let target = [
        plain(),
        sticky(),
        BACKEND.parse().expect("constant address"),
    ][service];
    let (duration, send) = (Duration::from_secs_f64(settings.seconds), settings.send);
    let r = case
        .topology
        .client
        .spawn(move || client_round(target, duration, send))
        .join()
        .expect("the client thread");
    eprintln!(
        "  {} {}: {} connects in {:.2} s ({:.0}/s), {} failed, slowest connect() {}; node conntrack entries {}",
        case.name(),
        TARGETS[service],
        r.connects,
        r.elapsed.as_secs_f64(),
        r.connects as f64 / r.elapsed.as_secs_f64(),
        r.failures,
        us(r.latencies.iter().copied().max().unwrap_or_default()),
        conntrack_count(&case.topology.node),
    );
    case.rounds[service].push(r);
}

/// Prints a case's lines of the table, and its checks; tears it down.
fn report(case: Case) {
    let [retransmits, overflows] = disturbances(&case.topology);
    let name = case.name();
    eprintln!(
        "{name}: during the rounds: client SYN retransmits {}, backend listen overflows {}",
        retransmits - case.disturbed_before[0],
        overflows - case.disturbed_before[1],
    );
    // The backend accepts asynchronously: let it catch up before counting.
    std::thread::sleep(Duration::from_millis(200));
    let accepted = case.listener.stop() - case.accepted_before;
    let successes: usize = case
        .rounds
        .iter()
        .flatten()
        .map(|r| r.latencies.len())
        .sum();
    eprintln!("{name}: the backend accepted {accepted} of the {successes} connections made");
    for (i, rounds) in case.rounds.iter().enumerate() {
        let mut rates: Vec<f64> = rounds
            .iter()
            .map(|r| r.connects as f64 / r.elapsed.as_secs_f64())
            .collect();
        rates.sort_by(f64::total_cmp);
        let rate = rates.get(rates.len() / 2).copied().unwrap_or(f64::NAN);
        let spread = format!(
            "{:.0}–{:.0}",
            rates.first().copied().unwrap_or(f64::NAN),
            rates.last().copied().unwrap_or(f64::NAN)
        );
        let mut latencies: Vec<Duration> = rounds
            .iter()
            .flat_map(|r| r.latencies.iter().copied())
            .collect();
        latencies.sort();
        let failures: usize = rounds.iter().map(|r| r.failures).sum();
        println!(
            "| {} | {} | {:.2} s | {} | {rate:.0} ({spread}) | {} | {} | {} | {failures} |",
            layout_name(case.layout),
            case.services,
            case.load.as_secs_f64(),
            [
                "Service",
                "Service, ClientIP affinity",
                "backend IP, no DNAT"
            ][i],
            us(quantile(&latencies, 0.5)),
            us(quantile(&latencies, 0.99)),
            us(latencies.last().copied().unwrap_or_default()),
        );
    }
}

/// A `TcpExt` counter of a namespace (`/proc/net/netstat`: a line of names, a line of
/// values); 0 if it cannot be read.
fn counter(ns: &Netns, name: &str) -> u64 {
    let netstat = ns.read("/proc/thread-self/net/netstat");
    let mut lines = netstat.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        let (Some(names), Some(values)) = (
            names.strip_prefix("TcpExt:"),
            values.strip_prefix("TcpExt:"),
        ) else {
            continue;
        };
        if let Some((_, value)) = names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == name)
        {
            return value.parse().unwrap_or(0);
        }
    }
    0
}

/// The counters that say a measure was disturbed: SYNs the client sent again (1 s each) and
/// SYNs the backend dropped for a full accept queue.
fn disturbances(topology: &Topology) -> [u64; 2] {
    [
        counter(&topology.client, "TCPSynRetrans"),
        counter(&topology.backend, "ListenOverflows"),
    ]
}

/// The node namespace's conntrack entries (`nf_conntrack_count` is per namespace).
fn conntrack_count(node: &Netns) -> String {
    node.read("/proc/sys/net/netfilter/nf_conntrack_count")
        .trim()
        .to_string()
}

fn main() {
    let mut settings = Settings {
        seconds: 3.0,
        rounds: 3,
        send: false,
    };
    let mut cases = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| {
            args.next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| {
                    eprintln!("{flag} needs a number");
                    std::process::exit(2)
                })
        };
        match arg.as_str() {
            "--seconds" => settings.seconds = value("--seconds"),
            "--rounds" => settings.rounds = value("--rounds") as usize,
            "--send" => settings.send = true,
            case => {
                let (layouts, n) = match case.split_once(':') {
                    Some(("maps", n)) => (vec![NftablesLayout::Maps], n),
                    Some(("kube-proxy", n)) => (vec![NftablesLayout::KubeProxy], n),
                    None => (vec![NftablesLayout::Maps, NftablesLayout::KubeProxy], case),
                    Some(_) => {
                        eprintln!("unknown case {case}: LAYOUT:N (maps, kube-proxy) or N");
                        std::process::exit(2)
                    }
                };
                let Ok(n) = n.parse::<usize>() else {
                    eprintln!("unknown case {case}: LAYOUT:N (maps, kube-proxy) or N");
                    std::process::exit(2)
                };
                cases.extend(layouts.into_iter().map(|l| (l, n)));
            }
        }
    }
    if cases.is_empty() {
        cases = vec![
            (NftablesLayout::Maps, 1),
            (NftablesLayout::Maps, 100_000),
            (NftablesLayout::KubeProxy, 1),
            (NftablesLayout::KubeProxy, 5_000),
        ];
    }
    println!("| layout | services | load | target | connections/s, median (rounds) | connect() median | p99 | max | failed |");
    println!("|---|---:|---:|---|---:|---:|---:|---:|---:|");
    // Every case is loaded first, then the rounds go round the cases (and their two
    // Services), so that the machine's drift over time is spread over all of them.
    let mut cases: Vec<Case> = cases
        .into_iter()
        .map(|(layout, n)| load(layout, n, &settings))
        .collect();
    for _ in 0..settings.rounds {
        for case in &mut cases {
            for service in 0..TARGETS.len() {
                measure(case, service, &settings);
            }
        }
    }
    for case in cases {
        report(case);
    }
}
