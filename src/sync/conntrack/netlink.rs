//! The conntrack table over ctnetlink: a dump of one family's entries and the deletion of
//! single entries by their original tuple, as kube-proxy does it through its netlink library.

use std::io;
use std::net::IpAddr;

use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Tuple,
};
use netlink_packet_netfilter::NetfilterMessageInner;

use super::{FlowTuple, UdpFlow};
use crate::family::IpFamily;
use crate::sync::netlink::NetfilterSocket;

/// `NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET`, `… | IPCTNL_MSG_CT_DELETE`.
const CT_GET: u16 = (1 << 8) | 1;
const CT_DELETE: u16 = (1 << 8) | 2;

/// The conntrack table of the calling thread's network namespace.
pub struct ConntrackTable {
    socket: NetfilterSocket,
}

impl ConntrackTable {
    pub fn open() -> io::Result<ConntrackTable> {
        Ok(ConntrackTable {
            socket: NetfilterSocket::open()?,
        })
    }

    /// Every UDP entry of `family`; entries of other protocols are left out.
    pub fn udp_flows(&mut self, family: IpFamily) -> io::Result<Vec<UdpFlow>> {
        let mut flows = Vec::new();
        let request = ConntrackMessage::Get(Vec::new());
        self.socket.request(
            family,
            CT_GET,
            NLM_F_REQUEST | NLM_F_DUMP,
            request,
            |message| {
                if let NetfilterMessageInner::Conntrack(
                    ConntrackMessage::New(attributes) | ConntrackMessage::Get(attributes),
                ) = &message.inner
                {
                    flows.extend(udp_flow(attributes));
                }
            },
        )?;
        Ok(flows)
    }

    /// Deletes the entry with this original tuple. `Ok(false)` when it is already gone
    /// (it expired or another process deleted it since the dump).
    pub fn delete(&mut self, flow: &FlowTuple) -> io::Result<bool> {
        let family = IpFamily::of(&flow.destination);
        let request = ConntrackMessage::Delete(vec![ConntrackAttribute::CtaTupleOrig(vec![
            Tuple::Ip(vec![
                IPTuple::SourceAddress(flow.source),
                IPTuple::DestinationAddress(flow.destination),
            ]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(Protocol::Udp),
                ProtoTuple::SourcePort(flow.source_port),
                ProtoTuple::DestinationPort(flow.destination_port),
            ]),
        ])]);
        self.socket.request_if_present(
            family,
            CT_DELETE,
            NLM_F_REQUEST | NLM_F_ACK,
            request,
            |_| {},
        )
    }
}

/// The UDP flow an entry's attributes describe, if it is one.
fn udp_flow(attributes: &[ConntrackAttribute]) -> Option<UdpFlow> {
    let mut original = None;
    let mut reply_source = None;
    for attribute in attributes {
        match attribute {
            ConntrackAttribute::CtaTupleOrig(tuple) => original = Some(flow_tuple(tuple)?),
            ConntrackAttribute::CtaTupleReply(tuple) => {
                reply_source = Some(flow_tuple(tuple)?.source);
            }
            _ => {}
        }
    }
    Some(UdpFlow {
        original: original?,
        reply_source: reply_source?,
    })
}

/// A UDP tuple's addresses and ports; `None` for other protocols.
fn flow_tuple(tuple: &[Tuple]) -> Option<FlowTuple> {
    let (mut source, mut destination) = (None::<IpAddr>, None::<IpAddr>);
    let (mut udp, mut source_port, mut destination_port) = (false, None, None);
    for part in tuple {
        match part {
            Tuple::Ip(addresses) => {
                for address in addresses {
                    match address {
                        IPTuple::SourceAddress(ip) => source = Some(*ip),
                        IPTuple::DestinationAddress(ip) => destination = Some(*ip),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(fields) => {
                for field in fields {
                    match field {
                        ProtoTuple::Protocol(p) => udp = *p == Protocol::Udp,
                        ProtoTuple::SourcePort(p) => source_port = Some(*p),
                        ProtoTuple::DestinationPort(p) => destination_port = Some(*p),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    udp.then_some(())?;
    Some(FlowTuple {
        source: source?,
        destination: destination?,
        source_port: source_port?,
        destination_port: destination_port?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(protocol: Protocol, source: &str, destination: &str, ports: (u16, u16)) -> Vec<Tuple> {
        vec![
            Tuple::Ip(vec![
                IPTuple::SourceAddress(source.parse().unwrap()),
                IPTuple::DestinationAddress(destination.parse().unwrap()),
            ]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(protocol),
                ProtoTuple::SourcePort(ports.0),
                ProtoTuple::DestinationPort(ports.1),
            ]),
        ]
    }

    #[test]
    fn a_dumped_udp_entry_gives_its_original_tuple_and_reply_source() {
        let attributes = vec![
            ConntrackAttribute::CtaTupleOrig(tuple(
                Protocol::Udp,
                "10.100.0.2",
                "10.96.0.10",
                (40001, 53),
            )),
            ConntrackAttribute::CtaTupleReply(tuple(
                Protocol::Udp,
                "10.244.1.2",
                "10.100.0.2",
                (8080, 40001),
            )),
            ConntrackAttribute::CtaTimeout(29),
        ];
        let flow = udp_flow(&attributes).expect("a UDP flow");
        assert_eq!(
            flow.original,
            FlowTuple {
                source: "10.100.0.2".parse().unwrap(),
                destination: "10.96.0.10".parse().unwrap(),
                source_port: 40001,
                destination_port: 53,
            }
        );
        assert_eq!(flow.reply_source, "10.244.1.2".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn tcp_entries_are_not_udp_flows() {
        let attributes = vec![
            ConntrackAttribute::CtaTupleOrig(tuple(Protocol::Tcp, "10.0.0.1", "10.0.0.2", (1, 53))),
            ConntrackAttribute::CtaTupleReply(tuple(
                Protocol::Tcp,
                "10.0.0.2",
                "10.0.0.1",
                (53, 1),
            )),
        ];
        assert_eq!(udp_flow(&attributes), None);
    }
}
