//! Running the iptables tools. The syncer talks to the kernel only through [`Applier`], so a
//! recording fake serves unit tests and a wrapper can inject faults; [`SystemApplier`] runs
//! the real programs of one backend (nf_tables or legacy), optionally inside a network
//! namespace.

use std::os::unix::process::CommandExt;
use std::process::Command;

use crate::family::IpFamily;
use crate::sync::netlink::NetfilterSocket;
use crate::sync::run_tool;

/// Passed to every tool, as kube-proxy does (spec §4.1): wait up to 5 s for the xtables lock,
/// polling every 100 ms. (iptables 1.8.9 legacy ignores `-W` with a note on stderr.)
pub const WAIT_FLAGS: [&str; 4] = ["-w", "5", "-W", "100000"];

/// Flags of every `iptables-restore` call (§4.1): only declared chains are flushed.
pub const RESTORE_FLAGS: [&str; 2] = ["--noflush", "--counters"];

/// Which iptables backend to use (`--iptables-backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// The one the node already uses, found like kubernetes-sigs/iptables-wrappers does.
    #[default]
    Auto,
    Nft,
    Legacy,
}

/// A resolved backend: which programs to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-nft*`: rules kept by nf_tables.
    Nft,
    /// `iptables-legacy*`: the x_tables kernel interface.
    Legacy,
    /// The plain names (`iptables`, `iptables-restore`, …): whichever backend the system's
    /// alternative points to.
    System,
}

/// The three programs of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Iptables,
    Save,
    Restore,
}

impl Backend {
    /// The program name of `tool` for `family` (`ip6tables-nft-restore`, …).
    pub fn program(self, family: IpFamily, tool: Tool) -> &'static str {
        use {Backend::*, IpFamily::*, Tool::*};
        match (self, family, tool) {
            (Nft, V4, Iptables) => "iptables-nft",
            (Nft, V4, Save) => "iptables-nft-save",
            (Nft, V4, Restore) => "iptables-nft-restore",
            (Nft, V6, Iptables) => "ip6tables-nft",
            (Nft, V6, Save) => "ip6tables-nft-save",
            (Nft, V6, Restore) => "ip6tables-nft-restore",
            (Legacy, V4, Iptables) => "iptables-legacy",
            (Legacy, V4, Save) => "iptables-legacy-save",
            (Legacy, V4, Restore) => "iptables-legacy-restore",
            (Legacy, V6, Iptables) => "ip6tables-legacy",
            (Legacy, V6, Save) => "ip6tables-legacy-save",
            (Legacy, V6, Restore) => "ip6tables-legacy-restore",
            (System, V4, Iptables) => "iptables",
            (System, V4, Save) => "iptables-save",
            (System, V4, Restore) => "iptables-restore",
            (System, V6, Iptables) => "ip6tables",
            (System, V6, Save) => "ip6tables-save",
            (System, V6, Restore) => "ip6tables-restore",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
            Backend::System => "system default",
        })
    }
}

/// How a finished program ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Exit {
    /// `None` when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Exit {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// A finished run with this exit code and no output (for fakes).
    pub fn code(code: i32) -> Exit {
        Exit {
            code: Some(code),
            ..Exit::default()
        }
    }
}

/// A program could not be started at all.
#[derive(Debug, thiserror::Error)]
#[error("cannot run {program}: {source}")]
pub struct SpawnError {
    pub program: String,
    #[source]
    pub source: std::io::Error,
}

/// The kernel side of the iptables syncer: the three tools, one family at a time.
pub trait Applier {
    /// The program behind `tool`, for messages.
    fn program(&self, family: IpFamily, tool: Tool) -> String;

    /// `iptables-restore --noflush --counters -w 5 -W 100000`, fed `payload` on stdin.
    fn restore(&mut self, family: IpFamily, payload: &str) -> Result<Exit, SpawnError>;

    /// `iptables-save`, of one table or (`None`) of every table that exists; the latter
    /// creates no table, which matters for the legacy backend.
    fn save(&mut self, family: IpFamily, table: Option<&str>) -> Result<Exit, SpawnError>;

    /// One `iptables -w 5 -W 100000 ARGS` command.
    fn iptables(&mut self, family: IpFamily, args: &[&str]) -> Result<Exit, SpawnError>;

    /// A netlink socket where the rules live in nf_tables (the nft backend), so that the
    /// drift check can ask the kernel directly instead of starting `iptables`, which loads
    /// its whole table cache first (tens of milliseconds with thousands of Services). `None`
    /// where that is not possible: the legacy backend, an unknown namespace, a fake kernel.
    fn nf_tables_socket(&mut self) -> Option<std::io::Result<NetfilterSocket>> {
        None
    }
}

impl<A: Applier + ?Sized> Applier for crate::sync::Timed<'_, A> {
    fn program(&self, family: IpFamily, tool: Tool) -> String {
        self.inner.program(family, tool)
    }
    fn restore(&mut self, family: IpFamily, payload: &str) -> Result<Exit, SpawnError> {
        self.time(|a| a.restore(family, payload))
    }
    fn save(&mut self, family: IpFamily, table: Option<&str>) -> Result<Exit, SpawnError> {
        self.time(|a| a.save(family, table))
    }
    fn iptables(&mut self, family: IpFamily, args: &[&str]) -> Result<Exit, SpawnError> {
        self.time(|a| a.iptables(family, args))
    }
    fn nf_tables_socket(&mut self) -> Option<std::io::Result<NetfilterSocket>> {
        self.time(|a| a.nf_tables_socket())
    }
}

/// Runs the real programs of one backend.
#[derive(Debug, Clone)]
pub struct SystemApplier {
    backend: Backend,
    /// Prepended to every command line, e.g. `ip netns exec NAME`.
    prefix: Vec<String>,
    /// Where the commands run, for netlink: `Some(None)` in this process's namespace,
    /// `Some(Some(name))` in a named one, `None` when the prefix does something else.
    netns: Option<Option<String>>,
}

impl SystemApplier {
    /// The programs of `choice`, detecting the backend for [`BackendChoice::Auto`].
    pub fn new(choice: BackendChoice) -> SystemApplier {
        SystemApplier::with_command_prefix(choice, &[])
    }

    /// Like [`SystemApplier::new`], with every command (detection included) run through
    /// `prefix`, e.g. `["ip", "netns", "exec", "NAME"]` to work in another network namespace.
    pub fn with_command_prefix(choice: BackendChoice, prefix: &[&str]) -> SystemApplier {
        let prefix: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
        let backend = match choice {
            BackendChoice::Nft => Backend::Nft,
            BackendChoice::Legacy => Backend::Legacy,
            BackendChoice::Auto => detect_backend(&prefix),
        };
        let netns = netns_of_prefix(&prefix);
        SystemApplier {
            backend,
            prefix,
            netns,
        }
    }

    /// A resolved backend, no detection.
    pub fn for_backend(backend: Backend, prefix: &[&str]) -> SystemApplier {
        let prefix: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
        let netns = netns_of_prefix(&prefix);
        SystemApplier {
            backend,
            prefix,
            netns,
        }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    fn run(
        &self,
        family: IpFamily,
        tool: Tool,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<Exit, SpawnError> {
        run_program(
            &self.prefix,
            self.backend.program(family, tool),
            args,
            stdin,
        )
    }
}

impl Applier for SystemApplier {
    fn program(&self, family: IpFamily, tool: Tool) -> String {
        self.backend.program(family, tool).to_string()
    }

    fn restore(&mut self, family: IpFamily, payload: &str) -> Result<Exit, SpawnError> {
        let args: Vec<&str> = RESTORE_FLAGS.iter().chain(&WAIT_FLAGS).copied().collect();
        self.run(family, Tool::Restore, &args, Some(payload))
    }

    fn save(&mut self, family: IpFamily, table: Option<&str>) -> Result<Exit, SpawnError> {
        match table {
            Some(table) => self.run(family, Tool::Save, &["-t", table], None),
            None => self.run(family, Tool::Save, &[], None),
        }
    }

    fn iptables(&mut self, family: IpFamily, args: &[&str]) -> Result<Exit, SpawnError> {
        let all: Vec<&str> = WAIT_FLAGS
            .iter()
            .copied()
            .chain(args.iter().copied())
            .collect();
        self.run(family, Tool::Iptables, &all, None)
    }

    fn nf_tables_socket(&mut self) -> Option<std::io::Result<NetfilterSocket>> {
        // The system's plain `iptables` may be either backend: only a resolved nft one.
        if self.backend != Backend::Nft {
            return None;
        }
        let netns = self.netns.as_ref()?;
        Some(NetfilterSocket::open_in(netns.as_deref()))
    }
}

/// The network namespace a command prefix runs in, as [`SystemApplier::netns`] keeps it.
fn netns_of_prefix(prefix: &[String]) -> Option<Option<String>> {
    match prefix {
        [] => Some(None),
        [ip, netns, exec, name] if ip == "ip" && netns == "netns" && exec == "exec" => {
            Some(Some(name.clone()))
        }
        _ => None,
    }
}

/// Runs `prefix… program args…`, writing `stdin` from another thread so that a tool that
/// stops reading early (it found an error) cannot block us; its exit status tells.
fn run_program(
    prefix: &[String],
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<Exit, SpawnError> {
    let mut command = match prefix.split_first() {
        Some((first, rest)) => {
            let mut command = Command::new(first);
            command.args(rest).arg(program);
            command
        }
        None => Command::new(program),
    };
    command
        .args(args)
        // Tools print messages we parse (line numbers): keep them untranslated.
        .env("LC_ALL", "C");
    // iptables-nft-save 1.8.9 recurses deeply on large tables: with the usual 8 MiB stack it
    // dies of SIGSEGV reading the nat table of 10,000 Services, which would make every full
    // sync after the first fail. The tools get the largest stack the hard limit allows.
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // getrlimit/setrlimit, which are async-signal-safe; it allocates nothing.
    unsafe {
        command.pre_exec(|| {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_STACK, &mut limit) == 0 {
                limit.rlim_cur = limit.rlim_max;
                // Failing to raise it is not fatal: small tables need no more.
                libc::setrlimit(libc::RLIMIT_STACK, &limit);
            }
            Ok(())
        });
    }
    let spawn_error = |source| SpawnError {
        program: program.to_string(),
        source,
    };
    let output = run_tool(&mut command, stdin.map(str::as_bytes)).map_err(spawn_error)?;
    Ok(Exit {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// Chains whose presence in mangle tells which backend the node's Kubernetes components use:
/// kubelet's hint and canary (what kubernetes-sigs/iptables-wrappers looks for), and kproxy's
/// own canary, so that kproxy stays with the backend it used before.
const BACKEND_HINTS: [&str; 3] = [
    ":KUBE-IPTABLES-HINT ",
    ":KUBE-KUBELET-CANARY ",
    ":KUBE-PROXY-CANARY ",
];

fn has_backend_hint(save: &str) -> bool {
    save.lines()
        .any(|line| BACKEND_HINTS.iter().any(|hint| line.starts_with(hint)))
}

/// Finds the backend the node uses, the way kubernetes-sigs/iptables-wrappers does: hint
/// chains in nft's mangle table (either family) mean nft; in legacy's tables, legacy (the
/// legacy save reads every table because `-t mangle` would create that table); otherwise the
/// system's `iptables` alternative. Failures to run a tool count as "no hint".
pub fn detect_backend(prefix: &[String]) -> Backend {
    let hint = |backend: Backend, family: IpFamily, table: Option<&str>| {
        let args: &[&str] = match table {
            Some(table) => &["-t", table],
            None => &[],
        };
        run_program(prefix, backend.program(family, Tool::Save), args, None)
            .is_ok_and(|exit| exit.success() && has_backend_hint(&exit.stdout))
    };
    let families = [IpFamily::V4, IpFamily::V6];
    if families
        .iter()
        .any(|&family| hint(Backend::Nft, family, Some("mangle")))
    {
        return Backend::Nft;
    }
    if families
        .iter()
        .any(|&family| hint(Backend::Legacy, family, None))
    {
        return Backend::Legacy;
    }
    Backend::System
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_are_whole_chain_declarations() {
        assert!(has_backend_hint(
            "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n"
        ));
        assert!(has_backend_hint(
            "*mangle\n:KUBE-PROXY-CANARY - [0:0]\nCOMMIT\n"
        ));
        assert!(!has_backend_hint("*mangle\n:KUBE-IPTABLES-HINTS - [0:0]\n"));
        assert!(!has_backend_hint(
            "-A X -m comment --comment :KUBE-KUBELET-CANARY -j Y\n"
        ));
    }

    #[test]
    fn program_names_follow_backend_and_family() {
        assert_eq!(
            Backend::Nft.program(IpFamily::V6, Tool::Restore),
            "ip6tables-nft-restore"
        );
        assert_eq!(
            Backend::Legacy.program(IpFamily::V4, Tool::Save),
            "iptables-legacy-save"
        );
        assert_eq!(
            Backend::System.program(IpFamily::V4, Tool::Iptables),
            "iptables"
        );
    }
}
