//! The `kproxy` command line: parses flags, calls the library, reports. Nothing else.

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use kproxy::config::{MasqueradeMark, NodeConfig, NodePortAddresses};
use kproxy::family::{parse_cidr_sloppy, FamilyMode, IpFamily};
use kproxy::pipeline::{self, Mode};
use kproxy::source::Manifests;

#[derive(Parser)]
#[command(
    name = "kproxy",
    version,
    about = "A kube-proxy-compatible service proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the full ruleset for a set of manifests.
    Render {
        #[command(flatten)]
        common: Common,
        /// Manifest files or directories; `-` reads stdin.
        #[arg(required = true, value_name = "FILE|DIR|-")]
        inputs: Vec<PathBuf>,
    },
    /// Apply the rules for a set of manifests to this network namespace, then exit.
    Sync {
        /// Sync once and exit (the only form so far; `kproxy run` is the node agent).
        #[arg(long, required = true)]
        once: bool,
        #[command(flatten)]
        common: Common,
        /// Manifest files or directories; `-` reads stdin.
        #[arg(required = true, value_name = "FILE|DIR|-")]
        inputs: Vec<PathBuf>,
    },
    /// Remove every rule kproxy owns (both families), and nothing else.
    Cleanup {
        /// Rule backend.
        #[arg(long, value_enum, default_value = "iptables")]
        mode: ModeArg,
        /// iptables: which iptables to clean; `auto` cleans both nft and legacy.
        #[arg(long, value_enum, default_value = "auto")]
        iptables_backend: IptablesBackendArg,
    },
    /// Print a synthetic cluster (Services and EndpointSlices) as manifests, for benchmarks.
    Generate {
        /// Number of Services.
        #[arg(long, default_value_t = 10_000)]
        services: usize,
        /// Ready endpoints per Service.
        #[arg(long, default_value_t = 10)]
        endpoints: usize,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Iptables,
    Nftables,
}

#[derive(Clone, Copy, ValueEnum)]
enum IptablesBackendArg {
    Auto,
    Nft,
    Legacy,
}

impl IptablesBackendArg {
    fn choice(self) -> kproxy::sync::iptables::BackendChoice {
        use kproxy::sync::iptables::BackendChoice;
        match self {
            IptablesBackendArg::Auto => BackendChoice::Auto,
            IptablesBackendArg::Nft => BackendChoice::Nft,
            IptablesBackendArg::Legacy => BackendChoice::Legacy,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum FamilyArg {
    Ipv4,
    Ipv6,
    Dual,
}

#[derive(Args)]
struct Common {
    /// Rule backend.
    #[arg(long, value_enum, default_value = "iptables")]
    mode: ModeArg,
    /// Node name; endpoints with this `nodeName` are local. Default: this machine's hostname.
    #[arg(long)]
    hostname: Option<String>,
    /// Node address; the first of each family is the primary node IP. Repeatable.
    #[arg(long = "node-ip", value_name = "IP")]
    node_ips: Vec<IpAddr>,
    /// Pod network (the first per family tells pod traffic from other traffic). Repeatable.
    #[arg(long = "cluster-cidr", value_name = "CIDR")]
    cluster_cidrs: Vec<String>,
    /// A ServiceCIDR of the cluster; nftables drops traffic to its unallocated addresses.
    /// Repeatable.
    #[arg(long = "service-cidr", value_name = "CIDR")]
    service_cidrs: Vec<String>,
    /// Masquerade all traffic to cluster IPs.
    #[arg(long)]
    masquerade_all: bool,
    /// Where NodePorts are accepted: comma-separated CIDRs, or `primary`. Default: every address
    /// (iptables) or the primary node IP (nftables).
    #[arg(long, value_name = "CIDR,...")]
    nodeport_addresses: Option<String>,
    /// IP families to proxy.
    #[arg(long, value_enum, default_value = "ipv4")]
    ip_family: FamilyArg,
    /// This node's zone, for topology-aware routing hints.
    #[arg(long)]
    zone: Option<String>,
    /// Bit of the packet mark that requests masquerading.
    #[arg(long, default_value_t = 14, value_parser = clap::value_parser!(u8).range(0..32))]
    masquerade_bit: u8,
    /// iptables: accept NodePorts on 127.0.0.0/8 as kube-proxy does by default.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    iptables_localhost_nodeports: bool,
    /// iptables: the iptables backend; `auto` finds the one the node uses (kubelet's hint
    /// chains, else the `iptables` alternative).
    #[arg(long, value_enum, default_value = "auto")]
    iptables_backend: IptablesBackendArg,
    /// iptables: the host's iptables lacks `MASQUERADE --random-fully`.
    #[arg(long)]
    no_random_fully: bool,
    /// iptables: count into kube-proxy's nfacct counters (they must exist).
    #[arg(long)]
    nfacct_counters: bool,
    /// iptables: nf_conntrack_tcp_be_liberal is set, so INVALID packets are not dropped.
    #[arg(long)]
    conntrack_tcp_be_liberal: bool,
}

impl Common {
    fn node_config(&self) -> Result<NodeConfig> {
        let hostname = match &self.hostname {
            Some(name) => name.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .context("cannot read this machine's hostname; pass --hostname")?
                .trim()
                .to_string(),
        };
        let mut config = NodeConfig::new(hostname.to_lowercase());
        config.node_ips = self.node_ips.clone();
        config.cluster_cidrs = self
            .cluster_cidrs
            .iter()
            .map(|text| parse_cidr_arg(text, "--cluster-cidr"))
            .collect::<Result<_>>()?;
        config.service_cidrs = self
            .service_cidrs
            .iter()
            .map(|text| parse_cidr_arg(text, "--service-cidr"))
            .collect::<Result<_>>()?;
        config.masquerade_all = self.masquerade_all;
        config.nodeport_addresses = match self.nodeport_addresses.as_deref() {
            None => None,
            Some("primary") => Some(NodePortAddresses::Primary),
            Some(list) => Some(NodePortAddresses::Cidrs(
                list.split(',')
                    .filter(|s| !s.trim().is_empty())
                    .map(|text| parse_cidr_arg(text.trim(), "--nodeport-addresses"))
                    .collect::<Result<_>>()?,
            )),
        };
        config.family_mode = match self.ip_family {
            FamilyArg::Ipv4 => FamilyMode::V4,
            FamilyArg::Ipv6 => FamilyMode::V6,
            FamilyArg::Dual => FamilyMode::Dual,
        };
        config.zone = self.zone.clone();
        config.masquerade_mark = MasqueradeMark::from_bit(self.masquerade_bit);
        config.iptables.localhost_nodeports = self.iptables_localhost_nodeports;
        config.iptables.random_fully = !self.no_random_fully;
        config.iptables.nfacct_counters = self.nfacct_counters;
        config.iptables.conntrack_tcp_be_liberal = self.conntrack_tcp_be_liberal;
        Ok(config)
    }

    fn mode(&self) -> Mode {
        match self.mode {
            ModeArg::Iptables => Mode::Iptables,
            ModeArg::Nftables => Mode::Nftables,
        }
    }
}

fn parse_cidr_arg(text: &str, flag: &str) -> Result<IpNet> {
    match parse_cidr_sloppy(text) {
        Some(net) => Ok(net),
        None => bail!("{flag}: {text:?} is not a CIDR (like 10.244.0.0/16)"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("kproxy: {err:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Render { common, inputs } => render(&common, &inputs),
        Command::Sync {
            once: _,
            common,
            inputs,
        } => sync_once(&common, &inputs),
        Command::Cleanup {
            mode,
            iptables_backend,
        } => match mode {
            ModeArg::Iptables => kproxy::sync::iptables::cleanup_with(iptables_backend.choice()),
            ModeArg::Nftables => kproxy::sync::nftables::cleanup(&[IpFamily::V4, IpFamily::V6]),
        }
        .context("cleanup failed"),
        Command::Generate {
            services,
            endpoints,
        } => {
            let state = kproxy::synthetic::cluster(services, endpoints);
            let mut out = std::io::stdout().lock();
            kproxy::synthetic::write_manifests(&state, &mut out)
                .and_then(|()| out.flush())
                .context("cannot write the manifests")
        }
    }
}

/// Reads the inputs and builds the plan, reporting skipped objects on stderr.
fn read_plan(config: &NodeConfig, inputs: &[PathBuf]) -> Result<pipeline::Plan> {
    let manifests = Manifests::read_paths(inputs)?;
    let plan = pipeline::plan(&manifests.state, config);
    for note in manifests.notes.iter().chain(&plan.notes) {
        eprintln!("kproxy: {note}");
    }
    Ok(plan)
}

fn sync_once(common: &Common, inputs: &[PathBuf]) -> Result<()> {
    let config = common.node_config()?;
    let plan = read_plan(&config, inputs)?;
    let reports = match common.mode() {
        Mode::Iptables => kproxy::sync::iptables::sync_once_with(
            &pipeline::iptables_rulesets(&plan, &config),
            common.iptables_backend.choice(),
        ),
        Mode::Nftables => {
            kproxy::sync::nftables::sync_once(&pipeline::nftables_rulesets(&plan, &config))
        }
    }
    .context("sync failed; the rules the kernel had before are unchanged")?;
    for report in &reports {
        eprintln!(
            "kproxy: synced {}: {} sync, {} objects, {} bytes",
            report.family,
            if report.full { "full" } else { "partial" },
            report.objects,
            report.bytes
        );
    }
    let deleted = kproxy::sync::conntrack::cleanup_stale_udp(&plan.models)
        .context("removing stale UDP conntrack entries failed")?;
    if deleted > 0 {
        eprintln!("kproxy: deleted {deleted} stale UDP conntrack entries");
    }
    Ok(())
}

fn render(common: &Common, inputs: &[PathBuf]) -> Result<()> {
    let config = common.node_config()?;
    let plan = read_plan(&config, inputs)?;
    let text = match common.mode() {
        Mode::Iptables => {
            let rulesets = pipeline::iptables_rulesets(&plan, &config);
            let dual = rulesets.len() > 1;
            let mut text = String::new();
            for ruleset in rulesets {
                if dual {
                    let tool = match ruleset.family {
                        IpFamily::V4 => "iptables-restore",
                        IpFamily::V6 => "ip6tables-restore",
                    };
                    text.push_str(&format!("# {tool} input ({})\n", ruleset.family));
                }
                text.push_str(&ruleset.to_restore_text());
            }
            text
        }
        // Both families' tables in one script: `nft -f` accepts that as one transaction.
        Mode::Nftables => pipeline::nftables_rulesets(&plan, &config)
            .iter()
            .map(|ruleset| ruleset.to_nft_script())
            .collect(),
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("cannot write the rules to stdout")
}
