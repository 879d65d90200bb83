//! Addresses: read decimal-tolerant like the API server (api-validation.md §4.1), then judged
//! by class — the API server's endpoint-IP filter (§4.5) and kproxy's stricter policy for every
//! address it programs (§7.2/§7.3) — and cluster IPs by the service CIDRs (§7.1 item 2).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use super::syntax::{shorten, Check};
use crate::family::{parse_ip_sloppy, IpFamily};

/// An address class kproxy never programs: traffic to or from it would not be one ordinary
/// remote host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Unspecified,
    Loopback,
    LinkLocal,
    Multicast,
    Broadcast,
    /// `::ffff:a.b.c.d`: the API server reads it as the IPv4 address (§4.1), strict
    /// validation refuses it (§4.2); either way it does not mean what it says.
    Ipv4Mapped(Ipv4Addr),
}

impl Class {
    /// kproxy's policy for cluster, external, load-balancer and endpoint addresses: every
    /// class above (the API server only refuses some of them, and only for some fields).
    pub fn of(ip: IpAddr) -> Option<Class> {
        match ip {
            IpAddr::V4(v4) => class_v4(v4, true),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Some(Class::Ipv4Mapped(v4)),
                None => class_v6(v6, true),
            },
        }
    }

    /// The API server's own endpoint-IP filter (`ValidateEndpointIP`, §4.5): unspecified,
    /// loopback, link-local unicast and link-local multicast only, with IPv4-mapped
    /// addresses judged as IPv4.
    pub fn refused_by_api_server(ip: IpAddr) -> Option<Class> {
        match ip {
            IpAddr::V4(v4) => class_v4(v4, false),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => class_v4(v4, false),
                None => class_v6(v6, false),
            },
        }
    }
}

/// With `all`, kproxy's classes; without, only the API server's (§4.5 table).
fn class_v4(ip: Ipv4Addr, all: bool) -> Option<Class> {
    if ip.is_unspecified() {
        Some(Class::Unspecified)
    } else if ip.is_loopback() {
        Some(Class::Loopback)
    } else if ip.is_link_local() {
        Some(Class::LinkLocal)
    } else if ip.octets()[..3] == [224, 0, 0] || (all && ip.is_multicast()) {
        Some(Class::Multicast)
    } else if all && ip.is_broadcast() {
        Some(Class::Broadcast)
    } else {
        None
    }
}

fn class_v6(ip: Ipv6Addr, all: bool) -> Option<Class> {
    let first = ip.segments()[0];
    if ip.is_unspecified() {
        Some(Class::Unspecified)
    } else if ip.is_loopback() {
        Some(Class::Loopback)
    } else if first & 0xffc0 == 0xfe80 {
        Some(Class::LinkLocal)
    } else if ip.is_multicast() && (all || first & 0x000f == 0x0002) {
        // The API server's check is any multicast of link-local scope (ffX2::/16).
        Some(Class::Multicast)
    } else {
        None
    }
}

impl fmt::Display for Class {
    /// "is a loopback address (...)": what the address is, and why that matters.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Class::Unspecified => f.write_str("the unspecified address (it stands for any address)"),
            Class::Loopback => f.write_str("a loopback address (it would capture the node's own local traffic)"),
            Class::LinkLocal => f.write_str(
                "a link-local address (not routable off its link; 169.254.169.254 is the cloud metadata service)",
            ),
            Class::Multicast => f.write_str("a multicast address (a group, not one host)"),
            Class::Broadcast => f.write_str("the broadcast address (every host on the link)"),
            Class::Ipv4Mapped(v4) => write!(
                f,
                "an IPv4-mapped IPv6 address (the API server reads it as {v4}; write that instead)"
            ),
        }
    }
}

/// Parses one address field: `{field} "{text}" is not an IP address` when it does not parse.
pub fn parse(text: &str, field: impl fmt::Display) -> Check<IpAddr> {
    parse_ip_sloppy(text).ok_or_else(|| format!("{field} {:?} is not an IP address", shorten(text)))
}

/// Parses an address kproxy will program, refusing every [`Class`].
pub fn parse_programmable(text: &str, field: impl fmt::Display) -> Check<IpAddr> {
    let ip = parse(text, &field)?;
    match Class::of(ip) {
        Some(class) => Err(format!("{field} {:?} is {class}", shorten(text))),
        None => Ok(ip),
    }
}

/// A cluster IP must lie in a service CIDR of its family, when any is configured, and not be
/// its network address nor (IPv4) its broadcast address — the allocator hands out neither
/// (§7.1 item 2).
pub fn check_service_cidr(
    ip: IpAddr,
    text: &str,
    field: impl fmt::Display,
    service_cidrs: &[IpNet],
) -> Check<()> {
    let family = IpFamily::of(&ip);
    let cidrs: Vec<&IpNet> = service_cidrs
        .iter()
        .filter(|net| IpFamily::of_net(net) == family)
        .collect();
    if cidrs.is_empty() {
        return Ok(());
    }
    let text = shorten(text);
    match cidrs.iter().find(|net| net.contains(&ip)) {
        Some(net) if ip == net.network() => Err(format!(
            "{field} {text:?} is the network address of the service CIDR {net}, which is never allocated"
        )),
        Some(net) if family == IpFamily::V4 && ip == net.broadcast() => Err(format!(
            "{field} {text:?} is the broadcast address of the service CIDR {net}, which is never allocated"
        )),
        Some(_) => Ok(()),
        None => {
            let list: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
            Err(format!(
                "{field} {text:?} is outside the service CIDR {} (--service-cidr); the API server allocates cluster IPs only from it",
                list.join(", ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("a test address")
    }

    #[test]
    fn the_api_servers_filter_is_narrower_than_kproxys() {
        // §4.6's examples, and the edges of each class.
        for (text, api, kproxy) in [
            ("10.0.0.1", None, None),
            ("127.0.0.1", Some(Class::Loopback), Some(Class::Loopback)),
            (
                "::ffff:127.0.0.1",
                Some(Class::Loopback),
                Some(Class::Ipv4Mapped(Ipv4Addr::new(127, 0, 0, 1))),
            ),
            (
                "::ffff:10.0.0.1",
                None,
                Some(Class::Ipv4Mapped(Ipv4Addr::new(10, 0, 0, 1))),
            ),
            ("ff12::1", Some(Class::Multicast), Some(Class::Multicast)),
            ("ff05::1", None, Some(Class::Multicast)),
            (
                "224.0.0.255",
                Some(Class::Multicast),
                Some(Class::Multicast),
            ),
            ("224.0.1.1", None, Some(Class::Multicast)),
            ("239.1.1.1", None, Some(Class::Multicast)),
            ("255.255.255.255", None, Some(Class::Broadcast)),
            (
                "0.0.0.0",
                Some(Class::Unspecified),
                Some(Class::Unspecified),
            ),
            ("0.0.0.1", None, None),
            ("::", Some(Class::Unspecified), Some(Class::Unspecified)),
            ("::1", Some(Class::Loopback), Some(Class::Loopback)),
            ("::1.2.3.4", None, None),
            (
                "169.254.169.254",
                Some(Class::LinkLocal),
                Some(Class::LinkLocal),
            ),
            ("febf::1", Some(Class::LinkLocal), Some(Class::LinkLocal)),
            ("fec0::1", None, None),
            ("100.64.0.1", None, None),
        ] {
            assert_eq!(Class::refused_by_api_server(ip(text)), api, "{text}");
            assert_eq!(Class::of(ip(text)), kproxy, "{text}");
        }
    }

    #[test]
    fn service_cidr_bounds() {
        let cidrs: Vec<IpNet> = vec![
            "10.96.0.0/16".parse().unwrap(),
            "fd00::/120".parse().unwrap(),
        ];
        assert!(check_service_cidr(ip("10.96.0.1"), "10.96.0.1", "f", &cidrs).is_ok());
        assert!(check_service_cidr(ip("10.96.255.254"), "x", "f", &cidrs).is_ok());
        assert!(check_service_cidr(ip("10.96.255.255"), "x", "f", &cidrs).is_err());
        assert!(check_service_cidr(ip("10.96.0.0"), "x", "f", &cidrs).is_err());
        assert!(check_service_cidr(ip("10.97.0.1"), "x", "f", &cidrs).is_err());
        // The last address of an IPv6 range is usable; the first is not.
        assert!(check_service_cidr(ip("fd00::ff"), "x", "f", &cidrs).is_ok());
        assert!(check_service_cidr(ip("fd00::"), "x", "f", &cidrs).is_err());
        // No CIDR of the family: no check.
        assert!(check_service_cidr(ip("10.0.0.1"), "x", "f", &cidrs[1..]).is_ok());
    }
}
