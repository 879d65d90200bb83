//! A set's or map's elements read back over netlink: one `NFT_MSG_GETSETELEM` dump
//! (`NLM_F_DUMP`) of one set, decoded with the byte layout [`super::elements`] writes
//! (issue 11: the syncer of the `maps` layout reads the `affinity` map — key, data and
//! expiry — without `nft -j list` of a million elements).
//!
//! **What is read.** Each element's key (and key end, for a concatenated interval set), its
//! data value or verdict, its own timeout, the time left before it expires, and its comment
//! (nft's user data). The caller gives the layout of the key and of a map's data value
//! ([`PartKind`]s, as the set was declared: `typeof ip daddr . th dport` is
//! `[PartKind::Ipv4, PartKind::Port]`); an element whose bytes do not fit it is an error
//! (`InvalidData`), as are elements this module does not represent: the interval ends of a
//! non-concatenated interval set, catch-all elements and stateful object references.
//! Element expressions (counters) are skipped.
//!
//! **Large sets.** The kernel answers in many messages, each as large as the receive buffer
//! allows (32 KiB; see [`NetfilterSocket::dump`]), and decoded as they arrive: the answers
//! are never held whole. The kernel restarts its walk of the set for every message, skipping
//! what it already sent, so a dump's kernel time grows with the square of the set's size:
//! the dnat map of `examples/nft_elements_bench.rs` (`ip daddr . meta l4proto . th dport .
//! numgen random mod 1 : ip daddr . th dport`) dumps 100,000 elements in 0.2 s, 300,000 in
//! 1.4 s and 1,000,000 in 19 s (14 s when declared with a `size`), nearly all of it kernel
//! time (`nft -j list map` of the same 1,000,000: 54 s). [`list`] keeps 344 bytes an element
//! (344 MiB at 1,000,000); [`for_each`] keeps only a hash of each key read (36 MiB).
//!
//! **Consistency.** A dump is not a snapshot: each message continues the kernel's walk of
//! the set by position, so a change of the set's order between two messages makes it miss
//! some elements and repeat others. Three things make a dump *interrupted*:
//! - an answer flagged `NLM_F_DUMP_INTR` (the kernel noticed a change; Linux 6.18 flags no
//!   element dump, even with transactions committed during it);
//! - a change of the ruleset generation that every answer carries: every committed nf_tables
//!   transaction in the namespace changes it, whatever table it changes (the test
//!   `a_dump_during_transactions_is_interrupted` sees this one fire);
//! - an element read twice (same key and key end). A hash set's table is resized in the
//!   background as it grows or shrinks (for a while after a large load: a 100,000-element
//!   dump right after the load repeated about 2% of its elements, and missed as many), which
//!   reorders its walk without changing any generation. While the set's elements stay the
//!   same, the dump returns as many entries as the set holds, so a missed element means a
//!   repeated one: no repeat, no miss.
//!
//! [`list`] then dumps again, up to [`ATTEMPTS`] times in all, and returns an `Interrupted`
//! error if every dump was; [`for_each`], which has already handed elements over, returns
//! that error at once. Not detected: an element the packet path adds (`update @set`) or that
//! expires and is removed during the dump may shift the walk and make it miss another one
//! without a repeat.
//!
//! **Timeouts.** `Element::timeout` is the timeout the kernel reports for the element: none
//! when it has none, and none when it is the set's default timeout (the kernel leaves that
//! out). `ListedElement::expires` is the time left; the kernel does not list elements that
//! have expired.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::io;
use std::time::Duration;

use netlink_packet_core::{NlaBuffer, NlasIterator, NLA_TYPE_MASK};
use netlink_packet_netfilter::nftables::{
    NfTablesMessage, SetElementList, SetElementMessage, Verdict as WireVerdict,
};
use rustc_hash::FxHashSet;

use super::elements::{
    check_name, decode, hex, value_of, Data, Element, PartKind, Value, Verdict, NFTA_DATA_VALUE,
    NFTA_DATA_VERDICT, NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_KEY_END, NFTA_SET_ELEM_LIST_ELEMENTS,
    NFT_GET_SET_ELEMENT, NF_ACCEPT, NF_DROP, UDATA_SET_ELEM_COMMENT,
};
use super::family_word;
use crate::family::IpFamily;
use crate::sync::netlink::{DumpEnd, NetfilterSocket};

/// How many times [`list`] dumps a set whose dumps are interrupted before it gives up.
pub const ATTEMPTS: usize = 3;

/// `NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWSETELEM`: the type of a dump's answers.
const NFT_NEW_SET_ELEMENT: u16 = (10 << 8) | 12;
/// Element attributes (`NFTA_SET_ELEM_*`) beyond the key and key end.
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_SET_ELEM_EXPIRATION: u16 = 5;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTA_SET_ELEM_OBJREF: u16 = 9;
/// `NFTA_LIST_ELEM`: each element of the element list.
const NFTA_LIST_ELEM: u16 = 1;
/// `NFTA_VERDICT_CODE`, `NFTA_VERDICT_CHAIN`.
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
/// `NFT_SET_ELEM_INTERVAL_END`, `NFT_SET_ELEM_CATCHALL`.
const NFT_SET_ELEM_INTERVAL_END: u32 = 1;
const NFT_SET_ELEM_CATCHALL: u32 = 2;

/// One element as the kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedElement {
    /// Key, key end (none when the element is a single value), data, timeout and comment.
    pub element: Element,
    /// The time left before the element expires; none when it does not expire.
    pub expires: Option<Duration>,
}

/// Every element of `set` (a set or map) of `table`; `None` when the table or set does not
/// exist. `key` is the layout of the set's key; `data` that of a map's data value (none for
/// a set or a verdict map). Dumps again when a dump was interrupted (see the module docs), up
/// to [`ATTEMPTS`] dumps; then an `Interrupted` error.
pub fn list(
    socket: &mut NetfilterSocket,
    family: IpFamily,
    table: &str,
    set: &str,
    key: &[PartKind],
    data: Option<&[PartKind]>,
) -> io::Result<Option<Vec<ListedElement>>> {
    retry_interrupted(ATTEMPTS, family, table, set, || {
        let mut elements = Vec::new();
        let end = dump(socket, family, table, set, key, data, |e| elements.push(e))?;
        Ok((end, elements))
    })
}

/// Hands every element of `set` of `table` to `each` as it is read, without collecting them;
/// `Ok(false)` when the table or set does not exist. An interrupted dump is an `Interrupted`
/// error, after `each` has seen what was read; `list` retries instead.
pub fn for_each(
    socket: &mut NetfilterSocket,
    family: IpFamily,
    table: &str,
    set: &str,
    key: &[PartKind],
    data: Option<&[PartKind]>,
    each: impl FnMut(ListedElement),
) -> io::Result<bool> {
    match dump(socket, family, table, set, key, data, each)? {
        DumpEnd::Missing => Ok(false),
        DumpEnd::Complete => Ok(true),
        DumpEnd::Interrupted => Err(interrupted(family, table, set, 1)),
    }
}

/// Runs `attempt` until a dump was not interrupted, `attempts` times at most.
fn retry_interrupted<T>(
    attempts: usize,
    family: IpFamily,
    table: &str,
    set: &str,
    mut attempt: impl FnMut() -> io::Result<(DumpEnd, T)>,
) -> io::Result<Option<T>> {
    for _ in 0..attempts {
        match attempt()? {
            (DumpEnd::Missing, _) => return Ok(None),
            (DumpEnd::Complete, result) => return Ok(Some(result)),
            (DumpEnd::Interrupted, _) => {}
        }
    }
    Err(interrupted(family, table, set, attempts))
}

fn interrupted(family: IpFamily, table: &str, set: &str, dumps: usize) -> io::Error {
    let (times, was) = match dumps {
        1 => ("the dump".to_string(), "was"),
        n => (format!("each of {n} dumps"), "were"),
    };
    io::Error::new(
        io::ErrorKind::Interrupted,
        format!(
            "{times} of {} set {set} of table {table} {was} interrupted: the nf_tables ruleset \
             changed, or the set's hash table was resized, during the dump",
            family_word(family)
        ),
    )
}

/// One dump of `set`, each element handed to `each`.
fn dump(
    socket: &mut NetfilterSocket,
    family: IpFamily,
    table: &str,
    set: &str,
    key: &[PartKind],
    data: Option<&[PartKind]>,
    mut each: impl FnMut(ListedElement),
) -> io::Result<DumpEnd> {
    let invalid_input = |reason: String| io::Error::new(io::ErrorKind::InvalidInput, reason);
    check_name("table", table)
        .and_then(|_| check_name("set", set))
        .map_err(invalid_input)?;
    if key.is_empty() || data.is_some_and(<[PartKind]>::is_empty) {
        return Err(invalid_input(format!(
            "the key and data layouts of set {set} need at least one part each"
        )));
    }
    let request = NfTablesMessage::GetSetElement(SetElementMessage {
        attributes: vec![
            SetElementList::Table(table.to_string()),
            SetElementList::Set(set.to_string()),
        ],
    });
    let layout = Layout { key, data };
    let mut read = 0usize;
    let mut seen = Seen::default();
    let end = socket.dump(family, NFT_GET_SET_ELEMENT, request, |answer| {
        if answer.message_type != NFT_NEW_SET_ELEMENT {
            return Ok(());
        }
        read_message(answer.attributes, layout, &mut read, &mut seen, &mut each).map_err(|reason| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "element #{read} of {} set {set} of table {table}: {reason}",
                    family_word(family)
                ),
            )
        })
    })?;
    Ok(match end {
        DumpEnd::Complete if seen.repeated => DumpEnd::Interrupted,
        end => end,
    })
}

/// The elements a dump has read, to notice one read twice: a 64-bit hash of each key and key
/// end, with keys random to each dump (so that a collision of two keys, about 3 in 100
/// million at 1,000,000 elements, is not the same in the next dump), in 8 bytes an element.
#[derive(Default)]
struct Seen {
    hashes: FxHashSet<u64>,
    state: RandomState,
    repeated: bool,
}

impl Seen {
    fn note(&mut self, key: &[u8], key_end: Option<&[u8]>) {
        let hash = self.state.hash_one((key, key_end));
        self.repeated |= !self.hashes.insert(hash);
    }
}

/// The layouts an element is decoded with.
#[derive(Clone, Copy)]
struct Layout<'a> {
    key: &'a [PartKind],
    data: Option<&'a [PartKind]>,
}

/// Decodes the elements of one answer (`NFT_MSG_NEWSETELEM`'s attributes); `read` counts
/// the elements read so far.
fn read_message(
    attributes: &[u8],
    layout: Layout<'_>,
    read: &mut usize,
    seen: &mut Seen,
    each: &mut impl FnMut(ListedElement),
) -> Result<(), String> {
    for attribute in NlasIterator::new(attributes) {
        let attribute = attribute.map_err(|e| e.to_string())?;
        if attribute.kind() & NLA_TYPE_MASK != NFTA_SET_ELEM_LIST_ELEMENTS {
            continue;
        }
        for element in NlasIterator::new(value_of(attribute)) {
            let element = element.map_err(|e| e.to_string())?;
            if element.kind() & NLA_TYPE_MASK != NFTA_LIST_ELEM {
                continue;
            }
            each(read_element(value_of(element), layout, seen)?);
            *read += 1;
        }
    }
    Ok(())
}

/// One element from its attributes, noted in `seen`.
fn read_element(
    attributes: &[u8],
    layout: Layout<'_>,
    seen: &mut Seen,
) -> Result<ListedElement, String> {
    let mut key = None;
    let mut key_end = None;
    let mut key_bytes = None;
    let mut key_end_bytes = None;
    let mut data = None;
    let mut timeout = None;
    let mut expires = None;
    let mut comment = None;
    for attribute in NlasIterator::new(attributes) {
        let attribute = attribute.map_err(|e| e.to_string())?;
        let kind = attribute.kind() & NLA_TYPE_MASK;
        let bytes = value_of(attribute);
        match kind {
            NFTA_SET_ELEM_KEY => {
                let bytes = plain_value(bytes)?;
                key = Some(read_value("key", layout.key, bytes)?);
                key_bytes = Some(bytes);
            }
            NFTA_SET_ELEM_KEY_END => {
                let bytes = plain_value(bytes)?;
                key_end = Some(read_value("key end", layout.key, bytes)?);
                key_end_bytes = Some(bytes);
            }
            NFTA_SET_ELEM_DATA => data = Some(read_data(bytes, layout.data)?),
            NFTA_SET_ELEM_FLAGS => {
                let flags = be32(bytes)?;
                if flags & NFT_SET_ELEM_INTERVAL_END != 0 {
                    return Err(
                        "an interval end (a set with flags interval and a key of one \
                                part), which is not supported"
                            .to_string(),
                    );
                }
                if flags & NFT_SET_ELEM_CATCHALL != 0 {
                    return Err("a catch-all element, which is not supported".to_string());
                }
            }
            NFTA_SET_ELEM_TIMEOUT => timeout = Some(Duration::from_millis(be64(bytes)?)),
            NFTA_SET_ELEM_EXPIRATION => expires = Some(Duration::from_millis(be64(bytes)?)),
            NFTA_SET_ELEM_USERDATA => comment = read_comment(bytes),
            NFTA_SET_ELEM_OBJREF => {
                return Err("a stateful object reference, which is not supported".to_string());
            }
            // Element expressions (counters, quotas) and padding.
            _ => {}
        }
    }
    let (Some(key), Some(key_bytes)) = (key, key_bytes) else {
        return Err("the element has no key".to_string());
    };
    seen.note(key_bytes, key_end_bytes);
    let key_end = key_end.filter(|end| *end != key);
    Ok(ListedElement {
        element: Element {
            key,
            key_end,
            data,
            timeout,
            comment,
        },
        expires,
    })
}

/// The first attribute nested in `bytes` (an `NFTA_DATA_*`): its type and value.
fn nested_data(bytes: &[u8]) -> Result<(u16, &[u8]), String> {
    let attribute: NlaBuffer<&[u8]> = NlasIterator::new(bytes)
        .next()
        .ok_or("an empty data attribute")?
        .map_err(|e| e.to_string())?;
    Ok((attribute.kind() & NLA_TYPE_MASK, value_of(attribute)))
}

/// The bytes of a key or key end (`NFTA_DATA_VALUE`).
fn plain_value(bytes: &[u8]) -> Result<&[u8], String> {
    match nested_data(bytes)? {
        (NFTA_DATA_VALUE, value) => Ok(value),
        (other, _) => Err(format!("a key of data type {other}, not a value")),
    }
}

fn read_value(what: &str, layout: &[PartKind], bytes: &[u8]) -> Result<Value, String> {
    decode(layout, bytes).ok_or_else(|| {
        let parts: Vec<String> = layout.iter().map(PartKind::to_string).collect();
        format!(
            "its {what} {} ({} bytes) does not fit {} (as concatenated: {} bytes)",
            hex(bytes),
            bytes.len(),
            parts.join(" . "),
            padded_len(layout)
        )
    })
}

/// The bytes of a value of `layout` as the kernel holds it.
fn padded_len(layout: &[PartKind]) -> usize {
    match layout {
        [one] => one.len(),
        parts => parts.iter().map(|p| p.len().next_multiple_of(4)).sum(),
    }
}

/// A map element's data: a value of `layout`, or a verdict.
fn read_data(bytes: &[u8], layout: Option<&[PartKind]>) -> Result<Data, String> {
    match nested_data(bytes)? {
        (NFTA_DATA_VALUE, value) => match layout {
            Some(layout) => Ok(Data::Value(read_value("data", layout, value)?)),
            None => Err(format!(
                "its data is a value ({}), and no data layout was given",
                hex(value)
            )),
        },
        (NFTA_DATA_VERDICT, verdict) => read_verdict(verdict).map(Data::Verdict),
        (other, _) => Err(format!("data of type {other}")),
    }
}

fn read_verdict(attributes: &[u8]) -> Result<Verdict, String> {
    let mut code = None;
    let mut chain = None;
    for attribute in NlasIterator::new(attributes) {
        let attribute = attribute.map_err(|e| e.to_string())?;
        match attribute.kind() & NLA_TYPE_MASK {
            NFTA_VERDICT_CODE => code = Some(be32(value_of(attribute))?),
            NFTA_VERDICT_CHAIN => chain = Some(c_string(value_of(attribute))?),
            _ => {}
        }
    }
    let code = code.ok_or("a verdict without a code")?;
    let chain = || {
        chain
            .clone()
            .ok_or(format!("a jump or goto (code {code:#x}) without a chain"))
    };
    Ok(match WireVerdict::from(code) {
        WireVerdict::Jump => Verdict::Jump(chain()?),
        WireVerdict::Goto => Verdict::Goto(chain()?),
        WireVerdict::Return => Verdict::Return,
        WireVerdict::Other(NF_ACCEPT) => Verdict::Accept,
        WireVerdict::Other(NF_DROP) => Verdict::Drop,
        _ => {
            return Err(format!(
                "the verdict code {code:#x}, which is not supported"
            ))
        }
    })
}

/// The comment in nft's element user data (type-length-value records); none when there is
/// none or the records are malformed.
fn read_comment(mut udata: &[u8]) -> Option<String> {
    while let [kind, length, rest @ ..] = udata {
        let value = rest.get(..usize::from(*length))?;
        if *kind == UDATA_SET_ELEM_COMMENT {
            let text = value.split(|b| *b == 0).next().unwrap_or(value);
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        udata = rest.get(usize::from(*length)..)?;
    }
    None
}

/// A NUL-terminated string attribute.
fn c_string(bytes: &[u8]) -> Result<String, String> {
    let text = bytes.split(|b| *b == 0).next().unwrap_or(bytes);
    String::from_utf8(text.to_vec()).map_err(|_| format!("a name that is not UTF-8: {}", hex(text)))
}

fn be32(bytes: &[u8]) -> Result<u32, String> {
    <[u8; 4]>::try_from(bytes)
        .map(u32::from_be_bytes)
        .map_err(|_| format!("a 32-bit attribute of {} bytes", bytes.len()))
}

fn be64(bytes: &[u8]) -> Result<u64, String> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_be_bytes)
        .map_err(|_| format!("a 64-bit attribute of {} bytes", bytes.len()))
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use netlink_packet_core::{DefaultNla, Emitable};
    use netlink_packet_netfilter::nftables::{
        DataAttribute, ListAttribute, SetElementAttribute, SetElementFlags, VerdictAttribute,
    };

    use super::*;
    use crate::sync::nftables::elements::{ElementBatch, Part};

    const DNAT_KEY: &[PartKind] = &[
        PartKind::Ipv4,
        PartKind::Proto,
        PartKind::Port,
        PartKind::Integer,
    ];
    const ENDPOINT: &[PartKind] = &[PartKind::Ipv4, PartKind::Port];

    fn v4(n: u8) -> Part {
        Part::Ipv4(Ipv4Addr::new(10, 96, 0, n))
    }

    /// Reads the elements of `attributes` (an element message's attributes).
    fn read_all(attributes: &[u8], layout: Layout<'_>) -> Result<Vec<ListedElement>, String> {
        let mut out = Vec::new();
        let mut read = 0;
        let mut seen = Seen::default();
        read_message(attributes, layout, &mut read, &mut seen, &mut |e| {
            out.push(e)
        })?;
        assert!(!seen.repeated, "no element is read twice");
        assert_eq!(read, out.len());
        Ok(out)
    }

    /// The attributes of an element message holding `elements`, as the crate encodes them.
    fn message(elements: Vec<Vec<SetElementAttribute>>) -> Vec<u8> {
        let message = NfTablesMessage::NewSetElement(SetElementMessage {
            attributes: vec![
                SetElementList::Table("t".into()),
                SetElementList::Set("s".into()),
                SetElementList::Elements(
                    elements.into_iter().map(ListAttribute::Element).collect(),
                ),
            ],
        });
        let mut bytes = vec![0; message.buffer_len()];
        message.emit(&mut bytes);
        bytes
    }

    fn key(value: &Value) -> SetElementAttribute {
        SetElementAttribute::Key(DataAttribute::Value(value.encode()))
    }

    #[test]
    fn what_the_writer_encodes_reads_back_the_same() {
        let dnat_key = |n| Value::concat([v4(n), Part::Proto(6), Part::Port(80), Part::Integer(3)]);
        let endpoint = Value::concat([Part::Ipv4(Ipv4Addr::new(10, 1, 0, 1)), Part::Port(8080)]);
        let written = [
            Element::new(dnat_key(1)).value(endpoint.clone()),
            Element::new(dnat_key(2))
                .value(endpoint.clone())
                .timeout(Duration::from_secs(600))
                .comment("ns/web:http"),
            Element::new(dnat_key(3))
                .value(endpoint)
                .comment(String::new()),
        ];
        let mut batch = ElementBatch::new(IpFamily::V4, "t");
        for element in &written {
            batch.add("svc_dnat", element).expect("valid");
        }
        let bytes = batch.message_bytes(0).expect("one message").to_vec();
        // Past the netlink and netfilter headers.
        let read = read_all(
            &bytes[20..],
            Layout {
                key: DNAT_KEY,
                data: Some(ENDPOINT),
            },
        )
        .expect("decodes");
        let elements: Vec<Element> = read.iter().map(|l| l.element.clone()).collect();
        assert_eq!(elements, written);
        assert!(read.iter().all(|l| l.expires.is_none()));

        // Verdicts, and an interval set's key ends.
        let vmap_key = |port| Value::concat([v4(1), Part::Proto(17), Part::Port(port)]);
        let verdicts = [
            Verdict::Accept,
            Verdict::Drop,
            Verdict::Return,
            Verdict::Jump("svc1".into()),
            Verdict::Goto("a-much-longer-chain-name".into()),
        ];
        let range = |port, last| Value::concat([v4(1), Part::Proto(6), Part::Port(port), v4(last)]);
        let mut batch = ElementBatch::new(IpFamily::V4, "t");
        for (port, verdict) in (1..).zip(&verdicts) {
            let element = Element::new(vmap_key(port)).verdict(verdict.clone());
            batch.add("svc_vmap", &element).expect("valid");
        }
        let ranges = [
            Element::new(range(80, 0)).to(range(90, 255)),
            Element::new(range(53, 7)),
        ];
        for element in &ranges {
            batch.add("svc_ranges", element).expect("valid");
        }
        let vmap = batch.message_bytes(0).expect("vmap message").to_vec();
        let read = read_all(
            &vmap[20..],
            Layout {
                key: &[PartKind::Ipv4, PartKind::Proto, PartKind::Port],
                data: None,
            },
        )
        .expect("decodes");
        let got: Vec<Option<Data>> = read.into_iter().map(|l| l.element.data).collect();
        let want: Vec<Option<Data>> = verdicts
            .iter()
            .cloned()
            .map(Data::Verdict)
            .map(Some)
            .collect();
        assert_eq!(got, want);
        let intervals = batch.message_bytes(1).expect("interval message").to_vec();
        let key = [
            PartKind::Ipv4,
            PartKind::Proto,
            PartKind::Port,
            PartKind::Ipv4,
        ];
        let read = read_all(
            &intervals[20..],
            Layout {
                key: &key,
                data: None,
            },
        )
        .expect("decodes");
        let elements: Vec<Element> = read.into_iter().map(|l| l.element).collect();
        assert_eq!(elements, ranges);
    }

    #[test]
    fn expiry_timeout_flags_and_a_key_end_equal_to_the_key_are_read() {
        let client = Value::concat([
            Part::Ipv6(Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 9)),
            Part::Ipv6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 1)),
            Part::Proto(6),
            Part::Port(443),
        ]);
        let endpoint = Value::concat([
            Part::Ipv6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 2)),
            Part::Port(8443),
        ]);
        let mut parts = client.parts().to_vec();
        parts[3] = Part::Port(444);
        let other = Value::concat(parts);
        let bytes = message(vec![
            vec![
                key(&client),
                SetElementAttribute::KeyEnd(vec![DefaultNla::new(
                    NFTA_DATA_VALUE,
                    client.encode(),
                )]),
                SetElementAttribute::Flags(SetElementFlags::empty()),
                SetElementAttribute::Data(DataAttribute::Value(endpoint.encode())),
                SetElementAttribute::Timeout(10_800_000),
                SetElementAttribute::Expiration(10_799_123),
                // A flags record of nft's user data before the comment.
                SetElementAttribute::UserData(vec![1, 4, 0, 0, 0, 0, 0, 3, b'a', b'b', 0]),
            ],
            // Expiring with the set's timeout: no timeout of its own.
            vec![
                key(&other),
                SetElementAttribute::Data(DataAttribute::Value(endpoint.encode())),
                SetElementAttribute::Expiration(5),
            ],
        ]);
        let layout = Layout {
            key: &[
                PartKind::Ipv6,
                PartKind::Ipv6,
                PartKind::Proto,
                PartKind::Port,
            ],
            data: Some(&[PartKind::Ipv6, PartKind::Port]),
        };
        let read = read_all(&bytes, layout).expect("decodes");
        assert_eq!(
            read,
            vec![
                ListedElement {
                    element: Element::new(client.clone())
                        .value(endpoint.clone())
                        .timeout(Duration::from_secs(10_800))
                        .comment("ab"),
                    expires: Some(Duration::from_millis(10_799_123)),
                },
                ListedElement {
                    element: Element::new(other).value(endpoint),
                    expires: Some(Duration::from_millis(5)),
                },
            ]
        );
        assert_eq!(read_comment(&[0, 9, b'x']), None, "truncated record");
        assert_eq!(read_comment(&[1, 1, 0]), None, "no comment record");
        assert_eq!(read_comment(&[0, 3, b'h', b'i', 0]).as_deref(), Some("hi"));
    }

    #[test]
    fn unsupported_elements_and_bytes_that_do_not_fit_the_layout_are_errors() {
        let port = Value::from(Part::Port(53));
        let set = Layout {
            key: &[PartKind::Port],
            data: None,
        };
        let error = |attributes: Vec<SetElementAttribute>, layout| {
            read_all(&message(vec![attributes]), layout).expect_err("refused")
        };
        let flagged = |flags| vec![key(&port), SetElementAttribute::Flags(flags)];
        assert!(error(flagged(SetElementFlags::IntervalEnd), set).contains("interval end"));
        assert!(error(flagged(SetElementFlags::CatchAll), set).contains("catch-all"));
        let objref = vec![key(&port), SetElementAttribute::ObjectRefrence("c".into())];
        assert!(error(objref, set).contains("object reference"));
        let wide = Layout {
            key: &[PartKind::Ipv4, PartKind::Port],
            data: None,
        };
        let text = error(vec![key(&port)], wide);
        assert!(
            text.contains("key 0x0035 (2 bytes) does not fit ipv4_addr . inet_service (as concatenated: 8 bytes)"),
            "{text}"
        );
        let mapped = vec![
            key(&port),
            SetElementAttribute::Data(DataAttribute::Value(vec![10, 0, 0, 1])),
        ];
        assert!(error(mapped.clone(), set).contains("no data layout"));
        let to_port = Layout {
            key: &[PartKind::Port],
            data: Some(&[PartKind::Port]),
        };
        assert!(error(mapped, to_port).contains("its data 0x0a000001"));
        let verdict = |code| {
            vec![
                key(&port),
                SetElementAttribute::Data(DataAttribute::Verdict(vec![VerdictAttribute::Code(
                    code,
                )])),
            ]
        };
        assert!(error(verdict(WireVerdict::Continue), set).contains("verdict code 0xffffffff"));
        assert!(error(verdict(WireVerdict::Jump), set).contains("without a chain"));
        let keyless = vec![SetElementAttribute::Timeout(1)];
        assert!(error(keyless, set).contains("no key"));
        // The element's own attribute lengths are checked.
        let timeout = vec![
            key(&port),
            SetElementAttribute::Other(DefaultNla::new(NFTA_SET_ELEM_TIMEOUT, vec![0; 4])),
        ];
        assert!(error(timeout, set).contains("64-bit attribute of 4 bytes"));
    }

    #[test]
    fn an_element_read_twice_is_noticed() {
        let layout = Layout {
            key: &[PartKind::Port, PartKind::Port],
            data: None,
        };
        let start = Value::concat([Part::Port(1), Part::Port(1)]);
        let ranged = |end: u16| {
            vec![
                key(&start),
                SetElementAttribute::KeyEnd(vec![DefaultNla::new(
                    NFTA_DATA_VALUE,
                    Value::concat([Part::Port(1), Part::Port(end)]).encode(),
                )]),
            ]
        };
        let repeated = |elements: Vec<Vec<SetElementAttribute>>| {
            let mut seen = Seen::default();
            let mut read = 0;
            read_message(
                &message(elements),
                layout,
                &mut read,
                &mut seen,
                &mut |_| {},
            )
            .expect("decodes");
            seen.repeated
        };
        // Same key, other key ends: two elements.
        assert!(!repeated(vec![ranged(2), ranged(3), vec![key(&start)]]));
        assert!(repeated(vec![ranged(2), ranged(3), ranged(2)]));
        assert!(repeated(vec![
            vec![key(&start)],
            ranged(3),
            vec![key(&start)]
        ]));
    }

    #[test]
    fn an_interrupted_dump_is_retried_then_given_up() {
        let mut ends = vec![
            DumpEnd::Complete,
            DumpEnd::Interrupted,
            DumpEnd::Interrupted,
        ];
        let mut attempts = 0;
        let got = retry_interrupted(3, IpFamily::V4, "t", "s", || {
            attempts += 1;
            Ok((ends.pop().expect("an attempt too many"), attempts))
        });
        assert_eq!(got.expect("the third dump"), Some(3));

        let mut attempts = 0;
        let error = retry_interrupted(3, IpFamily::V6, "t", "s", || {
            attempts += 1;
            Ok((DumpEnd::Interrupted, ()))
        })
        .expect_err("always interrupted");
        assert_eq!(attempts, 3);
        assert_eq!(error.kind(), io::ErrorKind::Interrupted);
        assert_eq!(
            error.to_string(),
            "each of 3 dumps of ip6 set s of table t were interrupted: the nf_tables ruleset \
             changed, or the set's hash table was resized, during the dump"
        );

        let missing = retry_interrupted(3, IpFamily::V4, "t", "s", || Ok((DumpEnd::Missing, ())));
        assert_eq!(missing.expect("missing is no error"), None);
        let failed = retry_interrupted(
            3,
            IpFamily::V4,
            "t",
            "s",
            || -> io::Result<(DumpEnd, ())> { Err(io::Error::from_raw_os_error(libc::EPERM)) },
        );
        assert_eq!(
            failed.expect_err("an error ends it").raw_os_error(),
            Some(libc::EPERM)
        );
    }
}
