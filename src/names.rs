//! kube-proxy's chain and set names, in one place. Spec §4.3 (iptables) and §5.6 (nftables).

use data_encoding::BASE32;
use sha2::{Digest, Sha256};

use crate::model::{Endpoint, ServicePortName};

/// The first `len` characters of standard Base32 of SHA-256 over `input`.
fn hash_prefix(input: &str, len: usize) -> String {
    let digest = Sha256::digest(input.as_bytes());
    let mut encoded = BASE32.encode(&digest);
    encoded.truncate(len);
    encoded
}

/// The 16-character hash shared by a service port's iptables chains:
/// `base32(sha256("ns/name:port" + "tcp"))[..16]`.
pub fn iptables_port_hash(spn: &ServicePortName) -> String {
    hash_prefix(&format!("{spn}{}", spn.protocol.lower()), 16)
}

/// `KUBE-SEP-…` of one endpoint of a service port.
pub fn iptables_endpoint_chain(spn: &ServicePortName, endpoint: &Endpoint) -> String {
    let input = format!("{spn}{}{}", spn.protocol.lower(), endpoint.addr);
    format!("KUBE-SEP-{}", hash_prefix(&input, 16))
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
            zone_hints: vec![],
            node_hints: vec![],
        }
    }

    /// Vectors from kube-proxy's unit tests (spec §4.3) and the worked example (§12).
    #[test]
    fn iptables_hashes_match_kube_proxy() {
        assert_eq!(
            iptables_port_hash(&spn("ns1", "svc1", "p80")),
            "XPGD46QRK7WJZT7O"
        );
        assert_eq!(
            iptables_port_hash(&spn("ns5", "svc5", "p80")),
            "NUKIZ6OKUXPJNT4C"
        );
        assert_eq!(
            iptables_port_hash(&spn("ns2", "svc2", "p80")),
            "GNZBNJ2PO5MGZ6GT"
        );
        assert_eq!(
            iptables_port_hash(&spn("default", "my-service", "http")),
            "I37Z43XJW6BD4TLV"
        );
        assert_eq!(
            iptables_endpoint_chain(&spn("ns1", "svc1", "p80"), &endpoint("10.180.0.1:80")),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
        assert_eq!(
            iptables_endpoint_chain(&spn("ns5", "svc5", "p80"), &endpoint("10.180.0.3:80")),
            "KUBE-SEP-I77PXRDZVX7PMWMN"
        );
        assert_eq!(
            iptables_endpoint_chain(
                &spn("default", "my-service", "http"),
                &endpoint("10.244.3.9:80")
            ),
            "KUBE-SEP-DYNZSCM5I623GJVR"
        );
    }
}
