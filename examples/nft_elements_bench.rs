//! Elements over netlink against `nft -f` (issue 11):
//! `cargo run --release --example nft_elements_bench -- [DNAT_ELEMENTS [VMAP_ELEMENTS]]`
//! (default 1000000 100000; root and `nft` needed; about a minute at the defaults, most of it
//! nft's).
//!
//! Each path runs in a process of its own (this program run again with `--path PATH`),
//! so that each one's peak memory is its own, in a fresh network namespace with the same table:
//! a dnat map `typeof ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr .
//! th dport` and a verdict map `ipv4_addr . inet_proto . inet_service : verdict` whose
//! elements go to 100 chains. Each path then
//!
//! 1. loads DNAT_ELEMENTS dnat elements and VMAP_ELEMENTS verdict elements in one transaction:
//!    (a) `ElementBatch` (encoded, then sent in one netlink batch), (b) the text kproxy's
//!    applier writes today, one `add element … { key : value }` command per element, piped
//!    to `nft -f -`, or (c) the same elements as one `add element` command per map (nft's
//!    cheapest text for them); the small changes of (b) and (c) are the same text;
//! 2. makes a small change against the full maps 5 times (each: 10 dnat elements deleted, 10
//!    added, one transaction) and reports the median, min and max;
//! 3. checks with lookups over netlink that a deleted key is gone and a loaded and an added key
//!    are there;
//! 4. reads the dnat map back: (a) over netlink (`element_dump`): a `for_each` right after the
//!    load, repeated until a dump is not interrupted (the kernel grows the map's hash table
//!    in the background for a while after a large load, which interrupts dumps), then
//!    `list` (every element collected) and `for_each` (counted, not kept), each with the
//!    growth of this process's resident memory during it (`VmHWM` after resetting it, less
//!    `VmRSS` before); (c) `nft -j list map` (its output read, not parsed); (b) nothing.
//!
//! With `MAP_SIZE=N` in the environment both maps are declared with `size N` (a limit on
//! their elements, which also makes the kernel size their hash tables up front).
//!
//! Printed: wall times (encode or render, and the kernel's or nft's share), the peak resident
//! memory of the benchmark process (`VmHWM`) and of nft (`getrusage(RUSAGE_CHILDREN)`), and
//! the bytes handed over.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kproxy::family::IpFamily;
use kproxy::sync::netlink::NetfilterSocket;
use kproxy::sync::nftables::element_dump;
use kproxy::sync::nftables::elements::{
    self, Data, Element, ElementBatch, Part, PartKind, Value, Verdict,
};

#[path = "common/netns.rs"]
mod netns;
use netns::Netns;

const TABLE: &str = "t";
const CHAINS: u32 = 100;
const ROUNDS: u32 = 5;
const CHANGE: u32 = 10;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--path") {
        let path = args.get(1).cloned().unwrap_or_default();
        let dnat = count(args.get(2), 1_000_000);
        let vmap = count(args.get(3), 100_000);
        run_path(&path, dnat, vmap);
        return;
    }
    let dnat = count(args.first(), 1_000_000);
    let vmap = count(args.get(1), 100_000);
    println!("{dnat} dnat elements, {vmap} verdict map elements; small change: {CHANGE} adds + {CHANGE} deletes, {ROUNDS} rounds");
    let exe = std::env::current_exe().expect("own path");
    let mut results = Vec::new();
    for path in ["netlink", "nft", "nft-grouped"] {
        let out = Command::new(&exe)
            .args(["--path", path, &dnat.to_string(), &vmap.to_string()])
            .stderr(Stdio::inherit())
            .output()
            .expect("run a path");
        assert!(out.status.success(), "the {path} path failed");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let rows: Vec<(String, String)> = text
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        results.push(rows);
    }
    println!(
        "{:<40} {:>20} {:>20} {:>20}",
        "", "(a) netlink batch", "(b) nft -f, per elem", "(c) nft -f, grouped"
    );
    let mut names: Vec<&String> = Vec::new();
    for (k, _) in results.iter().flatten() {
        if !names.contains(&k) {
            names.push(k);
        }
    }
    for name in names {
        let find = |rows: &Vec<(String, String)>| {
            rows.iter()
                .find(|(k, _)| k == name)
                .map_or("-".to_string(), |(_, v)| v.clone())
        };
        println!(
            "{name:<40} {:>20} {:>20} {:>20}",
            find(&results[0]),
            find(&results[1]),
            find(&results[2])
        );
    }
}

fn count(arg: Option<&String>, default: u32) -> u32 {
    arg.map(|a| a.parse().expect("a number of elements"))
        .unwrap_or(default)
}

fn service(i: u32) -> Part {
    Part::Ipv4(Ipv4Addr::from(0x0a64_0000 + i))
}

fn dnat_key(i: u32) -> Value {
    Value::concat([service(i), Part::Proto(6), Part::Port(80), Part::Integer(0)])
}

fn dnat(i: u32) -> Element {
    Element::new(dnat_key(i)).value(Value::concat([
        Part::Ipv4(Ipv4Addr::new(
            10,
            1,
            (i / 250 % 250) as u8,
            (i % 250 + 1) as u8,
        )),
        Part::Port(8080),
    ]))
}

fn vmap(i: u32) -> Element {
    Element::new(Value::concat([service(i), Part::Proto(6), Part::Port(80)]))
        .verdict(Verdict::Goto(format!("svc{}", i % CHAINS)))
}

/// nft's text for an element, as kproxy's renderer spells elements.
fn nft_text(element: &Element) -> String {
    match &element.data {
        Some(Data::Value(v)) => {
            format!("{} : {}", element.key, v)
        }
        Some(Data::Verdict(v)) => {
            format!("{} : {}", element.key, v)
        }
        None => element.key.to_string(),
    }
}

/// The (dnat) elements deleted and added in round `r` of the small change.
fn change(r: u32, dnat_count: u32) -> (Vec<Element>, Vec<Element>) {
    let deleted = (r * CHANGE..(r + 1) * CHANGE).map(dnat).collect();
    let added = (0..CHANGE)
        .map(|j| dnat(dnat_count + r * CHANGE + j))
        .collect();
    (deleted, added)
}

/// The load as kproxy's applier writes elements: one `add element` command each.
fn load_text_per_element(dnat_count: u32, vmap_count: u32) -> String {
    use std::fmt::Write as _;
    let mut text = String::new();
    for i in 0..dnat_count {
        let _ = writeln!(
            text,
            "add element ip {TABLE} svc_dnat {{ {} }}",
            nft_text(&dnat(i))
        );
    }
    for i in 0..vmap_count {
        let _ = writeln!(
            text,
            "add element ip {TABLE} svc_vmap {{ {} }}",
            nft_text(&vmap(i))
        );
    }
    text
}

/// The load as one `add element` command per map, nft's cheapest text for it.
fn load_text_grouped(dnat_count: u32, vmap_count: u32) -> String {
    use std::fmt::Write as _;
    let mut text = format!("add element ip {TABLE} svc_dnat {{\n");
    for i in 0..dnat_count {
        let _ = writeln!(text, "  {},", nft_text(&dnat(i)));
    }
    let _ = write!(text, "}}\nadd element ip {TABLE} svc_vmap {{\n");
    for i in 0..vmap_count {
        let _ = writeln!(text, "  {},", nft_text(&vmap(i)));
    }
    text.push_str("}\n");
    text
}

/// `nft ARGS` in the namespace with `stdin`; its output and how long it ran.
fn nft(ns: &Netns, args: &[&str], stdin: Option<&[u8]>) -> (std::process::Output, Duration) {
    ns.enter(|| {
        let started = Instant::now();
        let mut child = Command::new("nft")
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nft runs");
        let pipe = child.stdin.take();
        let out = std::thread::scope(|scope| {
            if let (Some(mut pipe), Some(text)) = (pipe, stdin) {
                scope.spawn(move || {
                    let _ = pipe.write_all(text);
                });
            }
            child.wait_with_output().expect("nft finishes")
        });
        (out, started.elapsed())
    })
}

fn nft_ok(ns: &Netns, args: &[&str], stdin: Option<&[u8]>) -> Duration {
    let (out, took) = nft(ns, args, stdin);
    assert!(
        out.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

fn vm_hwm_kib() -> u64 {
    status_kib("VmHWM:")
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn children_max_rss_kib() -> u64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) } != 0 {
        return 0;
    }
    usage.ru_maxrss as u64
}

fn row(name: &str, value: String) {
    println!("{name}\t{value}");
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn run_path(path: &str, dnat_count: u32, vmap_count: u32) {
    let ns = Netns::new(path);
    let chains: String = (0..CHAINS)
        .map(|c| format!("  chain svc{c} {{ }}\n"))
        .collect();
    // `size N`: the maps' element limit, which also sizes the kernel's hash table up front.
    let size = std::env::var("MAP_SIZE")
        .ok()
        .map(|n| format!(" size {n};"))
        .unwrap_or_default();
    let table = format!(
        "table ip {TABLE} {{\n{chains}  map svc_dnat {{ typeof ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . th dport;{size} }}\n  map svc_vmap {{ type ipv4_addr . inet_proto . inet_service : verdict;{size} }}\n}}\n"
    );
    nft_ok(&ns, &["-f", "-"], Some(table.as_bytes()));
    let rss_before = vm_hwm_kib();

    let mut small = Vec::new();
    match path {
        "netlink" => {
            let mut socket = NetfilterSocket::open_in(Some(&ns.name)).expect("netlink socket");
            let started = Instant::now();
            let mut batch = ElementBatch::new(IpFamily::V4, TABLE);
            for i in 0..dnat_count {
                batch.add("svc_dnat", &dnat(i)).expect("valid");
            }
            for i in 0..vmap_count {
                batch.add("svc_vmap", &vmap(i)).expect("valid");
            }
            let encoded = started.elapsed();
            let committed = batch.send(&mut socket).expect("load committed");
            let total = started.elapsed();
            row("load: wall", ms(total));
            row("  encode / render text", ms(encoded));
            row("  kernel / nft", ms(total - encoded));
            row("  bytes handed over", committed.bytes.to_string());
            row("  netlink messages", committed.messages.to_string());
            row("benchmark process peak RSS (VmHWM)", mib(vm_hwm_kib()));
            row("  before the load", mib(rss_before));
            row("nft peak RSS (children)", mib(children_max_rss_kib()));
            for r in 0..ROUNDS {
                let (deleted, added) = change(r, dnat_count);
                let started = Instant::now();
                let mut batch = ElementBatch::new(IpFamily::V4, TABLE);
                for e in &deleted {
                    batch.delete("svc_dnat", e).expect("valid");
                }
                for e in &added {
                    batch.add("svc_dnat", e).expect("valid");
                }
                batch.send(&mut socket).expect("change committed");
                small.push(started.elapsed());
            }
        }
        "nft" | "nft-grouped" => {
            let started = Instant::now();
            let text = if path == "nft" {
                load_text_per_element(dnat_count, vmap_count)
            } else {
                load_text_grouped(dnat_count, vmap_count)
            };
            let rendered = started.elapsed();
            let took = nft_ok(&ns, &["-f", "-"], Some(text.as_bytes()));
            let total = started.elapsed();
            row("load: wall", ms(total));
            row("  encode / render text", ms(rendered));
            row("  kernel / nft", ms(took));
            row("  bytes handed over", text.len().to_string());
            drop(text);
            row("benchmark process peak RSS (VmHWM)", mib(vm_hwm_kib()));
            row("  before the load", mib(rss_before));
            row("nft peak RSS (children)", mib(children_max_rss_kib()));
            for r in 0..ROUNDS {
                let (deleted, added) = change(r, dnat_count);
                let started = Instant::now();
                let mut text = String::new();
                for e in &deleted {
                    text += &format!("delete element ip {TABLE} svc_dnat {{ {} }}\n", e.key);
                }
                for e in &added {
                    text += &format!("add element ip {TABLE} svc_dnat {{ {} }}\n", nft_text(e));
                }
                nft_ok(&ns, &["-f", "-"], Some(text.as_bytes()));
                small.push(started.elapsed());
            }
        }
        other => panic!("unknown path {other}"),
    }
    let mut sorted = small.clone();
    sorted.sort();
    row("small change: median", ms(sorted[sorted.len() / 2]));
    row(
        "small change: min / max",
        format!(
            "{:.2} / {:.2} ms",
            sorted[0].as_secs_f64() * 1e3,
            sorted[sorted.len() - 1].as_secs_f64() * 1e3
        ),
    );

    // Deleted in round 0, loaded, added in the last round: the kernel's own lookups (`nft get
    // element` reads every element of the map first: about a minute at 1,000,000).
    let mut socket = NetfilterSocket::open_in(Some(&ns.name)).expect("netlink socket");
    let mut get = |i: u32| {
        elements::contains(&mut socket, IpFamily::V4, TABLE, "svc_dnat", &dnat(i)).expect("lookup")
    };
    let gone = !get(0);
    let loaded = get(dnat_count - 1);
    let added = get(dnat_count + ROUNDS * CHANGE - 1);
    assert!(
        gone && loaded && added,
        "check: deleted gone {gone}, loaded there {loaded}, added there {added}"
    );
    row("check (3 lookups over netlink)", "ok".to_string());

    match path {
        "netlink" => dump_netlink(&mut socket, dnat_count),
        "nft-grouped" => {
            let (out, took) = nft(&ns, &["-j", "list", "map", "ip", TABLE, "svc_dnat"], None);
            assert!(out.status.success(), "nft -j list map failed");
            row("dump: list, wall", ms(took));
            row("  bytes read", out.stdout.len().to_string());
        }
        _ => {}
    }
}

/// The dnat map read back over netlink: rows for `run_path`.
fn dump_netlink(socket: &mut NetfilterSocket, dnat_count: u32) {
    const KEY: &[PartKind] = &[
        PartKind::Ipv4,
        PartKind::Proto,
        PartKind::Port,
        PartKind::Integer,
    ];
    const DATA: &[PartKind] = &[PartKind::Ipv4, PartKind::Port];
    // The map holds the load less the rounds' deletes plus their adds: as many as loaded.
    let expected = dnat_count as usize;
    let each = |socket: &mut NetfilterSocket| {
        let mut count = 0usize;
        let started = Instant::now();
        let outcome = element_dump::for_each(
            socket,
            IpFamily::V4,
            TABLE,
            "svc_dnat",
            KEY,
            Some(DATA),
            |_| count += 1,
        );
        (outcome, count, started.elapsed())
    };

    // Right after the load: interrupted dumps until the kernel has finished growing the map.
    let started = Instant::now();
    let mut interrupted = Vec::new();
    let first = loop {
        match each(socket) {
            (Err(e), _, took) if e.kind() == std::io::ErrorKind::Interrupted => {
                interrupted.push(took);
                assert!(interrupted.len() < 20, "every dump interrupted: {e}");
            }
            (outcome, count, took) => {
                assert!(outcome.expect("dump"), "the map exists");
                assert_eq!(count, expected);
                break took;
            }
        }
    };
    row(
        "dump after the load: interrupted dumps",
        format!(
            "{} ({})",
            interrupted.len(),
            interrupted
                .iter()
                .map(|d| format!("{:.0} ms", d.as_secs_f64() * 1e3))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    row("  until a whole dump, wall", ms(started.elapsed()));
    row("  the whole dump (for_each), wall", ms(first));

    let before = reset_peak_memory();
    let started = Instant::now();
    let listed = element_dump::list(socket, IpFamily::V4, TABLE, "svc_dnat", KEY, Some(DATA))
        .expect("dump")
        .expect("the map exists");
    let took = started.elapsed();
    let peak = vm_hwm_kib();
    assert_eq!(listed.len(), expected);
    row("dump: list, wall", ms(took));
    row(
        "  memory growth (peak RSS - RSS before)",
        mib(peak.saturating_sub(before)),
    );
    row(
        "  the Vec's capacity in bytes",
        format!(
            "{:.1} MiB ({} B an element)",
            (listed.capacity() * std::mem::size_of::<element_dump::ListedElement>()) as f64
                / (1 << 20) as f64,
            std::mem::size_of::<element_dump::ListedElement>()
        ),
    );
    drop(listed);

    let before = reset_peak_memory();
    let (outcome, count, took) = each(socket);
    let peak = vm_hwm_kib();
    assert!(outcome.expect("a settled map's dump is whole"));
    assert_eq!(count, expected);
    row("dump: for_each (counting), wall", ms(took));
    row(
        "  memory growth (peak RSS - RSS before)",
        mib(peak.saturating_sub(before)),
    );
}

/// Returns freed memory to the kernel and resets this process's peak RSS (`VmHWM`) to its
/// current RSS, which is returned (KiB).
fn reset_peak_memory() -> u64 {
    // SAFETY: malloc_trim only releases free memory of glibc's heap.
    unsafe { libc::malloc_trim(0) };
    // 5: reset the peak resident set size (proc(5), /proc/pid/clear_refs).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    status_kib("VmRSS:")
}
