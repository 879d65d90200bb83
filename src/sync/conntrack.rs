//! Stale UDP conntrack entries (spec §7). UDP has no connection teardown, so a flow whose
//! backend went away keeps being sent to it until its conntrack entry expires; and packets sent
//! while a service had no endpoints leave entries that bypass the new DNAT rules. After a sync,
//! every UDP entry towards a service address whose reply source is not a serving endpoint is
//! deleted.
//!
//! Planning is pure ([`UdpTargets`], [`stale_flows`]); listing and deleting go through the
//! `conntrack` tool.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::process::Command;

use super::SyncError;
use crate::family::IpFamily;
use crate::model::{Protocol, ProxyModel};

/// For each UDP service address and NodePort, the endpoint IPs that may answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UdpTargets {
    pub by_ip: BTreeMap<IpAddr, BTreeSet<IpAddr>>,
    pub by_node_port: BTreeMap<u16, BTreeSet<IpAddr>>,
}

impl UdpTargets {
    /// Serving endpoints count, terminating ones included; traffic policies and topology do
    /// not matter here (§7 step 1).
    pub fn of(model: &ProxyModel) -> UdpTargets {
        let mut targets = UdpTargets::default();
        for port in model
            .ports
            .iter()
            .filter(|p| p.name.protocol == Protocol::Udp)
        {
            let serving: BTreeSet<IpAddr> = port
                .endpoints
                .iter()
                .filter(|e| e.serving)
                .map(|e| e.ip())
                .collect();
            let addresses = std::iter::once(port.cluster_ip)
                .chain(port.load_balancer_ips.iter().copied())
                .chain(port.external_ips.iter().copied());
            for ip in addresses {
                targets
                    .by_ip
                    .entry(ip)
                    .or_default()
                    .extend(serving.iter().copied());
            }
            if let Some(node_port) = port.node_port {
                targets
                    .by_node_port
                    .entry(node_port)
                    .or_default()
                    .extend(serving.iter().copied());
            }
        }
        targets
    }

    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty() && self.by_node_port.is_empty()
    }
}

/// The parts of a UDP conntrack entry that decide whether it is stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpFlow {
    pub original_destination: IpAddr,
    pub original_destination_port: u16,
    pub reply_source: IpAddr,
}

/// One `conntrack -D` filter: every UDP entry matching it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StaleFlows {
    ToServiceIp {
        service_ip: IpAddr,
        reply_source: IpAddr,
    },
    ToNodePort {
        node_port: u16,
        reply_source: IpAddr,
    },
}

/// The deletions that remove every stale flow among `flows` (§7 step 2), without duplicates.
pub fn stale_flows(targets: &UdpTargets, flows: &[UdpFlow]) -> Vec<StaleFlows> {
    let mut stale = BTreeSet::new();
    for flow in flows {
        if let Some(serving) = targets.by_ip.get(&flow.original_destination) {
            if !serving.contains(&flow.reply_source) {
                stale.insert(StaleFlows::ToServiceIp {
                    service_ip: flow.original_destination,
                    reply_source: flow.reply_source,
                });
            }
        }
        if let Some(serving) = targets.by_node_port.get(&flow.original_destination_port) {
            if !serving.contains(&flow.reply_source) {
                stale.insert(StaleFlows::ToNodePort {
                    node_port: flow.original_destination_port,
                    reply_source: flow.reply_source,
                });
            }
        }
    }
    stale.into_iter().collect()
}

/// Parses `conntrack -L -p udp` output: the first `dst=`/`dport=` are the original direction,
/// the second `src=` the reply direction. Lines that do not parse are skipped.
pub fn parse_flows(listing: &str) -> Vec<UdpFlow> {
    listing
        .lines()
        .filter(|line| line.starts_with("udp"))
        .filter_map(|line| {
            let mut sources = Vec::new();
            let mut destination = None;
            let mut destination_port = None;
            for token in line.split_whitespace() {
                if let Some(v) = token.strip_prefix("src=") {
                    sources.push(v.parse::<IpAddr>().ok()?);
                } else if let Some(v) = token.strip_prefix("dst=") {
                    if destination.is_none() {
                        destination = Some(v.parse::<IpAddr>().ok()?);
                    }
                } else if let Some(v) = token.strip_prefix("dport=") {
                    if destination_port.is_none() {
                        destination_port = Some(v.parse::<u16>().ok()?);
                    }
                }
            }
            Some(UdpFlow {
                original_destination: destination?,
                original_destination_port: destination_port?,
                reply_source: *sources.get(1)?,
            })
        })
        .collect()
}

/// Deletes UDP flows to a service address whose backend is no longer a serving endpoint.
/// Returns the number of deletions issued (each may remove several entries).
pub fn cleanup_stale_udp(models: &[ProxyModel]) -> Result<usize, SyncError> {
    let mut issued = 0;
    for model in models {
        let targets = UdpTargets::of(model);
        if targets.is_empty() {
            continue; // no UDP service: nothing can be stale, and no need to list the table
        }
        let family = family_flag(model.family);
        let listing = conntrack(&["-L", "-f", family, "-p", "udp"], model.family)?;
        for stale in stale_flows(&targets, &parse_flows(&listing)) {
            let (filter, value, reply_source) = match stale {
                StaleFlows::ToServiceIp {
                    service_ip,
                    reply_source,
                } => ("--orig-dst", service_ip.to_string(), reply_source),
                StaleFlows::ToNodePort {
                    node_port,
                    reply_source,
                } => ("--orig-port-dst", node_port.to_string(), reply_source),
            };
            let reply = reply_source.to_string();
            conntrack(
                &[
                    "-D",
                    "-f",
                    family,
                    "-p",
                    "udp",
                    filter,
                    &value,
                    "--reply-src",
                    &reply,
                ],
                model.family,
            )?;
            issued += 1;
        }
    }
    Ok(issued)
}

fn family_flag(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ipv4",
        IpFamily::V6 => "ipv6",
    }
}

/// Runs `conntrack`; "0 flow entries" (exit status 1) is not an error.
fn conntrack(args: &[&str], family: IpFamily) -> Result<String, SyncError> {
    let out = Command::new("conntrack")
        .args(args)
        .output()
        .map_err(|source| SyncError::Spawn {
            tool: "conntrack".into(),
            source,
        })?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && !stderr.contains(" 0 flow entries") {
        return Err(SyncError::Read {
            tool: format!("conntrack {}", args.join(" ")),
            family,
            message: stderr.trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = "\
udp      17 29 src=10.100.0.2 dst=10.96.0.10 sport=40001 dport=53 src=10.244.1.2 dst=10.100.0.2 sport=8080 dport=40001 mark=0 use=1
udp      17 29 src=10.100.0.3 dst=10.96.0.10 sport=40002 dport=53 [UNREPLIED] src=10.96.0.10 dst=10.100.0.3 sport=53 dport=40002 mark=0 use=1
udp      17 29 src=10.100.0.4 dst=10.100.0.1 sport=40003 dport=30053 src=10.244.3.2 dst=10.100.0.4 sport=8080 dport=40003 mark=0 use=1
udp      17 29 src=10.100.0.5 dst=10.0.0.99 sport=40004 dport=53 src=10.0.0.99 dst=10.100.0.5 sport=53 dport=40004 mark=0 use=1
tcp      6 431999 ESTABLISHED src=10.100.0.2 dst=10.96.0.10 sport=1 dport=53 src=10.244.9.9 dst=10.100.0.2 sport=53 dport=1 use=1
";

    #[test]
    fn parses_original_destination_and_reply_source() {
        let flows = parse_flows(LISTING);
        assert_eq!(flows.len(), 4, "TCP lines are not UDP flows: {flows:?}");
        assert_eq!(
            flows[0],
            UdpFlow {
                original_destination: "10.96.0.10".parse().unwrap(),
                original_destination_port: 53,
                reply_source: "10.244.1.2".parse().unwrap(),
            }
        );
        // A flow created while the service had no endpoints answers from the service IP.
        assert_eq!(
            flows[1].reply_source,
            "10.96.0.10".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn flows_to_gone_or_missing_backends_are_stale() {
        let mut targets = UdpTargets::default();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        targets
            .by_ip
            .insert(ip("10.96.0.10"), [ip("10.244.2.2")].into_iter().collect());
        targets
            .by_node_port
            .insert(30053, [ip("10.244.3.2")].into_iter().collect());
        let stale = stale_flows(&targets, &parse_flows(LISTING));
        assert_eq!(
            stale,
            vec![
                // The no-endpoint flow answered from the VIP; 10.244.1.2 no longer serves.
                // (Sorted by address.)
                StaleFlows::ToServiceIp {
                    service_ip: ip("10.96.0.10"),
                    reply_source: ip("10.96.0.10")
                },
                StaleFlows::ToServiceIp {
                    service_ip: ip("10.96.0.10"),
                    reply_source: ip("10.244.1.2")
                },
            ],
            "the NodePort flow goes to a serving endpoint; 10.0.0.99 is no service"
        );
    }
}
