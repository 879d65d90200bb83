//! Applying rulesets to the kernel: the last step of the pipeline, and the only one with I/O.
//!
//! Each mode has a syncer that remembers what it last committed, computes the difference to the
//! desired ruleset, and applies it in one atomic step per IP family through an applier (the
//! real tools, or a recording fake in tests). [`conntrack`] removes stale UDP flows after a
//! sync, as kube-proxy does.

pub mod conntrack;
pub mod iptables;
pub mod lock;
pub mod netlink;
pub mod nftables;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use crate::family::IpFamily;

/// Runs a prepared tool command with stdout and stderr captured, writing `stdin` from another
/// thread: a tool that answers before it has read all of a large payload, or fills its stderr
/// pipe, cannot deadlock against us. A failed write means the tool exited early; its status
/// and stderr say why, so the write error itself is dropped.
pub(crate) fn run_tool(command: &mut Command, stdin: Option<&[u8]>) -> std::io::Result<Output> {
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn()?;
    let pipe = child.stdin.take();
    std::thread::scope(|scope| {
        if let (Some(mut pipe), Some(text)) = (pipe, stdin) {
            scope.spawn(move || {
                let _ = pipe.write_all(text);
            });
        }
        child.wait_with_output()
    })
}

/// An applier (of either mode) that adds up the time spent in its calls: the kernel tools'
/// share of a sync, for reports and benchmarks.
pub(crate) struct Timed<'a, A: ?Sized> {
    pub inner: &'a mut A,
    pub spent: std::time::Duration,
}

impl<'a, A: ?Sized> Timed<'a, A> {
    pub fn new(inner: &'a mut A) -> Timed<'a, A> {
        Timed {
            inner,
            spent: std::time::Duration::ZERO,
        }
    }

    /// Runs one call of the inner applier, timing it.
    pub fn time<T>(&mut self, call: impl FnOnce(&mut A) -> T) -> T {
        let started = std::time::Instant::now();
        let result = call(self.inner);
        self.spent += started.elapsed();
        result
    }
}

/// What one sync of one family sent to the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncReport {
    pub family: IpFamily,
    /// Everything was rewritten (first sync, after a failure or a detected drift, periodic).
    pub full: bool,
    /// Objects the transaction touched: nft commands, or restore lines for iptables.
    pub objects: usize,
    /// Size of the text handed to the kernel tool.
    pub bytes: usize,
    /// How long the sync of this family took, kernel tool included.
    pub duration: std::time::Duration,
    /// The part of it spent in the kernel tools (and netlink requests).
    pub kernel: std::time::Duration,
    /// nftables: deleting stale chains was refused, so this sync was made a full one
    /// (kube-proxy's `nftables_cleanup_failures_total`).
    pub cleanup_failed: bool,
    /// nftables `maps` layout: affinity entries removed after the commit because they pinned
    /// clients to endpoints that are gone.
    pub pruned: usize,
}

impl SyncReport {
    /// A report of nothing done yet, for a sync of `family` that is not full.
    pub fn new(family: IpFamily) -> SyncReport {
        SyncReport {
            family,
            full: false,
            objects: 0,
            bytes: 0,
            duration: std::time::Duration::ZERO,
            kernel: std::time::Duration::ZERO,
            cleanup_failed: false,
            pruned: 0,
        }
    }
}

/// Why a sync or cleanup failed. The kernel keeps the rules it had before a failed transaction.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot run {tool}: {source} (is it installed, and are we root?)")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} refused the {family} transaction{object}: {message}", object = refused_object(.object))]
    Refused {
        tool: String,
        family: IpFamily,
        /// The object the tool named in its error, when it named one.
        object: Option<String>,
        message: String,
    },
    #[error("cannot read the {family} rules from the kernel with {tool}: {message}")]
    Read {
        tool: String,
        family: IpFamily,
        message: String,
    },
    /// Cleanup found rules that are not kproxy's jumping to its chains, and removed nothing.
    #[error("cannot remove kproxy's rules, nothing was removed: {} not kproxy's but jump{} to its chains ({}); delete {} (or point {} elsewhere), then run the cleanup again", held_count(.rules), if .rules.len() == 1 { "s" } else { "" }, .rules.join(", "), if .rules.len() == 1 { "that rule" } else { "those rules" }, if .rules.len() == 1 { "it" } else { "them" })]
    Held {
        /// Each rule as a command naming its table: `iptables-nft -t filter -A FORWARD …`.
        rules: Vec<String>,
    },
    #[error("cannot {action} the {family} UDP conntrack entries over netlink: {source} (root, or CAP_NET_ADMIN, is needed)")]
    Conntrack {
        action: &'static str,
        family: IpFamily,
        #[source]
        source: std::io::Error,
    },
}

fn held_count(rules: &[String]) -> String {
    match rules.len() {
        1 => "1 rule is".to_string(),
        n => format!("{n} rules are"),
    }
}

fn refused_object(object: &Option<String>) -> String {
    object
        .as_ref()
        .map(|o| format!(" at {o}"))
        .unwrap_or_default()
}

/// Syncs every family in turn. Families are independent: a failure of one does not stop the
/// others, and the first error is returned once all were attempted.
pub(crate) fn each_family<R>(
    rulesets: impl IntoIterator<Item = R>,
    mut sync_family: impl FnMut(R) -> Result<SyncReport, SyncError>,
) -> Result<Vec<SyncReport>, SyncError> {
    let mut reports = Vec::new();
    let mut first_error = None;
    for ruleset in rulesets {
        let started = std::time::Instant::now();
        match sync_family(ruleset) {
            Ok(report) => reports.push(SyncReport {
                duration: started.elapsed(),
                ..report
            }),
            Err(err) => {
                first_error.get_or_insert(err);
            }
        }
    }
    match first_error {
        Some(err) => Err(err),
        None => Ok(reports),
    }
}
