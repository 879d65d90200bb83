//! What this network namespace has: its addresses, and which of them is the primary one. Read
//! by the CLI and the agent to fill in node settings the flags left open; the translators never
//! look at the machine themselves.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

use crate::config::{NodeConfig, NodePortAddresses};
use crate::family::IpFamily;

/// The namespace's global addresses (no loopback, no link-local), IPv4 first; within a family
/// the [`primary_address`] comes first, then the others in interface order.
pub fn addresses() -> Vec<IpAddr> {
    let mut addresses = interface_addresses();
    addresses.retain(|ip| is_global(*ip));
    let primaries = [primary_address(IpFamily::V4), primary_address(IpFamily::V6)];
    addresses.sort_by_key(|ip| (ip.is_ipv6(), !primaries.contains(&Some(*ip))));
    addresses.dedup();
    addresses
}

/// The address this namespace sends from by default in one family: the source address the
/// kernel picks for a route to a documentation address (RFC 5737 / RFC 3849). Connecting a UDP
/// socket only looks the route up; nothing is sent. `None` without a default route, or when the
/// route's source is not a global address.
pub fn primary_address(family: IpFamily) -> Option<IpAddr> {
    let (bind, probe): (SocketAddr, SocketAddr) = match family {
        IpFamily::V4 => (
            (Ipv4Addr::UNSPECIFIED, 0).into(),
            (Ipv4Addr::new(192, 0, 2, 1), 9).into(),
        ),
        IpFamily::V6 => (
            (Ipv6Addr::UNSPECIFIED, 0).into(),
            (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), 9).into(),
        ),
    };
    let socket = UdpSocket::bind(bind).ok()?;
    socket.connect(probe).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    is_global(ip).then_some(ip)
}

/// Neither loopback, unspecified nor link-local.
fn is_global(ip: IpAddr) -> bool {
    !ip.is_loopback()
        && !ip.is_unspecified()
        && match ip {
            IpAddr::V4(v4) => !v4.is_link_local(),
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
        }
}

/// Every address of every interface, from getifaddrs(3).
fn interface_addresses() -> Vec<IpAddr> {
    let mut addresses = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list that we only read and then free.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return addresses;
        }
        let mut entry = list;
        while !entry.is_null() {
            let addr = (*entry).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(addr as *const libc::sockaddr_in);
                        addresses.push(IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(addr as *const libc::sockaddr_in6);
                        addresses.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            entry = (*entry).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    addresses
}

/// NodePorts are limited to the primary node address of a family nobody knows the address of.
#[derive(Debug, thiserror::Error)]
#[error(
    "NodePorts are accepted only on the node's primary {family} address (--nodeport-addresses \
     primary{default_note}), which is unknown: there is no node IP of that family and no default \
     route to find it from. Pass --node-ip, or --nodeport-addresses with CIDRs"
)]
pub struct UnknownPrimaryAddress {
    pub family: IpFamily,
    default_note: &'static str,
}

/// Makes `primary` NodePort addresses concrete: a family proxied without a node IP takes this
/// namespace's [`primary_address`], which is added to the node IPs and returned; when there is
/// none, an error — an unknown primary address would open NodePorts on every address instead.
/// `default` is the mode's default for an unset `--nodeport-addresses` (nftables: `primary`).
pub fn resolve_primary_node_ips(
    config: &mut NodeConfig,
    default: Option<&NodePortAddresses>,
) -> Result<Vec<(IpFamily, IpAddr)>, UnknownPrimaryAddress> {
    let mut detected = Vec::new();
    if config.nodeport_addresses.as_ref().or(default) != Some(&NodePortAddresses::Primary) {
        return Ok(detected);
    }
    for &family in config.family_mode.families() {
        if config.primary_node_ip(family).is_some() {
            continue;
        }
        let ip = primary_address(family).ok_or(UnknownPrimaryAddress {
            family,
            default_note: if config.nodeport_addresses.is_none() {
                ", the nftables default"
            } else {
                ""
            },
        })?;
        config.node_ips.push(ip);
        detected.push((family, ip));
    }
    Ok(detected)
}
