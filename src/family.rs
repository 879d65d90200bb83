//! IP family handling, defined once: which family an address or network belongs to, and the
//! family-specific spellings every backend needs.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// One IP family. kube-proxy runs one proxier per family; kproxy builds one model per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: &IpAddr) -> IpFamily {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    pub fn of_net(net: &IpNet) -> IpFamily {
        IpFamily::of(&net.addr())
    }

    /// The EndpointSlice `addressType` and Service `ipFamilies` spelling.
    pub fn api_name(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }

    /// The loopback network (`127.0.0.0/8`, `::1/128`).
    pub fn loopback_net(self) -> IpNet {
        match self {
            IpFamily::V4 => "127.0.0.0/8".parse().expect("constant network"),
            IpFamily::V6 => "::1/128".parse().expect("constant network"),
        }
    }

    /// The host prefix length (`/32`, `/128`).
    pub fn host_prefix(self) -> u8 {
        match self {
            IpFamily::V4 => 32,
            IpFamily::V6 => 128,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.api_name())
    }
}

/// Which families a node proxies (`--ip-family`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FamilyMode {
    V4,
    V6,
    Dual,
}

impl FamilyMode {
    pub fn families(self) -> &'static [IpFamily] {
        match self {
            FamilyMode::V4 => &[IpFamily::V4],
            FamilyMode::V6 => &[IpFamily::V6],
            FamilyMode::Dual => &[IpFamily::V4, IpFamily::V6],
        }
    }
}

/// Parses an IP address the way Kubernetes' `ParseIPSloppy` does: IPv4 octets with leading
/// zeros are read as decimal (`010.001.0.1` is `10.1.0.1`), which the API server accepted in
/// older releases. Surrounding whitespace is not accepted.
pub fn parse_ip_sloppy(text: &str) -> Option<IpAddr> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    if text.contains(':') {
        return None;
    }
    let mut octets = [0u8; 4];
    let mut parts = text.split('.');
    for octet in octets.iter_mut() {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *octet = part.parse().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(IpAddr::from(octets))
}

/// Parses a CIDR like `ParseCIDRSloppy` and returns its network form (`10.1.2.3/8` is
/// `10.0.0.0/8`), as kube-proxy prints source ranges.
pub fn parse_cidr_sloppy(text: &str) -> Option<IpNet> {
    let (addr, len) = text.split_once('/')?;
    let ip = parse_ip_sloppy(addr)?;
    if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let len: u8 = len.parse().ok()?;
    IpNet::new(ip, len).ok().map(|net| net.trunc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sloppy_ipv4_reads_leading_zeros_as_decimal() {
        assert_eq!(
            parse_ip_sloppy("172.30.0.041"),
            Some("172.30.0.41".parse().unwrap())
        );
        assert_eq!(
            parse_ip_sloppy("010.180.00.001"),
            Some("10.180.0.1".parse().unwrap())
        );
        assert_eq!(parse_ip_sloppy("1.2.3.256"), None);
        assert_eq!(parse_ip_sloppy("1.2.3"), None);
        assert_eq!(parse_ip_sloppy("1.2.3.4.5"), None);
        assert_eq!(parse_ip_sloppy(" 1.2.3.4"), None);
        assert_eq!(parse_ip_sloppy("1.2.3.0004"), None);
        assert_eq!(parse_ip_sloppy("fd00::1"), Some("fd00::1".parse().unwrap()));
        assert_eq!(parse_ip_sloppy("fd00::g"), None);
    }

    #[test]
    fn sloppy_cidr_is_truncated_to_network() {
        assert_eq!(
            parse_cidr_sloppy("203.0.113.000/025"),
            Some("203.0.113.0/25".parse().unwrap())
        );
        assert_eq!(
            parse_cidr_sloppy("10.1.2.3/8"),
            Some("10.0.0.0/8".parse().unwrap())
        );
        assert_eq!(parse_cidr_sloppy("10.0.0.0/33"), None);
        assert_eq!(parse_cidr_sloppy("10.0.0.0"), None);
        assert_eq!(
            parse_cidr_sloppy("fd00::/64"),
            Some("fd00::/64".parse().unwrap())
        );
    }
}
