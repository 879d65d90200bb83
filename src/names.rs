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
}
