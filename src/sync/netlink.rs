//! Netfilter over netlink (`NETLINK_NETFILTER`): one socket type for the conntrack cleanup and
//! the small nf_tables reads of the drift checks. Reading a chain through `nft` or `iptables`
//! loads much more than that chain (nft 1.0.6 fetches every set of the table first: 6 s at
//! 5,000 Services; iptables-nft its whole table cache), while these requests make the kernel
//! return just the chain or rules asked for, in well under a millisecond.
//!
//! Messages are the typed ones of `netlink-packet-netfilter`; this module only drives the
//! socket and answers yes/no questions about what the kernel holds. Large dumps are handed
//! over undecoded, as they arrive ([`NetfilterSocket::dump`]; the set element reader of
//! `nftables::element_dump`). Writes go in atomic batches ([`batch`]).

pub mod batch;

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use netlink_packet_core::{
    ErrorBuffer, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLMSG_DONE,
    NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN, NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use netlink_packet_netfilter::nftables::{
    ChainAttribute, ChainMessage, DataAttribute, ExpressionAttribute, Expressions, Immediate,
    ListAttribute, NfTablesMessage, RuleAttribute, RuleMessage, TableAttribute, TableMessage,
    Verdict, VerdictAttribute,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use crate::family::IpFamily;

/// `NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETCHAIN`, `… | NFT_MSG_GETRULE`.
const NFT_GET_CHAIN: u16 = (10 << 8) | 4;
/// `NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETTABLE`.
const NFT_GET_TABLE: u16 = (10 << 8) | 1;
const NFT_GET_RULE: u16 = (10 << 8) | 7;

/// The receive buffer of [`NetfilterSocket::dump`]. The kernel sizes the messages of a dump
/// to the largest buffer a `recv` on the socket has offered, up to 32 KiB (less its own
/// overhead), and an nf_tables dump restarts its walk of the set at every message, so bigger
/// messages make a large dump several times faster than `recv_from_full`'s exact-size reads.
const DUMP_RECEIVE_BYTES: usize = 64 * 1024;
/// The netlink header and the netfilter header (`nfgenmsg`) after it.
const NLMSG_HEADER_LEN: usize = 16;
const NFGENMSG_LEN: usize = 4;

/// How a dump ([`NetfilterSocket::dump`]) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DumpEnd {
    /// The kernel answered that what was asked for does not exist (`ENOENT`).
    Missing,
    /// Every answer came from one generation of the ruleset.
    Complete,
    /// The ruleset changed while the kernel was answering: it flagged an answer
    /// `NLM_F_DUMP_INTR`, or the ruleset generation in the answers' netfilter headers changed
    /// (any committed nf_tables transaction in the namespace changes it). The answers may have
    /// missed or repeated entries.
    Interrupted,
}

/// One answer of a dump, borrowed from the datagram it came in.
#[derive(Debug, Clone, Copy)]
pub struct DumpAnswer<'a> {
    /// Its netlink message type (`NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEW…`).
    pub message_type: u16,
    /// Its attributes: what follows the netfilter header.
    pub attributes: &'a [u8],
}

/// A netfilter netlink socket, bound to the network namespace it was opened in.
pub struct NetfilterSocket {
    socket: Socket,
    sequence: u32,
    /// Capped, extended acknowledgements were asked for ([`batch`]).
    batch_ready: bool,
    /// The buffer sizes last set for a batch (0: the defaults).
    send_buffer: usize,
    receive_buffer: usize,
}

impl NetfilterSocket {
    /// A socket in the calling thread's network namespace.
    pub fn open() -> io::Result<NetfilterSocket> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(NetfilterSocket {
            socket,
            sequence: 0,
            batch_ready: false,
            send_buffer: 0,
            receive_buffer: 0,
        })
    }

    /// A socket in the named network namespace (`/run/netns/NAME`), or in this thread's.
    /// A socket stays in the namespace it was made in, so a short-lived thread enters the
    /// namespace to make it and this thread is left alone.
    pub fn open_in(netns: Option<&str>) -> io::Result<NetfilterSocket> {
        let Some(name) = netns else {
            return NetfilterSocket::open();
        };
        let path = format!("/run/netns/{name}");
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let ns = File::open(&path)?;
                    // SAFETY: setns on a valid descriptor affects only the calling thread.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    NetfilterSocket::open()
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("netlink thread panicked")))
        })
    }

    /// Sends one request and hands every answer to `each` until the dump ends or the kernel
    /// acknowledges it; an error answer becomes the `Err`.
    pub fn request(
        &mut self,
        family: IpFamily,
        message_type: u16,
        flags: u16,
        inner: impl Into<NetfilterMessageInner>,
        mut each: impl FnMut(NetfilterMessage),
    ) -> io::Result<()> {
        self.send_request(family, message_type, flags, inner)?;
        loop {
            let (datagram, _) = self.socket.recv_from_full()?;
            let mut rest = datagram.as_slice();
            while !rest.is_empty() {
                let message = NetlinkMessage::<NetfilterMessage>::deserialize(rest)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                // Netlink messages are 4-byte aligned within a datagram.
                let length = (message.header.length as usize).next_multiple_of(4);
                rest = rest.get(length.max(4)..).unwrap_or(&[]);
                if message.header.sequence_number != self.sequence {
                    continue; // the answer to an earlier request that was given up on
                }
                match message.payload {
                    NetlinkPayload::InnerMessage(inner) => each(inner),
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(error) if error.code.is_none() => return Ok(()),
                    NetlinkPayload::Error(error) => return Err(error.to_io()),
                    _ => {}
                }
            }
        }
    }

    /// Sends one request under a new sequence number.
    fn send_request(
        &mut self,
        family: IpFamily,
        message_type: u16,
        flags: u16,
        inner: impl Into<NetfilterMessageInner>,
    ) -> io::Result<()> {
        self.sequence = self.sequence.wrapping_add(1);
        let proto = match family {
            IpFamily::V4 => NetfilterProtoFamily::IPv4,
            IpFamily::V6 => NetfilterProtoFamily::IPv6,
        };
        let mut header = NetlinkHeader::default();
        header.message_type = message_type;
        header.flags = flags;
        header.sequence_number = self.sequence;
        let payload = NetfilterMessage::new(NetfilterHeader::new(proto, 0, 0), inner);
        let mut message = NetlinkMessage::new(header, NetlinkPayload::from(payload));
        message.finalize();
        let mut buffer = vec![0; message.buffer_len()];
        message.serialize(&mut buffer);
        self.socket.send(&buffer, 0)?;
        Ok(())
    }

    /// Sends a dump request (`NLM_F_DUMP`) and hands each answer to `each` undecoded, as it
    /// arrives: for dumps too large to decode into typed messages first. Messages come in
    /// datagrams of up to 32 KiB (`DUMP_RECEIVE_BYTES`).
    ///
    /// An error from `each` ends the calls to it; the rest of the dump is still read (a
    /// socket with an unfinished dump refuses the next one with `EBUSY`), then that error is
    /// returned. A kernel error answer becomes the `Err`, except `ENOENT`:
    /// [`DumpEnd::Missing`] (answers handed over before it may have been given to `each`,
    /// when what was dumped went away during the dump).
    pub fn dump(
        &mut self,
        family: IpFamily,
        message_type: u16,
        inner: impl Into<NetfilterMessageInner>,
        mut each: impl FnMut(DumpAnswer<'_>) -> io::Result<()>,
    ) -> io::Result<DumpEnd> {
        self.send_request(family, message_type, NLM_F_REQUEST | NLM_F_DUMP, inner)?;
        let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidData, e);
        let mut buffer = vec![0u8; DUMP_RECEIVE_BYTES];
        let mut failed: Option<io::Error> = None;
        let mut generation: Option<u16> = None;
        let mut interrupted = false;
        loop {
            let received = self.receive(&mut buffer)?;
            let mut rest = buffer.get(..received).unwrap_or(&[]);
            while rest.len() >= NLMSG_HEADER_LEN {
                let message =
                    NetlinkBuffer::new_checked(rest).map_err(|e| invalid(e.to_string()))?;
                // Netlink messages are 4-byte aligned within a datagram.
                let length = (message.length() as usize).next_multiple_of(4);
                rest = rest.get(length.max(NLMSG_HEADER_LEN)..).unwrap_or(&[]);
                if message.sequence_number() != self.sequence {
                    continue; // the answer to an earlier request that was given up on
                }
                interrupted |= message.flags() & NLM_F_DUMP_INTR != 0;
                let errno = match message.message_type() {
                    NLMSG_NOOP | NLMSG_OVERRUN => continue,
                    // The end of the dump, with the dump's own error number (0 or negative).
                    NLMSG_DONE => message
                        .payload()
                        .get(..4)
                        .and_then(|b| <[u8; 4]>::try_from(b).ok())
                        .map_or(0, i32::from_ne_bytes),
                    NLMSG_ERROR => ErrorBuffer::new_checked(message.payload())
                        .map_err(|e| invalid(e.to_string()))?
                        .code()
                        .map_or(0, |code| code.get()),
                    message_type => {
                        let payload = message.payload();
                        // The netfilter header ends in `res_id`: the low 16 bits of the
                        // ruleset generation, big-endian.
                        let (Some(&[_, _, high, low]), Some(attributes)) =
                            (payload.get(..NFGENMSG_LEN), payload.get(NFGENMSG_LEN..))
                        else {
                            return Err(invalid(format!(
                                "a netfilter answer of {} bytes has no netfilter header",
                                payload.len()
                            )));
                        };
                        let this = u16::from_be_bytes([high, low]);
                        interrupted |= generation.is_some_and(|first| first != this);
                        generation.get_or_insert(this);
                        if failed.is_none() {
                            let answer = DumpAnswer {
                                message_type,
                                attributes,
                            };
                            failed = each(answer).err();
                        }
                        continue;
                    }
                };
                return match (failed, errno) {
                    (Some(error), _) => Err(error),
                    (None, 0) if interrupted => Ok(DumpEnd::Interrupted),
                    (None, 0) => Ok(DumpEnd::Complete),
                    (None, errno) if errno.saturating_abs() == libc::ENOENT => Ok(DumpEnd::Missing),
                    (None, errno) => Err(io::Error::from_raw_os_error(errno.saturating_abs())),
                };
            }
        }
    }

    /// One datagram into `buffer`; its length. A datagram larger than `buffer` is an error
    /// (its end was lost).
    fn receive(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut window = &mut buffer[..];
            match self.socket.recv(&mut window, libc::MSG_TRUNC) {
                Ok(length) if length > buffer.len() => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "a netlink datagram of {length} bytes did not fit the {} bytes of the receive buffer",
                            buffer.len()
                        ),
                    ))
                }
                Ok(length) => return Ok(length),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// [`NetfilterSocket::request`] about something that may not exist: `Ok(false)` when the
    /// kernel answers that it does not (ENOENT: no such table, chain or entry).
    pub fn request_if_present(
        &mut self,
        family: IpFamily,
        message_type: u16,
        flags: u16,
        inner: impl Into<NetfilterMessageInner>,
        each: impl FnMut(NetfilterMessage),
    ) -> io::Result<bool> {
        match self.request(family, message_type, flags, inner, each) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The number of rules in `table`'s `chain`; 0 when the table or chain does not exist.
    pub fn rule_count(&mut self, family: IpFamily, table: &str, chain: &str) -> io::Result<usize> {
        let mut rules = 0;
        self.rules(family, table, chain, |_| rules += 1)?;
        Ok(rules)
    }

    /// Whether `table` exists (a lookup of one table: `nft list tables` first reads every
    /// set element of every table).
    pub fn table_exists(&mut self, family: IpFamily, table: &str) -> io::Result<bool> {
        let request = NfTablesMessage::GetTable(TableMessage {
            attributes: vec![TableAttribute::Name(table.into())],
        });
        self.request_if_present(
            family,
            NFT_GET_TABLE,
            NLM_F_REQUEST | NLM_F_ACK,
            request,
            |_| {},
        )
    }

    /// Whether `table` holds `chain`.
    pub fn chain_exists(&mut self, family: IpFamily, table: &str, chain: &str) -> io::Result<bool> {
        let request = NfTablesMessage::GetChain(ChainMessage {
            attributes: vec![
                ChainAttribute::Table(table.into()),
                ChainAttribute::Name(chain.into()),
            ],
        });
        self.request_if_present(
            family,
            NFT_GET_CHAIN,
            NLM_F_REQUEST | NLM_F_ACK,
            request,
            |_| {},
        )
    }

    /// The names of every chain of `table`; none when the table does not exist.
    pub fn chain_names(&mut self, family: IpFamily, table: &str) -> io::Result<Vec<String>> {
        let request = NfTablesMessage::GetChain(ChainMessage {
            attributes: vec![ChainAttribute::Table(table.into())],
        });
        let mut names = Vec::new();
        self.request_if_present(
            family,
            NFT_GET_CHAIN,
            NLM_F_REQUEST | NLM_F_DUMP,
            request,
            |message| {
                if let NetfilterMessageInner::NfTables(NfTablesMessage::NewChain(chain)) =
                    &message.inner
                {
                    // Kernels that do not filter a chain dump by table send every table's.
                    let in_table = chain
                        .attributes
                        .iter()
                        .any(|a| matches!(a, ChainAttribute::Table(t) if t == table));
                    let name = chain.attributes.iter().find_map(|a| match a {
                        ChainAttribute::Name(name) => Some(name.clone()),
                        _ => None,
                    });
                    if let (true, Some(name)) = (in_table, name) {
                        names.push(name);
                    }
                }
            },
        )?;
        Ok(names)
    }

    /// Whether a rule of `table`'s `chain` jumps (or goes) to `target`; false when the table
    /// or chain does not exist.
    pub fn jumps_to(
        &mut self,
        family: IpFamily,
        table: &str,
        chain: &str,
        target: &str,
    ) -> io::Result<bool> {
        let mut found = false;
        self.rules(family, table, chain, |rule| {
            found |= rule_jumps_to(rule, target);
        })?;
        Ok(found)
    }

    /// How many rules of `table`'s `chain` jump (or go) to `target`; 0 when the table or
    /// chain does not exist.
    pub fn jumps_to_count(
        &mut self,
        family: IpFamily,
        table: &str,
        chain: &str,
        target: &str,
    ) -> io::Result<usize> {
        let mut count = 0;
        self.rules(family, table, chain, |rule| {
            count += usize::from(rule_jumps_to(rule, target));
        })?;
        Ok(count)
    }

    /// Hands each rule of one chain to `each`: a dump the kernel filters by table and chain.
    /// A missing table or chain has no rules.
    fn rules(
        &mut self,
        family: IpFamily,
        table: &str,
        chain: &str,
        mut each: impl FnMut(&RuleMessage),
    ) -> io::Result<()> {
        let request = NfTablesMessage::GetRule(RuleMessage {
            attributes: vec![
                RuleAttribute::Table(table.into()),
                RuleAttribute::Chain(chain.into()),
            ],
        });
        self.request_if_present(
            family,
            NFT_GET_RULE,
            NLM_F_REQUEST | NLM_F_DUMP,
            request,
            |message| {
                if let NetfilterMessageInner::NfTables(NfTablesMessage::NewRule(rule)) =
                    &message.inner
                {
                    each(rule);
                }
            },
        )
        .map(|_| ())
    }
}

/// Whether one of the rule's verdicts is a jump or goto to `target`.
fn rule_jumps_to(rule: &RuleMessage, target: &str) -> bool {
    let verdicts = rule
        .attributes
        .iter()
        .filter_map(|a| match a {
            RuleAttribute::Expressions(list) => Some(list),
            _ => None,
        })
        .flatten()
        .filter_map(|element| match element {
            ListAttribute::Element(expression) => Some(expression),
            _ => None,
        })
        .flatten()
        .flat_map(|expression| match expression {
            ExpressionAttribute::Data(Expressions::Immediate(fields)) => fields.as_slice(),
            _ => &[],
        })
        .filter_map(|field| match field {
            Immediate::Data(DataAttribute::Verdict(verdict)) => Some(verdict),
            _ => None,
        });
    verdicts.into_iter().any(|verdict| {
        let transfers = verdict.iter().any(|v| {
            matches!(
                v,
                VerdictAttribute::Code(Verdict::Jump) | VerdictAttribute::Code(Verdict::Goto)
            )
        });
        let to_target = verdict
            .iter()
            .any(|v| matches!(v, VerdictAttribute::Chain(chain) if chain == target));
        transfers && to_target
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule_with_verdict(code: Verdict, chain: &str) -> RuleMessage {
        RuleMessage {
            attributes: vec![
                RuleAttribute::Table("nat".into()),
                RuleAttribute::Expressions(vec![ListAttribute::Element(vec![
                    ExpressionAttribute::Name("immediate".into()),
                    ExpressionAttribute::Data(Expressions::Immediate(vec![Immediate::Data(
                        DataAttribute::Verdict(vec![
                            VerdictAttribute::Code(code),
                            VerdictAttribute::Chain(chain.into()),
                        ]),
                    )])),
                ])]),
            ],
        }
    }

    #[test]
    fn a_jump_or_goto_to_the_target_counts_and_nothing_else() {
        assert!(rule_jumps_to(
            &rule_with_verdict(Verdict::Jump, "KUBE-SERVICES"),
            "KUBE-SERVICES"
        ));
        assert!(rule_jumps_to(
            &rule_with_verdict(Verdict::Goto, "KUBE-SERVICES"),
            "KUBE-SERVICES"
        ));
        assert!(!rule_jumps_to(
            &rule_with_verdict(Verdict::Jump, "KUBE-NODEPORTS"),
            "KUBE-SERVICES"
        ));
        assert!(!rule_jumps_to(
            &rule_with_verdict(Verdict::Return, "KUBE-SERVICES"),
            "KUBE-SERVICES"
        ));
    }
}
