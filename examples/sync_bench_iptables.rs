//! iptables sync benchmark: the synthetic cluster (`kproxy::synthetic::cluster(n, 10)`) synced
//! through kproxy's library syncer into a fresh network namespace, against `iptables-restore`
//! alone loading the very same payload into an identically prepared namespace.
//!
//! Run (as root, with iptables installed):
//!
//! ```text
//! cargo run --release --example sync_bench_iptables -- [SERVICES...] [--backend nft|legacy] [--skip-full-alone]
//! ```
//!
//! `--skip-full-alone` leaves out the tool-alone run of the full sync (the slowest part: 8 min
//! at 10,000 Services with iptables-nft) and copies the synced rules into the other namespace
//! with a plain save and restore instead. The tool-alone figures of the incremental syncs are
//! then only indicative: rules loaded that way restore a few percent faster (71 against 79 ms
//! at 1,000 Services).
//!
//! Default sizes: 1000 5000 10000. For each size it reports
//! - the full first sync: `IptablesSyncer::sync` wall time (kernel read, payload rendering,
//!   the restore, jump rules and canary), the part of it spent in `iptables-restore`, and
//!   `iptables-restore --noflush --counters -w 5 -W 100000 < file` alone on the same payload
//!   in another fresh namespace, given first the jump rules and canary kproxy created;
//! - an incremental sync after one EndpointSlice changed (one endpoint replaced): the same
//!   three figures, the tool alone running in a namespace holding the same rules (medians of
//!   nine such syncs, each changing another Service; the tool alone goes first in every
//!   other round);
//! - the objects (payload lines) and bytes sent.
//!
//! "Overhead" is sync time minus tool-alone time: what kproxy adds around the kernel tool.
//! The columns split the sync into the restore as kproxy ran it, the other tools it ran
//! (`iptables-save` of a full sync, drift probes of a partial one, jump rules, canary), and
//! its own work (diff, rendering, piping).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kproxy::config::NodeConfig;
use kproxy::family::IpFamily;
use kproxy::iptables::Ruleset;
use kproxy::sync::iptables::{
    Applier, Backend, Exit, IptablesSyncer, SpawnError, SystemApplier, Tool, RESTORE_FLAGS,
    WAIT_FLAGS,
};
use kproxy::sync::netlink::NetfilterSocket;

#[path = "common/netns.rs"]
mod netns;
use netns::Netns;

/// The real applier, remembering the last restore payload and the time spent in each tool.
struct Recording {
    inner: SystemApplier,
    last_payload: String,
    restore_time: Duration,
    /// `iptables-save` and single `iptables` commands (kernel read, probes, jump rules).
    other_time: Duration,
    /// The `iptables` commands that changed something (`-N`, `-I`), to replay elsewhere.
    changes: Vec<Vec<String>>,
}

impl Applier for Recording {
    fn program(&self, family: IpFamily, tool: Tool) -> String {
        self.inner.program(family, tool)
    }

    fn restore(&mut self, family: IpFamily, payload: &str) -> Result<Exit, SpawnError> {
        let start = Instant::now();
        let exit = self.inner.restore(family, payload);
        self.restore_time += start.elapsed();
        self.last_payload = payload.to_string();
        exit
    }

    fn save(&mut self, family: IpFamily, table: Option<&str>) -> Result<Exit, SpawnError> {
        let start = Instant::now();
        let exit = self.inner.save(family, table);
        self.other_time += start.elapsed();
        exit
    }

    fn iptables(&mut self, family: IpFamily, args: &[&str]) -> Result<Exit, SpawnError> {
        let start = Instant::now();
        let exit = self.inner.iptables(family, args);
        self.other_time += start.elapsed();
        if args.contains(&"-N") || args.contains(&"-I") {
            self.changes
                .push(args.iter().map(|a| a.to_string()).collect());
        }
        exit
    }
    /// The drift check over netlink: its time counts as kproxy's own work.
    fn nf_tables_socket(&mut self) -> Option<std::io::Result<NetfilterSocket>> {
        self.inner.nf_tables_socket()
    }
}

/// Copies every rule of `from` into the fresh namespace `to`: a plain save piped into a plain
/// restore (no `--noflush`: `to` holds nothing to keep), much faster than the syncer's payload.
fn copy_rules(from: &Netns, to: &Netns, backend: Backend) {
    // Through the applier, which gives iptables-save the stack it needs at 10,000 Services.
    let save = SystemApplier::for_backend(backend, &from.exec_prefix())
        .save(IpFamily::V4, None)
        .expect("iptables-save runs");
    assert!(save.success(), "iptables-save failed: {}", save.stderr);
    let mut restore = Command::new("ip")
        .args([
            "netns",
            "exec",
            &to.name,
            backend.program(IpFamily::V4, Tool::Restore),
        ])
        .stdin(Stdio::piped())
        .spawn()
        .expect("iptables-restore runs");
    restore
        .stdin
        .take()
        .expect("stdin")
        .write_all(save.stdout.as_bytes())
        .expect("write rules");
    assert!(
        restore.wait().expect("restore ends").success(),
        "copy failed"
    );
}

/// A kernel that accepts everything and holds nothing: the syncer on top of it computes the
/// same partial payloads as the real one, which depend only on what was applied before.
#[derive(Default)]
struct Shadow {
    last_payload: String,
}

impl Applier for Shadow {
    fn program(&self, family: IpFamily, tool: Tool) -> String {
        Backend::Nft.program(family, tool).to_string()
    }

    fn restore(&mut self, _: IpFamily, payload: &str) -> Result<Exit, SpawnError> {
        self.last_payload = payload.to_string();
        Ok(Exit::code(0))
    }

    fn save(&mut self, _: IpFamily, _: Option<&str>) -> Result<Exit, SpawnError> {
        Ok(Exit::code(0))
    }

    fn iptables(&mut self, _: IpFamily, _: &[&str]) -> Result<Exit, SpawnError> {
        Ok(Exit::code(0))
    }
}

/// `iptables-restore` alone, reading the payload from a file, in `ns`.
fn restore_alone(ns: &Netns, backend: Backend, payload: &str) -> Duration {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(payload.as_bytes()).expect("write payload");
    file.flush().expect("flush payload");
    let input = std::fs::File::open(file.path()).expect("reopen payload");
    let program = backend.program(IpFamily::V4, Tool::Restore);
    let start = Instant::now();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, program])
        .args(RESTORE_FLAGS)
        .args(WAIT_FLAGS)
        .stdin(Stdio::from(input))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("iptables-restore runs");
    let elapsed = start.elapsed();
    assert!(
        out.status.success(),
        "{program} refused the payload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    elapsed
}

fn rulesets(state: &kproxy::source::ClusterState, config: &NodeConfig) -> Vec<Ruleset> {
    let plan = kproxy::pipeline::plan(state, config);
    kproxy::pipeline::iptables_rulesets(&plan, config)
}

/// Incremental syncs per size; the table shows medians.
const INCREMENTAL_RUNS: usize = 9;

struct Row {
    services: usize,
    kind: &'static str,
    sync: Duration,
    in_restore: Duration,
    in_other_tools: Duration,
    /// `None` where it was not measured (`--skip-full-alone`).
    alone: Option<Duration>,
    objects: usize,
    bytes: usize,
    chains_written: usize,
}

fn secs(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let backend = match args
        .iter()
        .position(|a| a == "--backend")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
    {
        Some("legacy") => Backend::Legacy,
        _ => Backend::Nft,
    };
    let skip_full_alone = args.iter().any(|a| a == "--skip-full-alone");
    let mut sizes: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    if sizes.is_empty() {
        sizes = vec![1000, 5000, 10000];
    }
    let mut config = NodeConfig::new("node-1");
    config.cluster_cidrs = vec!["10.128.0.0/9".parse().expect("constant CIDR")];

    println!("backend: {backend}");
    println!(
        "| services | sync | kproxy sync (s) | in iptables-restore (s) | in other tools (s) | kproxy's own work (s) | iptables-restore alone (s) | overhead (s) | overhead | objects (lines) | chains declared | bytes |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &services in &sizes {
        let mut state = kproxy::synthetic::cluster(services, 10).unwrap_or_else(|err| {
            eprintln!("{err}");
            std::process::exit(2)
        });
        let desired = rulesets(&state, &config);

        // Full first sync into a fresh namespace.
        let synced = Netns::new("sync");
        let alone = Netns::new("alone");
        let mut syncer = IptablesSyncer::new(Recording {
            inner: SystemApplier::for_backend(backend, &synced.exec_prefix()),
            last_payload: String::new(),
            restore_time: Duration::ZERO,
            other_time: Duration::ZERO,
            changes: Vec::new(),
        });
        let start = Instant::now();
        let reports = syncer.sync(desired).expect("full sync");
        let sync_time = start.elapsed();
        let payload = std::mem::take(&mut syncer.applier_mut().last_payload);
        let changes = std::mem::take(&mut syncer.applier_mut().changes);
        let alone_time = if skip_full_alone {
            copy_rules(&synced, &alone, backend);
            None
        } else {
            // The other namespace first gets the jump rules and canary that kproxy created
            // before its restore, so that the tool alone starts from the same kernel state
            // (restores take longer with them there).
            let mut plain = SystemApplier::for_backend(backend, &alone.exec_prefix());
            for args in changes {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let exit = plain.iptables(IpFamily::V4, &args).expect("iptables runs");
                assert!(exit.success(), "{args:?}: {}", exit.stderr);
            }
            Some(restore_alone(&alone, backend, &payload))
        };
        print_row(&Row {
            services,
            kind: "full",
            sync: sync_time,
            in_restore: syncer.applier().restore_time,
            in_other_tools: syncer.applier().other_time,
            alone: alone_time,
            objects: reports[0].objects,
            bytes: reports[0].bytes,
            chains_written: payload.lines().filter(|l| l.starts_with(':')).count(),
        });

        // One EndpointSlice changes (one endpoint replaced), a different Service each round;
        // medians are reported. A shadow syncer without a kernel knows each payload first, so
        // that the tool alone can go first in every other round: neither side always runs
        // second, on a warmer machine.
        let mut shadow = IptablesSyncer::new(Shadow::default());
        shadow
            .sync(rulesets(&state, &config))
            .expect("shadow full sync");
        let mut runs: Vec<Row> = Vec::new();
        for k in 0..INCREMENTAL_RUNS {
            let slice = &mut state.endpoint_slices[(services / 2 + k * 7) % services];
            slice.endpoints[0].addresses = vec![format!("10.127.255.{}", 200 + k)];
            let changed = rulesets(&state, &config);
            shadow.sync(changed.clone()).expect("shadow sync");
            let predicted = std::mem::take(&mut shadow.applier_mut().last_payload);
            let alone_first = k % 2 == 1;
            let mut alone_time = alone_first.then(|| restore_alone(&alone, backend, &predicted));
            syncer.applier_mut().restore_time = Duration::ZERO;
            syncer.applier_mut().other_time = Duration::ZERO;
            let start = Instant::now();
            let reports = syncer.sync(changed).expect("incremental sync");
            let sync_time = start.elapsed();
            assert!(!reports[0].full, "an incremental sync should be partial");
            let payload = std::mem::take(&mut syncer.applier_mut().last_payload);
            assert!(
                payload == predicted,
                "the shadow syncer predicted another payload"
            );
            if !alone_first {
                alone_time = Some(restore_alone(&alone, backend, &payload));
            }
            runs.push(Row {
                services,
                kind: "incremental",
                sync: sync_time,
                in_restore: syncer.applier().restore_time,
                in_other_tools: syncer.applier().other_time,
                alone: alone_time,
                objects: reports[0].objects,
                bytes: reports[0].bytes,
                chains_written: payload.lines().filter(|l| l.starts_with(':')).count(),
            });
        }
        let median = |f: fn(&Row) -> Duration| {
            let mut values: Vec<Duration> = runs.iter().map(f).collect();
            values.sort();
            values[values.len() / 2]
        };
        print_row(&Row {
            sync: median(|r| r.sync),
            in_restore: median(|r| r.in_restore),
            in_other_tools: median(|r| r.in_other_tools),
            alone: Some(median(|r| r.alone.unwrap_or_default())),
            ..runs.swap_remove(0)
        });
        eprintln!("done: {services} services");
    }
}

/// One table row, printed as soon as it is measured (a later size may take many minutes).
fn print_row(row: &Row) {
    let own = row.sync.saturating_sub(row.in_restore + row.in_other_tools);
    let (alone, overhead, percent) = match row.alone {
        Some(alone) => {
            let overhead = row.sync.as_secs_f64() - alone.as_secs_f64();
            (
                secs(alone),
                format!("{overhead:.3}"),
                format!("{:.1}%", 100.0 * overhead / alone.as_secs_f64()),
            )
        }
        None => ("—".into(), "—".into(), "—".into()),
    };
    println!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        row.services,
        row.kind,
        secs(row.sync),
        secs(row.in_restore),
        secs(row.in_other_tools),
        secs(own),
        alone,
        overhead,
        percent,
        row.objects,
        row.chains_written,
        row.bytes
    );
}
