//! kube-proxy's chain and set names, in one place. Spec §4.3 (iptables) and §5.6 (nftables).

use data_encoding::BASE32;
use sha2::{Digest, Sha256};

use crate::model::{Endpoint, ServicePortName};

/// The first `len` characters of standard Base32 of SHA-256 over `input`. Base32 maps every
/// 5 bytes to 8 characters, so only the bytes that reach the prefix are encoded.
fn hash_prefix(input: &str, len: usize) -> String {
    let digest = Sha256::digest(input.as_bytes());
    let bytes = len.div_ceil(8) * 5;
    let mut encoded = BASE32.encode(&digest[..bytes.min(digest.len())]);
    encoded.truncate(len);
    encoded
}

/// The iptables chain names of one service port (§4.3).
pub struct IptablesPortNames {
    /// `ns/name:port` + protocol: the hash input of the port, and the prefix of its endpoints'.
    hash_input: String,
    /// The 16-character hash shared by the port's `KUBE-SVC/SVL/EXT/FW` chains.
    pub hash: String,
}

impl IptablesPortNames {
    pub fn new(spn: &ServicePortName) -> IptablesPortNames {
        let hash_input = format!("{spn}{}", spn.protocol.lower());
        let hash = hash_prefix(&hash_input, 16);
        IptablesPortNames { hash_input, hash }
    }

    /// `PREFIX-<hash>`, e.g. `KUBE-SVC-XPGD46QRK7WJZT7O`.
    pub fn chain(&self, prefix: &str) -> String {
        let mut name = String::with_capacity(prefix.len() + 17);
        name.push_str(prefix);
        name.push('-');
        name.push_str(&self.hash);
        name
    }

    /// `KUBE-SEP-…` of one endpoint: the hash of the port's input followed by `ip:port`.
    pub fn endpoint_chain(&self, endpoint: &Endpoint) -> String {
        let mut input = String::with_capacity(self.hash_input.len() + 48);
        input.push_str(&self.hash_input);
        crate::text::push_socket(&mut input, endpoint.addr);
        let mut name = String::with_capacity(25);
        name.push_str("KUBE-SEP-");
        name.push_str(&hash_prefix(&input, 16));
        name
    }
}

/// Longest nftables name base (knftables' 256-character limit minus room for a prefix such as
/// `endpoint-`), §5.6.
pub const NFTABLES_NAME_BASE_MAX: usize = 240;

/// kube-proxy's `hashAndTruncate`: `HASH8-name`, cut to [`NFTABLES_NAME_BASE_MAX`] bytes with a
/// trailing `...` when longer (§5.6). The hash keeps truncated names unique.
pub fn nftables_hash_and_truncate(name: &str) -> String {
    let mut base = format!("{}-{name}", hash_prefix(name, 8));
    if base.len() > NFTABLES_NAME_BASE_MAX {
        // Kubernetes names are ASCII; stepping back to a char boundary only guards odd input.
        let mut cut = NFTABLES_NAME_BASE_MAX - 3;
        while !base.is_char_boundary(cut) {
            cut -= 1;
        }
        base.truncate(cut);
        base.push_str("...");
    }
    base
}

/// The name base shared by a service port's nftables chains: `HASH8-ns/name/proto/port`, e.g.
/// `ULMVA6XW-ns1/svc1/tcp/p80` (an unnamed port leaves a trailing `/`).
pub fn nftables_port_base(spn: &ServicePortName) -> String {
    nftables_hash_and_truncate(&format!(
        "{}/{}/{}/{}",
        spn.namespace,
        spn.name,
        spn.protocol.lower(),
        spn.port
    ))
}

/// The name base of one endpoint's chain and affinity set:
/// `HASH8-ns/name/proto/port__ip/port`. IPv6 colons become dots, as `:` is not allowed in nft
/// names.
pub fn nftables_endpoint_base(spn: &ServicePortName, endpoint: &Endpoint) -> String {
    let ip = endpoint.ip().to_string().replace(':', ".");
    nftables_hash_and_truncate(&format!(
        "{}/{}/{}/{}__{ip}/{}",
        spn.namespace,
        spn.name,
        spn.protocol.lower(),
        spn.port,
        endpoint.addr.port()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    fn spn(ns: &str, name: &str, port: &str) -> ServicePortName {
        ServicePortName {
            namespace: ns.into(),
            name: name.into(),
            port: port.into(),
            protocol: Protocol::Tcp,
        }
    }

    fn endpoint(addr: &str) -> Endpoint {
        Endpoint {
            addr: addr.parse().unwrap(),
            ready: true,
            serving: true,
            terminating: false,
            local: false,
            hints: None,
        }
    }

    /// Vectors from kube-proxy's unit tests (spec §4.3) and the worked example (§12).
    #[test]
    fn iptables_hashes_match_kube_proxy() {
        let names = |ns, name, port| IptablesPortNames::new(&spn(ns, name, port));
        assert_eq!(
            names("ns1", "svc1", "p80").chain("KUBE-SVC"),
            "KUBE-SVC-XPGD46QRK7WJZT7O"
        );
        assert_eq!(names("ns5", "svc5", "p80").hash, "NUKIZ6OKUXPJNT4C");
        assert_eq!(names("ns2", "svc2", "p80").hash, "GNZBNJ2PO5MGZ6GT");
        assert_eq!(
            names("default", "my-service", "http").hash,
            "I37Z43XJW6BD4TLV"
        );
        assert_eq!(
            names("ns1", "svc1", "p80").endpoint_chain(&endpoint("10.180.0.1:80")),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
        assert_eq!(
            names("ns5", "svc5", "p80").endpoint_chain(&endpoint("10.180.0.3:80")),
            "KUBE-SEP-I77PXRDZVX7PMWMN"
        );
        assert_eq!(
            names("default", "my-service", "http").endpoint_chain(&endpoint("10.244.3.9:80")),
            "KUBE-SEP-DYNZSCM5I623GJVR"
        );
    }

    /// Vectors from kube-proxy's unit tests (spec §5.6), the conformance vectors and the worked
    /// example (§12).
    #[test]
    fn nftables_bases_match_kube_proxy() {
        assert_eq!(
            nftables_port_base(&spn("ns1", "svc1", "p80")),
            "ULMVA6XW-ns1/svc1/tcp/p80"
        );
        assert_eq!(
            nftables_port_base(&spn("ns5", "svc5", "p80")),
            "HVFWP5L3-ns5/svc5/tcp/p80"
        );
        assert_eq!(
            nftables_port_base(&spn("ns2", "svc2", "p8080")),
            "MHHHYRWA-ns2/svc2/tcp/p8080"
        );
        assert_eq!(
            nftables_port_base(&spn("default", "my-service", "http")),
            "6NGMIUMF-default/my-service/tcp/http"
        );
        assert_eq!(
            nftables_endpoint_base(&spn("ns1", "svc1", "p80"), &endpoint("10.180.0.1:80")),
            "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
        assert_eq!(
            nftables_endpoint_base(&spn("ns5", "svc5", "p80"), &endpoint("10.180.0.3:80")),
            "GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80"
        );
        let my_service = spn("default", "my-service", "http");
        assert_eq!(
            nftables_endpoint_base(&my_service, &endpoint("10.244.1.5:80")),
            "XEPWXLQR-default/my-service/tcp/http__10.244.1.5/80"
        );
        assert_eq!(
            nftables_endpoint_base(&my_service, &endpoint("10.244.2.7:80")),
            "6JB6M4VO-default/my-service/tcp/http__10.244.2.7/80"
        );
        assert_eq!(
            nftables_endpoint_base(&my_service, &endpoint("10.244.3.9:80")),
            "PY775XAY-default/my-service/tcp/http__10.244.3.9/80"
        );
    }

    #[test]
    fn nftables_unnamed_port_keeps_trailing_slash() {
        let base = nftables_port_base(&spn("ns", "svc", ""));
        assert!(base.ends_with("-ns/svc/tcp/"), "{base}");
        assert_eq!(base, nftables_hash_and_truncate("ns/svc/tcp/"));
    }

    /// IPv6 endpoints: colons become dots in the name, and the hash is taken over that form.
    #[test]
    fn nftables_ipv6_endpoint_uses_dots() {
        let base = nftables_endpoint_base(&spn("ns1", "svc1", "p80"), &endpoint("[fd00::1]:80"));
        assert_eq!(&base[8..], "-ns1/svc1/tcp/p80__fd00..1/80");
        assert_eq!(
            base,
            nftables_hash_and_truncate("ns1/svc1/tcp/p80__fd00..1/80")
        );
        assert!(!base.contains(':'));
    }

    #[test]
    fn nftables_long_names_are_cut_to_240_with_dots() {
        let long = "a".repeat(63);
        let name =
            format!("{long}/{long}/sctp/{long}__2001.db8.1111.2222.3333.4444.5555.6666/65535");
        let base = nftables_hash_and_truncate(&name);
        assert_eq!(base.len(), NFTABLES_NAME_BASE_MAX);
        assert!(base.ends_with("..."));
        // The hash is over the full name, so names differing only after the cut stay distinct.
        let other = nftables_hash_and_truncate(&name.replace("65535", "65534"));
        assert_eq!(base[9..237], other[9..237]);
        assert_ne!(base[..8], other[..8]);
        // Exactly at the limit nothing is cut.
        let fits = "b".repeat(NFTABLES_NAME_BASE_MAX - 9);
        assert_eq!(
            nftables_hash_and_truncate(&fits).len(),
            NFTABLES_NAME_BASE_MAX
        );
        assert!(!nftables_hash_and_truncate(&fits).ends_with("..."));
    }
}
