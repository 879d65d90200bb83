//! nfnetlink batches: nf_tables messages sent between `NFNL_MSG_BATCH_BEGIN` and
//! `NFNL_MSG_BATCH_END` in one `send`, which the kernel applies as one transaction — all of
//! them or none (nfnetlink's batch handling, `net/netfilter/nfnetlink.c`).
//!
//! The kernel processes a batch inside the `send` call and queues its answers before `send`
//! returns: one error for each refused message (in batch order, after the whole batch was
//! looked at, so every refused message is reported) and an acknowledgement for each message
//! that asked for one. Only the last message asks, so a committed batch answers with exactly
//! one acknowledgement and a refused one with its errors. Errors come with the kernel's
//! extended acknowledgement: a message text and the offset of the attribute it refused,
//! which lets the caller name the element (see [`Nack::offset`]).
//!
//! A batch must reach the kernel in one datagram (a batch split over two `send`s is two
//! incomplete batches), so the socket's send buffer is raised to the batch's size first
//! (`SO_SNDBUFFORCE`, as `nft` does; CAP_NET_ADMIN is needed for nf_tables writes anyway).
//! The kernel takes a send buffer of up to 1 GiB, so that bounds a batch (about 20 million
//! dnat map elements); the kernel also holds a copy of the batch while it processes it.

use std::io;
use std::os::fd::AsRawFd;

use netlink_packet_core::{
    ErrorBuffer, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NlasIterator,
    NLMSG_ERROR, NLM_F_ACK, NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_REQUEST,
};
use netlink_packet_netfilter::nftables::NfTablesMessage;
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};

use super::NetfilterSocket;

/// `NFNL_SUBSYS_NFTABLES`: the subsystem a batch is for, in its begin and end messages.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// Extended acknowledgement attributes (`include/uapi/linux/netlink.h`).
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLMSGERR_ATTR_OFFS: u16 = 2;
/// The netlink header that every message starts with.
const NLMSG_HEADER_LEN: usize = 16;
/// How long to wait for the kernel's answer when it is not queued at once. The kernel answers
/// inside `send`, so this only bounds a wait that should never happen.
const ANSWER_TIMEOUT_MS: i32 = 30_000;

/// An nf_tables batch being built: the begin message, then the messages pushed.
#[derive(Debug)]
pub struct Batch {
    buffer: Vec<u8>,
    /// Where each pushed message starts in `buffer` (the begin message is not counted).
    starts: Vec<usize>,
    /// Where the pushed messages end (the end message, once sent, follows).
    end: usize,
    sent: bool,
}

impl Default for Batch {
    fn default() -> Batch {
        Batch::new()
    }
}

/// The kernel's refusal of one message of a batch (or of the whole batch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nack {
    /// The index of the refused message ([`Batch::push`]'s answer); `None` when the kernel
    /// refused the batch as a whole (no permission, out of memory, a malformed batch).
    pub message: Option<usize>,
    /// The error number (positive: `libc::ENOENT`, …).
    pub errno: i32,
    /// The kernel's explanation, when it gave one.
    pub text: Option<String>,
    /// The offset, from the start of the refused message, of the attribute the kernel
    /// refused (for nf_tables element messages: the element).
    pub offset: Option<usize>,
}

impl Nack {
    /// The error as an `io::Error`, for its description.
    pub fn error(&self) -> io::Error {
        io::Error::from_raw_os_error(self.errno)
    }
}

impl Batch {
    /// An empty batch for nf_tables.
    pub fn new() -> Batch {
        let mut buffer = Vec::new();
        append(
            &mut buffer,
            NetfilterProtoFamily::Unspec,
            NFNL_SUBSYS_NFTABLES,
            NLM_F_REQUEST,
            ControlMessage::BatchBegin,
        );
        let end = buffer.len();
        Batch {
            buffer,
            starts: Vec::new(),
            end,
            sent: false,
        }
    }

    /// Appends one nf_tables message (`NLM_F_REQUEST` is added to `flags`); returns its index.
    /// Nothing can be pushed once the batch was sent (`None`).
    pub fn push(
        &mut self,
        family: NetfilterProtoFamily,
        flags: u16,
        message: NfTablesMessage,
    ) -> Option<usize> {
        if self.sent {
            return None;
        }
        self.starts.push(self.buffer.len());
        append(&mut self.buffer, family, 0, NLM_F_REQUEST | flags, message);
        self.end = self.buffer.len();
        Some(self.starts.len() - 1)
    }

    /// How many messages were pushed.
    pub fn len(&self) -> usize {
        self.starts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// The size of the batch on the wire, in bytes (with its end message, once sent).
    pub fn bytes(&self) -> usize {
        self.buffer.len()
    }

    /// The encoded bytes of one pushed message (as sent: with its sequence number).
    pub fn message(&self, index: usize) -> Option<&[u8]> {
        let start = *self.starts.get(index)?;
        let end = self.starts.get(index + 1).copied().unwrap_or(self.end);
        self.buffer.get(start..end)
    }
}

/// Serializes one netfilter message at the end of `buffer`.
fn append(
    buffer: &mut Vec<u8>,
    family: NetfilterProtoFamily,
    res_id: u16,
    flags: u16,
    inner: impl Into<netlink_packet_netfilter::NetfilterMessageInner>,
) {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let payload = NetfilterMessage::new(NetfilterHeader::new(family, 0, res_id), inner);
    let mut message = NetlinkMessage::new(header, NetlinkPayload::from(payload));
    message.finalize();
    let start = buffer.len();
    buffer.resize(start + message.buffer_len(), 0);
    message.serialize(&mut buffer[start..]);
}

impl NetfilterSocket {
    /// Sends the batch as one transaction. `Ok` with no nacks: the kernel committed all of it;
    /// `Ok` with nacks: it refused the messages named (in batch order) and changed nothing;
    /// `Err`: the batch could not be sent or its answer not read. The batch keeps its bytes
    /// (for [`Batch::message`]) and cannot be sent again.
    pub fn send_batch(&mut self, batch: &mut Batch) -> io::Result<Vec<Nack>> {
        if batch.sent {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "this nf_tables batch was sent already",
            ));
        }
        batch.sent = true;
        let Batch { buffer, starts, .. } = batch;
        let Some(&last_start) = starts.last() else {
            return Ok(Vec::new());
        };
        let count = starts.len();
        // The last message asks for the acknowledgement that says the batch is done.
        {
            let mut last = NetlinkBuffer::new(&mut buffer[last_start..]);
            let flags = last.flags();
            last.set_flags(flags | NLM_F_ACK);
        }
        append(
            buffer,
            NetfilterProtoFamily::Unspec,
            NFNL_SUBSYS_NFTABLES,
            NLM_F_REQUEST,
            ControlMessage::BatchEnd,
        );
        // Sequence numbers: the begin message, then each message, then the end message.
        let first = self.sequence.wrapping_add(1);
        let sequence_of = |index: usize| first.wrapping_add(1).wrapping_add(index as u32);
        NetlinkBuffer::new(&mut buffer[..]).set_sequence_number(first);
        for (index, &start) in starts.iter().enumerate() {
            NetlinkBuffer::new(&mut buffer[start..]).set_sequence_number(sequence_of(index));
        }
        let end_start = buffer.len() - NLMSG_HEADER_LEN - 4;
        NetlinkBuffer::new(&mut buffer[end_start..]).set_sequence_number(sequence_of(count));
        self.sequence = sequence_of(count);

        self.prepare_for_batch(buffer.len(), count)?;
        self.socket.send(buffer, 0)?;

        let mut nacks = Vec::new();
        let mut finished = false;
        loop {
            let timeout = if finished { 0 } else { ANSWER_TIMEOUT_MS };
            if !self.readable(timeout)? {
                if finished {
                    return Ok(nacks);
                }
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the kernel did not answer the nf_tables batch",
                ));
            }
            let (datagram, _) = self.socket.recv_from_full()?;
            let mut rest = datagram.as_slice();
            while rest.len() >= NLMSG_HEADER_LEN {
                let message = NetlinkBuffer::new_checked(rest)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let length = (message.length() as usize).next_multiple_of(4);
                rest = rest.get(length.max(NLMSG_HEADER_LEN)..).unwrap_or(&[]);
                if message.message_type() != NLMSG_ERROR {
                    continue;
                }
                let sequence = message.sequence_number();
                let index = sequence.wrapping_sub(sequence_of(0)) as usize;
                let in_batch = sequence == first || index <= count;
                if !in_batch {
                    continue; // the answer to an earlier request that was given up on
                }
                let error = ErrorBuffer::new_checked(message.payload())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let Some(code) = error.code() else {
                    finished |= index + 1 == count;
                    continue;
                };
                let (text, offset) = extended_ack(message.flags(), error.payload());
                let whole = sequence == first || index >= count;
                finished |= whole || index + 1 == count;
                nacks.push(Nack {
                    message: (!whole).then_some(index),
                    errno: code.get().saturating_abs(),
                    text,
                    offset,
                });
            }
        }
    }

    /// Sizes the socket's buffers for a batch of `bytes` with `messages` messages, and asks
    /// for capped, extended acknowledgements (errors without the refused message's copy, with
    /// the kernel's text and the refused attribute's offset).
    fn prepare_for_batch(&mut self, bytes: usize, messages: usize) -> io::Result<()> {
        if !self.batch_ready {
            self.socket.set_cap_ack(true)?;
            self.socket.set_ext_ack(true)?;
            self.batch_ready = true;
        }
        let fd = self.socket.as_raw_fd();
        // Room for the datagram (the kernel checks it against half the value set, less 32).
        let send = bytes.saturating_add(64 * 1024).min(i32::MAX as usize / 2);
        if send > self.send_buffer {
            force_buffer(fd, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, send)?;
            self.send_buffer = send;
        }
        // Room for an error per message, each well under 1 KiB with its bookkeeping.
        let receive = messages
            .saturating_mul(1024)
            .saturating_add(256 * 1024)
            .min(64 << 20);
        if receive > self.receive_buffer {
            force_buffer(fd, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, receive)?;
            self.receive_buffer = receive;
        }
        Ok(())
    }

    /// Whether an answer is waiting, after up to `timeout_ms`.
    fn readable(&self, timeout_ms: i32) -> io::Result<bool> {
        let mut poll = libc::pollfd {
            fd: self.socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one valid pollfd, for the duration of the call.
            let ready = unsafe { libc::poll(&mut poll, 1, timeout_ms) };
            if ready >= 0 {
                return Ok(ready > 0);
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
    }
}

/// Sets a socket buffer size with the `FORCE` option (past the sysctl maximum), or with the
/// plain one when that is refused.
fn force_buffer(fd: i32, force: i32, plain: i32, size: usize) -> io::Result<()> {
    let value = i32::try_from(size).unwrap_or(i32::MAX);
    let set = |option: i32| {
        // SAFETY: an int option value, passed with its size.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (&value as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    set(force).or_else(|_| set(plain))
}

/// The text and refused-attribute offset of an extended acknowledgement. `payload` is the
/// error's payload after its code: the refused message's header, its body unless the answer
/// is capped, then the attributes when `NLM_F_ACK_TLVS` is set.
fn extended_ack(flags: u16, payload: &[u8]) -> (Option<String>, Option<usize>) {
    if flags & NLM_F_ACK_TLVS == 0 {
        return (None, None);
    }
    let skip = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HEADER_LEN
    } else {
        payload
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .map(|b| u32::from_ne_bytes(b) as usize)
            .unwrap_or(NLMSG_HEADER_LEN)
            .next_multiple_of(4)
    };
    let Some(attributes) = payload.get(skip..) else {
        return (None, None);
    };
    let mut text = None;
    let mut offset = None;
    for attribute in NlasIterator::new(attributes) {
        let Ok(attribute) = attribute else { break };
        match attribute.kind() {
            NLMSGERR_ATTR_MSG => {
                let value = attribute.value();
                let value = value.split(|&b| b == 0).next().unwrap_or(value);
                text = Some(String::from_utf8_lossy(value).into_owned());
            }
            NLMSGERR_ATTR_OFFS => {
                offset = attribute
                    .value()
                    .get(..4)
                    .and_then(|b| b.try_into().ok())
                    .map(|b| u32::from_ne_bytes(b) as usize);
            }
            _ => {}
        }
    }
    (text, offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_netfilter::nftables::{SetElementList, SetElementMessage};

    fn flush(set: &str) -> NfTablesMessage {
        NfTablesMessage::DeleteSetElement(SetElementMessage {
            attributes: vec![
                SetElementList::Table("t".into()),
                SetElementList::Set(set.into()),
            ],
        })
    }

    #[test]
    fn a_batch_is_begin_then_the_messages_each_four_byte_aligned() {
        let mut batch = Batch::new();
        assert!(batch.is_empty());
        assert_eq!(
            batch.push(NetfilterProtoFamily::IPv4, 0, flush("a")),
            Some(0)
        );
        assert_eq!(
            batch.push(NetfilterProtoFamily::IPv6, 0, flush("bcdef")),
            Some(1)
        );
        // Begin: header and nfgenmsg with res_id 10 in network order.
        let begin = NetlinkBuffer::new_checked(&batch.buffer[..]).expect("begin");
        assert_eq!(begin.message_type(), 16);
        assert_eq!(begin.length(), 20);
        assert_eq!(&batch.buffer[16..20], &[0, 0, 0, 10]);
        for index in 0..2 {
            let bytes = batch.message(index).expect("message");
            let message = NetlinkBuffer::new_checked(bytes).expect("message");
            assert_eq!(message.length() as usize, bytes.len());
            assert_eq!(bytes.len() % 4, 0);
            // NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_DELSETELEM
            assert_eq!(message.message_type(), (10 << 8) | 14);
            assert_eq!(message.flags(), NLM_F_REQUEST);
        }
        assert_eq!(batch.message(0).map(|m| m[16]), Some(2)); // NFPROTO_IPV4
        assert_eq!(batch.message(1).map(|m| m[16]), Some(10)); // NFPROTO_IPV6
        assert!(batch.message(2).is_none());
    }

    #[test]
    fn extended_acks_give_text_and_offset_capped_or_not() {
        // Capped: the refused message's header, then MSG "bad" and OFFS 36.
        let mut payload = vec![0u8; 16];
        payload.extend_from_slice(&[8, 0, 1, 0, b'b', b'a', b'd', 0]);
        payload.extend_from_slice(&[8, 0, 2, 0]);
        payload.extend_from_slice(&36u32.to_ne_bytes());
        assert_eq!(
            extended_ack(NLM_F_ACK_TLVS | NLM_F_CAPPED, &payload),
            (Some("bad".to_string()), Some(36))
        );
        // Not capped: the whole refused message (24 bytes here) comes first.
        let mut full = 24u32.to_ne_bytes().to_vec();
        full.resize(24, 0);
        full.extend_from_slice(&payload[16..]);
        assert_eq!(
            extended_ack(NLM_F_ACK_TLVS, &full),
            (Some("bad".to_string()), Some(36))
        );
        assert_eq!(extended_ack(0, &payload), (None, None));
        // Truncated attributes give what could be read.
        assert_eq!(
            extended_ack(NLM_F_ACK_TLVS | NLM_F_CAPPED, &payload[..22]),
            (None, None)
        );
    }
}
