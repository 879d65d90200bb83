//! The `kproxy` command line: parses flags (and `run`'s configuration file), calls the
//! library, reports. Nothing else.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use crate::agent::config_file::{parse_duration, KubeProxyConfiguration};
use crate::agent::{AgentConfig, DetectLocal, Source};
use crate::backend::{self, BackendOptions, Mode};
use crate::config::{MasqueradeMark, NftablesLayout, NodeConfig, NodePortAddresses};
use crate::family::{parse_cidr_sloppy, FamilyMode, IpFamily};
use crate::model::Protocol;
use crate::pipeline;
use crate::source::kube::ApiServer;
use crate::source::{Manifests, Note};
use crate::sync::lock::NetnsLock;

#[derive(Parser)]
#[command(
    name = "kproxy",
    version,
    about = "A kube-proxy-compatible service proxy"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Print the full ruleset for a set of manifests.
    ///
    /// The output is for reading, diffing and testing: it is exactly what `kproxy sync` would
    /// make the kernel hold, but it is not a way to apply rules. Loaded by hand it does not
    /// work: `iptables-restore` of it creates chains that nothing jumps to (the jumps from the
    /// built-in chains are added by `sync`) and, without `--noflush`, flushes the host's own
    /// filter and nat rules; `nft -f` of it twice duplicates the base chains' rules. To apply
    /// rules, use `kproxy sync --once` (or the agent, `kproxy run`); to remove them, `kproxy
    /// cleanup`.
    Render {
        #[command(flatten)]
        common: Common,
        /// Manifest files or directories; `-` reads stdin.
        #[arg(required = true, value_name = "FILE|DIR|-")]
        inputs: Vec<PathBuf>,
    },
    /// Apply the rules for a set of manifests to this network namespace, then exit.
    Sync {
        /// Sync once and exit (the only form; `kproxy run` is the node agent).
        #[arg(long, required = true)]
        once: bool,
        /// Sync even when the input holds no usable Service, removing every service rule
        /// (without it such a sync is refused; `kproxy cleanup` removes all of kproxy's rules).
        #[arg(long)]
        allow_empty: bool,
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        lock: LockArg,
        /// Manifest files or directories; `-` reads stdin.
        #[arg(required = true, value_name = "FILE|DIR|-")]
        inputs: Vec<PathBuf>,
    },
    /// The node agent: watch the cluster (or a directory) and keep this node's rules in step.
    Run(Box<RunArgs>),
    /// Remove every rule kproxy owns (both families), and nothing else.
    Cleanup {
        /// Rule backend to clean [default: both].
        #[arg(long, value_enum)]
        mode: Option<ModeArg>,
        #[command(flatten)]
        lock: LockArg,
        /// iptables: which iptables to clean; `auto` cleans both nft and legacy.
        #[arg(long, value_enum, default_value = "auto")]
        iptables_backend: IptablesBackendArg,
    },
    /// Show where a packet goes through the rules: every rule it passes, the verdict, the
    /// endpoints with their odds, masquerading and session affinity.
    ///
    /// Over the rules rendered for the manifests given, or with `--live` over the rules and
    /// affinity state this network namespace holds now.
    Trace(Box<TraceArgs>),
    /// Print a synthetic cluster (Services and EndpointSlices) as manifests, for benchmarks.
    Generate {
        /// Number of Services.
        #[arg(long, default_value_t = 10_000)]
        services: usize,
        /// Ready endpoints per Service.
        #[arg(long, default_value_t = 10)]
        endpoints: usize,
        /// `yaml`: a multi-document YAML stream; `json`: one `v1` `List` of the same objects.
        #[arg(long, value_enum, default_value = "yaml")]
        output: ManifestFormat,
    },
}

/// How `generate` writes its manifests.
#[derive(Clone, Copy, ValueEnum)]
pub enum ManifestFormat {
    Yaml,
    Json,
}

#[derive(Args)]
pub struct TraceArgs {
    #[command(flatten)]
    common: Common,
    /// The client's address.
    #[arg(long, value_name = "IP")]
    src: IpAddr,
    /// Where the client connects: `IP:PORT` (`[IPv6]:PORT`).
    #[arg(long, value_name = "IP:PORT")]
    dst: SocketAddr,
    #[arg(long, value_enum, default_value = "tcp")]
    proto: ProtoArg,
    /// The packet is sent by a process on the node (OUTPUT) instead of arriving from outside
    /// (PREROUTING).
    #[arg(long)]
    from_node: bool,
    #[arg(long, value_enum, default_value = "text")]
    output: OutputArg,
    /// Trace over the rules and affinity state of this network namespace, not over manifests.
    #[arg(long, conflicts_with = "inputs")]
    live: bool,
    /// Manifest files or directories; `-` reads stdin.
    #[arg(value_name = "FILE|DIR|-", required_unless_present = "live")]
    inputs: Vec<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ProtoArg {
    Tcp,
    Udp,
    Sctp,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputArg {
    Text,
    Json,
}

/// How long a writer waits for another kproxy writing this network namespace's rules.
#[derive(Args, Clone, Copy)]
pub struct LockArg {
    /// Seconds to wait for another kproxy that is changing this network namespace's rules.
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0, value_parser = lock_timeout)]
    lock_timeout: f64,
}

fn lock_timeout(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && (0.0..=86_400.0).contains(&seconds) => Ok(seconds),
        _ => Err(format!(
            "{text:?} is not a number of seconds from 0 to 86400"
        )),
    }
}

/// Takes this network namespace's writer lock (src/sync/lock.rs), saying on stderr when it
/// has to wait.
fn lock_netns(seconds: f64) -> Result<NetnsLock> {
    let timeout = Duration::from_secs_f64(seconds);
    Ok(NetnsLock::acquire(timeout, |holder| {
        eprintln!(
            "kproxy: waiting up to {:.1}s for this network namespace's writer lock, held by {holder}", timeout.as_secs_f64()
        )
    })?)
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ModeArg {
    Iptables,
    Nftables,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum IptablesBackendArg {
    Auto,
    Nft,
    Legacy,
}

impl IptablesBackendArg {
    fn choice(self) -> crate::sync::iptables::BackendChoice {
        use crate::sync::iptables::BackendChoice;
        match self {
            IptablesBackendArg::Auto => BackendChoice::Auto,
            IptablesBackendArg::Nft => BackendChoice::Nft,
            IptablesBackendArg::Legacy => BackendChoice::Legacy,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum FamilyArg {
    Ipv4,
    Ipv6,
    Dual,
}

#[derive(Args)]
pub struct Common {
    /// Rule backend [default: iptables].
    #[arg(long, value_enum, alias = "proxy-mode")]
    mode: Option<ModeArg>,
    /// Node name; endpoints with this `nodeName` are local. Default: this machine's hostname.
    #[arg(long, alias = "hostname-override")]
    hostname: Option<String>,
    /// Node address; the first of each family is the primary node IP. Repeatable.
    #[arg(long = "node-ip", value_name = "IP")]
    node_ips: Vec<IpAddr>,
    /// Pod network (the first per family tells pod traffic from other traffic). Repeatable,
    /// or comma-separated.
    #[arg(long = "cluster-cidr", value_name = "CIDR", value_delimiter = ',', value_parser = cidr_flag)]
    cluster_cidrs: Vec<IpNet>,
    /// The cluster's service CIDRs, comma-separated, at most one per family (as
    /// kube-apiserver's --service-cluster-ip-range): cluster IPs outside them are refused, and
    /// nftables drops traffic to their unallocated addresses.
    #[arg(long = "service-cidr", value_name = "CIDR[,CIDR]", value_parser = parse_service_cidrs)]
    service_cidrs: Option<ServiceCidrs>,
    /// Masquerade all traffic to cluster IPs.
    #[arg(long)]
    masquerade_all: bool,
    /// Where NodePorts are accepted: comma-separated CIDRs, or `primary`. Default: every address
    /// (iptables) or the primary node IP (nftables).
    #[arg(long, value_name = "CIDR,...", value_parser = nodeport_addresses_flag)]
    nodeport_addresses: Option<NodePortAddresses>,
    /// IP families to proxy [default: ipv4].
    #[arg(long, value_enum)]
    ip_family: Option<FamilyArg>,
    /// This node's zone, for topology-aware routing hints.
    #[arg(long)]
    zone: Option<String>,
    /// Bit of the packet mark that requests masquerading [default: 14].
    #[arg(long, alias = "iptables-masquerade-bit", value_parser = clap::value_parser!(u8).range(0..32))]
    masquerade_bit: Option<u8>,
    /// iptables: accept NodePorts on 127.0.0.0/8 as kube-proxy does [default: true].
    #[arg(long, action = clap::ArgAction::Set, value_name = "BOOL")]
    iptables_localhost_nodeports: Option<bool>,
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
    /// nftables: kube-proxy's table layout, or `maps`: a fixed set of chains, sets and maps,
    /// every service port and endpoint an element (table `kproxy`; docs/maps-layout.md).
    /// Rendering and tracing only, for now.
    #[arg(long, value_enum, default_value = "kube-proxy")]
    nftables_layout: LayoutArg,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LayoutArg {
    KubeProxy,
    Maps,
}

impl LayoutArg {
    fn layout(self) -> NftablesLayout {
        match self {
            LayoutArg::KubeProxy => NftablesLayout::KubeProxy,
            LayoutArg::Maps => NftablesLayout::Maps,
        }
    }
}

/// `kproxy run`'s own flags (kube-proxy's names are accepted where they mean the same).
#[derive(Args)]
#[command(group = clap::ArgGroup::new("source").args(["kubeconfig", "master", "from_dir"]).multiple(true))]
pub struct RunArgs {
    #[command(flatten)]
    pub common: Common,
    /// The kubeconfig to reach the API server with. Without it, --master or --from-dir: the
    /// in-cluster service account, else $KUBECONFIG.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The API server's URL (overrides the kubeconfig's).
    #[arg(long, value_name = "URL")]
    pub master: Option<String>,
    /// Read Services and EndpointSlices from the manifests in this directory, re-read when it
    /// changes, instead of watching an API server.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kubeconfig", "master"])]
    pub from_dir: Option<PathBuf>,
    /// Where /healthz and /livez are served; empty disables [default: 0.0.0.0:10256].
    #[arg(long, value_name = "HOST:PORT")]
    pub healthz_bind_address: Option<String>,
    /// Where /metrics is served; empty disables [default: 127.0.0.1:10249].
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_bind_address: Option<String>,
    /// The shortest time between two syncs [default: 1s].
    #[arg(long, value_name = "DURATION", alias = "iptables-min-sync-period", value_parser = parse_duration)]
    pub min_sync_period: Option<Duration>,
    /// The longest time between two syncs [default: 30s]; a failed sync is retried within it.
    #[arg(long, value_name = "DURATION", alias = "iptables-sync-period", value_parser = parse_duration)]
    pub sync_period: Option<Duration>,
    /// A KubeProxyConfiguration file (kubeproxy.config.k8s.io/v1alpha1); flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Remove every rule kproxy owns (in both modes, as kube-proxy does) and exit, as
    /// `kproxy cleanup`.
    #[arg(long)]
    pub cleanup: bool,
    /// Seconds to wait for another kproxy that holds this network namespace's writer lock
    /// (an old instance ending during a rolling update) before giving up.
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0, value_parser = lock_timeout)]
    pub lock_timeout: f64,
    /// How local traffic is recognised: the --cluster-cidr ranges, or the Node's podCIDRs
    /// [default: ClusterCIDR].
    #[arg(long, value_enum)]
    pub detect_local_mode: Option<DetectLocalArg>,
    /// How long start-up waits for this node's Node object to have addresses.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub node_wait: Duration,
    /// Log verbosity as kube-proxy's --v: 0-1 info, 2-3 debug, 4 and more trace.
    #[arg(long = "v", short = 'v', value_name = "LEVEL", default_value_t = 0)]
    pub verbosity: u8,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DetectLocalArg {
    #[value(name = "ClusterCIDR")]
    ClusterCidr,
    #[value(name = "NodeCIDR")]
    NodeCidr,
}

impl Common {
    /// The mode: the flag, else the file's, else iptables.
    fn mode_with(&self, file: Option<&KubeProxyConfiguration>) -> Result<Mode> {
        if let Some(mode) = self.mode {
            return Ok(mode.mode());
        }
        match file.and_then(|f| f.mode.as_deref()) {
            None | Some("") | Some("iptables") => Ok(Mode::Iptables),
            Some("nftables") => Ok(Mode::Nftables),
            Some(other) => bail!(
                "the configuration file's mode {other:?} is not supported (iptables or nftables)"
            ),
        }
    }

    fn mode(&self) -> Mode {
        self.mode.map_or(Mode::Iptables, ModeArg::mode)
    }

    /// Completes the flags' node settings for a command that runs on this node: a `primary`
    /// NodePort address the flags leave open is taken from this network namespace when the
    /// input has NodePorts at all.
    fn resolve_node_ips_here(&self, config: &mut NodeConfig, manifests: &Manifests) -> Result<()> {
        if !has_node_ports(manifests) {
            return Ok(());
        }
        let mode_default = (self.mode() == Mode::Nftables).then_some(NodePortAddresses::Primary);
        for (family, ip) in crate::host::resolve_primary_node_ips(config, mode_default.as_ref())
            .map_err(|e| UsageError(e.to_string()))?
        {
            eprintln!(
                "kproxy: NodePorts are accepted on {ip}, this network namespace's primary {family} address (--node-ip chooses another)"
            );
        }
        Ok(())
    }

    /// The node settings from the flags, with the file's values where no flag was given.
    fn node_config_with(&self, file: Option<&KubeProxyConfiguration>) -> Result<NodeConfig> {
        let mode = self.mode_with(file)?;
        let settings = file
            .map(|f| f.mode_settings(mode.name()))
            .unwrap_or_default();
        let hostname = match self
            .hostname
            .clone()
            .or_else(|| file.and_then(|f| f.hostname_override.clone()))
            .filter(|name| !name.trim().is_empty())
        {
            Some(name) => name,
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .context("cannot read this machine's hostname; pass --hostname")?,
        };
        let mut config = NodeConfig::new(hostname.trim().to_lowercase());
        config.node_ips = self.node_ips.clone();
        config.cluster_cidrs = if self.cluster_cidrs.is_empty() {
            match file.and_then(|f| f.cluster_cidr.as_deref()) {
                Some(list) => cidr_list(list).context("the configuration file's clusterCIDR")?,
                None => Vec::new(),
            }
        } else {
            self.cluster_cidrs.clone()
        };
        config.service_cidrs = self
            .service_cidrs
            .as_ref()
            .map(|cidrs| cidrs.0.clone())
            .unwrap_or_default();
        config.masquerade_all = self.masquerade_all || settings.masquerade_all.unwrap_or(false);
        config.nodeport_addresses = match &self.nodeport_addresses {
            Some(addresses) => Some(addresses.clone()),
            None => match file.and_then(|f| f.node_port_addresses.as_ref()) {
                Some(list) if !list.is_empty() => Some(
                    parse_nodeport_addresses(&list.join(","))
                        .context("the configuration file's nodePortAddresses")?,
                ),
                _ => None,
            },
        };
        config.family_mode = match self.ip_family.unwrap_or(FamilyArg::Ipv4) {
            FamilyArg::Ipv4 => FamilyMode::V4,
            FamilyArg::Ipv6 => FamilyMode::V6,
            FamilyArg::Dual => FamilyMode::Dual,
        };
        check_node_ip_families(&config.node_ips, config.family_mode)?;
        config.zone = self.zone.clone();
        let bit = match (self.masquerade_bit, settings.masquerade_bit) {
            (Some(bit), _) => bit,
            (None, Some(bit)) => u8::try_from(bit)
                .ok()
                .filter(|b| *b < 32)
                .with_context(|| format!("masqueradeBit {bit} is not in 0..31"))?,
            (None, None) => 14,
        };
        config.masquerade_mark = MasqueradeMark::from_bit(bit);
        config.iptables.localhost_nodeports = self
            .iptables_localhost_nodeports
            .or(settings.localhost_node_ports)
            .unwrap_or(true);
        config.iptables.random_fully = !self.no_random_fully;
        config.iptables.nfacct_counters = self.nfacct_counters;
        config.iptables.conntrack_tcp_be_liberal = self.conntrack_tcp_be_liberal
            || file
                .and_then(|f| f.conntrack.as_ref())
                .and_then(|c| c.tcp_be_liberal)
                .unwrap_or(false);
        config.nftables_layout = self.nftables_layout.layout();
        Ok(config)
    }

    fn backend_options(&self, one_shot: bool) -> BackendOptions {
        BackendOptions {
            iptables: self.iptables_backend.choice(),
            one_shot,
            nftables_layout: self.nftables_layout.layout(),
        }
    }
}

impl ModeArg {
    fn mode(self) -> Mode {
        match self {
            ModeArg::Iptables => Mode::Iptables,
            ModeArg::Nftables => Mode::Nftables,
        }
    }
}

/// A flag value that cannot work with the others: reported like clap's own errors, with exit
/// status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// One CIDR of a CIDR flag.
fn cidr_flag(text: &str) -> std::result::Result<IpNet, String> {
    parse_cidr_sloppy(text.trim())
        .ok_or_else(|| format!("{text:?} is not a CIDR (like 10.244.0.0/16 or fd00:10::/56)"))
}

/// A comma-separated list of CIDRs, as configuration files write them.
fn cidr_list(list: &str) -> Result<Vec<IpNet>> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|text| cidr_flag(text).map_err(anyhow::Error::msg))
        .collect()
}

/// `--nodeport-addresses`: `primary`, or comma-separated CIDRs.
fn nodeport_addresses_flag(text: &str) -> std::result::Result<NodePortAddresses, String> {
    parse_nodeport_addresses(text).map_err(|e| e.to_string())
}

fn parse_nodeport_addresses(text: &str) -> Result<NodePortAddresses> {
    if text.trim() == "primary" {
        return Ok(NodePortAddresses::Primary);
    }
    Ok(NodePortAddresses::Cidrs(cidr_list(text).context(
        "want `primary` or comma-separated CIDRs (like 192.168.0.0/24,127.0.0.0/8)",
    )?))
}

/// The node IPs given must include one of each family proxied: a node IP of the other family
/// only would silently change which addresses accept NodePorts.
fn check_node_ip_families(node_ips: &[IpAddr], families: FamilyMode) -> Result<()> {
    if node_ips.is_empty() {
        return Ok(());
    }
    for &family in families.families() {
        if !node_ips.iter().any(|ip| IpFamily::of(ip) == family) {
            let given: Vec<String> = node_ips.iter().map(IpAddr::to_string).collect();
            return Err(UsageError(format!(
                "--node-ip {} has no {family} address, but --ip-family proxies {family}: add a \
                 --node-ip of that family, or choose another --ip-family",
                given.join(", ")
            ))
            .into());
        }
    }
    Ok(())
}

/// `--service-cidr`'s value.
#[derive(Clone, Debug)]
struct ServiceCidrs(Vec<IpNet>);

/// Comma-separated CIDRs, at most one per family; clap reports the error (status 2).
fn parse_service_cidrs(text: &str) -> std::result::Result<ServiceCidrs, String> {
    let mut cidrs: Vec<IpNet> = Vec::new();
    for part in text.split(',') {
        let net = parse_cidr_sloppy(part.trim())
            .ok_or_else(|| format!("{part:?} is not a CIDR (like 10.96.0.0/12)"))?;
        let family = crate::family::IpFamily::of_net(&net);
        if cidrs
            .iter()
            .any(|c| crate::family::IpFamily::of_net(c) == family)
        {
            return Err(format!(
                "more than one {family} CIDR; give at most one per family"
            ));
        }
        cidrs.push(net);
    }
    Ok(ServiceCidrs(cidrs))
}

/// `HOST:PORT` or a bare IP (the default port is added); empty disables the server.
fn bind_address(text: &str, default_port: u16, flag: &str) -> Result<Option<SocketAddr>> {
    if text.is_empty() {
        return Ok(None);
    }
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(Some(address));
    }
    match crate::family::parse_ip_sloppy(text) {
        Some(ip) => Ok(Some(SocketAddr::new(ip, default_port))),
        None => bail!("{flag}: {text:?} is not HOST:PORT (like 0.0.0.0:10256)"),
    }
}

impl RunArgs {
    /// The agent's configuration: flags, over the file's values, over kube-proxy's defaults.
    pub fn agent_config(&self) -> Result<AgentConfig> {
        let mut config_file = None;
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --config {}", path.display()))?;
                config_file = Some((path.clone(), text.clone()));
                let (file, ignored) = KubeProxyConfiguration::parse(&text)
                    .with_context(|| format!("--config {}", path.display()))?;
                if !ignored.is_empty() {
                    tracing::info!(
                        "{}: kproxy does not use the fields {}",
                        path.display(),
                        ignored.join(", ")
                    );
                }
                Some(file)
            }
            None => None,
        };
        let file = file.as_ref();
        let mode = self.common.mode_with(file)?;
        let settings = file
            .map(|f| f.mode_settings(mode.name()))
            .unwrap_or_default();
        let mut node = self.common.node_config_with(file)?;
        // nftables' platform default (§1.5): NodePorts on the primary node IP.
        if mode == Mode::Nftables && node.nodeport_addresses.is_none() {
            node.nodeport_addresses = Some(NodePortAddresses::Primary);
        }
        let period =
            |flag: Option<Duration>, file: Option<&String>, default: Duration| match (flag, file) {
                (Some(d), _) => Ok(d),
                (None, Some(text)) => parse_duration(text).map_err(anyhow::Error::msg),
                (None, None) => Ok(default),
            };
        let sync_period = period(
            self.sync_period,
            settings.sync_period.as_ref(),
            Duration::from_secs(30),
        )?;
        let min_sync_period = period(
            self.min_sync_period,
            settings.min_sync_period.as_ref(),
            Duration::from_secs(1),
        )?;
        if sync_period.is_zero() {
            bail!("--sync-period must be more than 0");
        }
        if min_sync_period > sync_period {
            bail!(
                "--min-sync-period ({min_sync_period:?}) must not be longer than --sync-period ({sync_period:?})"
            );
        }
        let healthz = self
            .healthz_bind_address
            .clone()
            .or_else(|| file.and_then(|f| f.healthz_bind_address.clone()))
            .unwrap_or_else(|| "0.0.0.0:10256".into());
        let metrics = self
            .metrics_bind_address
            .clone()
            .or_else(|| file.and_then(|f| f.metrics_bind_address.clone()))
            .unwrap_or_else(|| "127.0.0.1:10249".into());
        let detect_local = match (
            self.detect_local_mode,
            file.and_then(|f| f.detect_local_mode.as_deref()),
        ) {
            (Some(DetectLocalArg::NodeCidr), _) => DetectLocal::NodeCidr,
            (Some(DetectLocalArg::ClusterCidr), _) => DetectLocal::ClusterCidr,
            (None, None | Some("") | Some("ClusterCIDR")) => DetectLocal::ClusterCidr,
            (None, Some("NodeCIDR")) => DetectLocal::NodeCidr,
            (None, Some(other)) => {
                bail!("detectLocalMode {other:?} is not supported (ClusterCIDR or NodeCIDR)")
            }
        };
        let source = match &self.from_dir {
            Some(dir) => Source::Dir(dir.clone()),
            None => Source::ApiServer(ApiServer {
                kubeconfig: self.kubeconfig.clone().or_else(|| {
                    file.and_then(|f| f.client_connection.as_ref())
                        .and_then(|c| c.kubeconfig.clone())
                        .filter(|p| !p.is_empty())
                        .map(PathBuf::from)
                }),
                master: self.master.clone(),
            }),
        };
        Ok(AgentConfig {
            mode,
            node,
            source,
            detect_local,
            healthz_bind: bind_address(&healthz, 10256, "--healthz-bind-address")?,
            metrics_bind: bind_address(&metrics, 10249, "--metrics-bind-address")?,
            min_sync_period,
            sync_period,
            backend: self.common.backend_options(false),
            node_wait: self.node_wait,
            config_file,
            lock_timeout: Duration::from_secs_f64(self.lock_timeout),
        })
    }
}

/// Runs the command line; the exit status follows the design's contract (0, 1, 2 for bad
/// flags, which clap reports itself).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.downcast_ref::<UsageError>().is_some() => {
            eprintln!("kproxy: error: {err:#}");
            ExitCode::from(2)
        }
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
            allow_empty,
            common,
            lock,
            inputs,
        } => {
            let _lock = lock_netns(lock.lock_timeout)?;
            sync_once(&common, &inputs, allow_empty)
        }
        Command::Run(args) => run_agent(&args),
        Command::Trace(args) => trace(&args),
        Command::Cleanup {
            mode,
            lock,
            iptables_backend,
        } => cleanup(
            mode.map(ModeArg::mode),
            BackendOptions {
                iptables: iptables_backend.choice(),
                one_shot: true,
                ..BackendOptions::default()
            },
            lock.lock_timeout,
        ),
        Command::Generate {
            services,
            endpoints,
            output,
        } => {
            let state = crate::synthetic::cluster(services, endpoints)
                .context("cannot generate that cluster")?;
            let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
            match output {
                ManifestFormat::Yaml => crate::synthetic::write_manifests(&state, &mut out),
                ManifestFormat::Json => crate::synthetic::write_json_list(&state, &mut out),
            }
            .and_then(|()| out.flush())
            .context("cannot write the manifests")
        }
    }
}

fn run_agent(args: &RunArgs) -> Result<()> {
    let level = match args.verbosity {
        0 | 1 => "info",
        2 | 3 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KPROXY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("kproxy={level},warn")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    let config = args.agent_config()?;
    if args.cleanup {
        // kube-proxy's --cleanup removes the rules of every mode (agent spec §8).
        return cleanup(None, config.backend, args.lock_timeout);
    }
    crate::agent::run(config)
}

/// `kproxy cleanup` and `kproxy run --cleanup`: under the lock, removes what kproxy owns in
/// `mode`, or in both modes, and says what it removed.
fn cleanup(mode: Option<Mode>, options: BackendOptions, lock_seconds: f64) -> Result<()> {
    let _lock = lock_netns(lock_seconds)?;
    let modes = match mode {
        Some(mode) => vec![mode],
        None => vec![Mode::Iptables, Mode::Nftables],
    };
    let cleaned = backend::cleanup(&modes, options).context("cleanup failed")?;
    eprintln!("kproxy: {cleaned}");
    Ok(())
}

/// The plan for a set of inputs, and how many Services they held and how many of those were
/// skipped as invalid.
struct InputPlan {
    plan: pipeline::Plan,
    services_read: usize,
    services_skipped: usize,
}

/// Whether any Service read asks for a node port (valid or not: validation comes later).
fn has_node_ports(manifests: &Manifests) -> bool {
    manifests.state.services.iter().any(|service| {
        service.spec.as_ref().is_some_and(|spec| {
            matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"))
                || spec
                    .ports
                    .iter()
                    .flatten()
                    .any(|port| port.node_port.is_some())
        })
    })
}

/// Reads the inputs and builds the plan, reporting skipped objects on stderr.
fn read_plan(common: &Common, inputs: &[PathBuf]) -> Result<(NodeConfig, InputPlan)> {
    let mut config = common.node_config_with(None)?; // bad flags first, before reading anything
    let manifests = Manifests::read_paths(inputs)?;
    common.resolve_node_ips_here(&mut config, &manifests)?;
    let plan = pipeline::plan(&manifests.state, &config);
    let mut services_skipped = 0;
    for note in manifests.notes.iter().chain(&plan.notes) {
        if matches!(note, Note::Invalid { object, .. } if object.kind == "Service") {
            services_skipped += 1;
        }
        eprintln!("kproxy: {note}");
    }
    let input = InputPlan {
        plan,
        services_read: manifests.state.services.len(),
        services_skipped,
    };
    Ok((config, input))
}

fn sync_once(common: &Common, inputs: &[PathBuf], allow_empty: bool) -> Result<()> {
    let (config, input) = read_plan(common, inputs)?;
    if !allow_empty && input.services_skipped >= input.services_read {
        let what = if input.services_read == 0 {
            "the input holds no Service".to_string()
        } else {
            format!(
                "every Service in the input ({}) was skipped as invalid",
                input.services_read
            )
        };
        bail!(
            "refusing to sync: {what}, so the sync would remove every service rule on this \
             node; the rules are unchanged. Check the input paths; pass --allow-empty to sync \
             an empty cluster anyway, or use `kproxy cleanup` to remove kproxy's rules"
        );
    }
    let plan = input.plan;
    let mut backend = backend::system(common.mode(), common.backend_options(true));
    let mut failed = None;
    for family in backend.sync(&plan.models, &config) {
        match family.result {
            Ok(report) => eprintln!(
                "kproxy: synced {}: {} sync, {} objects, {} bytes",
                report.family,
                if report.full { "full" } else { "partial" },
                report.objects,
                report.bytes
            ),
            Err(err) => {
                failed.get_or_insert(err);
            }
        }
    }
    if let Some(err) = failed {
        return Err(anyhow::Error::new(err)
            .context("sync failed; the rules the kernel had before are unchanged"));
    }
    let deleted = crate::sync::conntrack::cleanup_stale_udp(&plan.models)
        .context("removing stale UDP conntrack entries failed")?;
    if deleted > 0 {
        eprintln!("kproxy: deleted {deleted} stale UDP conntrack entries");
    }
    Ok(())
}

fn trace(args: &TraceArgs) -> Result<()> {
    use crate::trace::{self, AffinityState, Host, Origin, Probe};
    let family = IpFamily::of(&args.src);
    if IpFamily::of(&args.dst.ip()) != family {
        return Err(UsageError(format!(
            "--src {} and --dst {} are of different IP families",
            args.src, args.dst
        ))
        .into());
    }
    let probe = Probe {
        src: args.src,
        dst: args.dst,
        protocol: match args.proto {
            ProtoArg::Tcp => Protocol::Tcp,
            ProtoArg::Udp => Protocol::Udp,
            ProtoArg::Sctp => Protocol::Sctp,
        },
        origin: if args.from_node {
            Origin::Node
        } else {
            Origin::Outside
        },
    };
    let mode = args.common.mode();
    let (rules, host, affinity, notes) = if args.live {
        let layout = args.common.nftables_layout.layout();
        let live =
            trace::live::read_with(mode, family, args.common.iptables_backend.choice(), layout)?;
        (live.rules, live.host, live.affinity, live.notes)
    } else {
        let (config, input) = read_plan(&args.common, &args.inputs)?;
        let models = &input.plan.models;
        let Some(index) = models.iter().position(|m| m.family == family) else {
            return Err(UsageError(format!(
                "the packet is {family} but the rules are rendered for {}; pass --ip-family",
                models
                    .iter()
                    .map(|m| m.family.to_string())
                    .collect::<Vec<_>>()
                    .join(" and ")
            ))
            .into());
        };
        let mut rules = trace::rendered_rules(mode, models, &config)?;
        let host = Host::new(config.node_ips.iter().copied());
        (
            rules.swap_remove(index),
            host,
            AffinityState::default(),
            Vec::new(),
        )
    };
    let traced = trace::trace(rules.as_ref(), &probe, &host, &affinity);
    let text = match args.output {
        OutputArg::Json => {
            let mut json = traced.to_json();
            json["mode"] = mode.name().into();
            json["notes"] = notes.into();
            format!("{json:#}\n")
        }
        OutputArg::Text => {
            let mut text = format!(
                "{} {} -> {}, {}; {} rules ({family}{})\n",
                probe.protocol.lower(),
                probe.src,
                crate::text::socket_string(probe.dst),
                if args.from_node {
                    "sent from the node (OUTPUT)"
                } else {
                    "arriving from outside the node (PREROUTING)"
                },
                mode.name(),
                if args.live { ", live" } else { "" }
            );
            text.push_str(&traced.to_text(probe.src));
            for note in notes {
                text.push_str(&format!("note: {note}\n"));
            }
            text
        }
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("cannot write the trace to stdout")
}

fn render(common: &Common, inputs: &[PathBuf]) -> Result<()> {
    let (config, input) = read_plan(common, inputs)?;
    let plan = input.plan;
    let text = common.mode().render(&plan.models, &config);
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("cannot write the rules to stdout")
}
