//! Set and map elements written over netlink (`kproxy::sync::nftables::elements`) against the
//! real kernel: each test makes a namespace with a table of the shapes issue 11's layout uses
//! (created with `nft -f`), writes elements in one batch, and reads them back with `nft`.
//! The dump tests (`kproxy::sync::nftables::element_dump`) read elements back over netlink
//! and compare them with what was written, over netlink or as nft text.
//!
//! Needs root, `ip` and `nft`. Without them the tests print why and pass, unless
//! `KPROXY_REQUIRE_KERNEL_TESTS=1`, which turns that into a failure.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::netns::{kernel_tests_possible, Netns};
use serde_json::Value as Json;

use kproxy::family::IpFamily;
use kproxy::sync::netlink::NetfilterSocket;
use kproxy::sync::nftables::element_dump::{self, ListedElement};
use kproxy::sync::nftables::elements::{
    self, Data, Element, ElementBatch, ElementError, Operation, Part, PartKind, Value, Verdict,
};

fn possible() -> bool {
    kernel_tests_possible(&["nft"])
}

const TABLE: &str = "t";
const TCP: Part = Part::Proto(6);
const UDP: Part = Part::Proto(17);

/// The test family's words.
#[derive(Clone, Copy)]
struct Family {
    family: IpFamily,
    word: &'static str,
    /// nft's address type and payload expression.
    addr_type: &'static str,
    daddr: &'static str,
    /// Addresses 1..: `10.96.0.N`-like service, client and endpoint addresses.
    service: &'static str,
    client: &'static str,
    endpoint: &'static str,
    range_start: &'static str,
    range_end: &'static str,
    prefix: &'static str,
    prefix_end: &'static str,
    prefix_len: u8,
}

const V4: Family = Family {
    family: IpFamily::V4,
    word: "ip",
    addr_type: "ipv4_addr",
    daddr: "ip daddr",
    service: "10.96.0.",
    client: "10.0.0.",
    endpoint: "10.1.0.",
    range_start: "10.2.0.5",
    range_end: "10.2.0.9",
    prefix: "10.1.0.0",
    prefix_end: "10.1.255.255",
    prefix_len: 16,
};

const V6: Family = Family {
    family: IpFamily::V6,
    word: "ip6",
    addr_type: "ipv6_addr",
    daddr: "ip6 daddr",
    service: "fd00:96::",
    client: "fd00:0:0:1::",
    endpoint: "fd00:1::",
    range_start: "fd00:2::5",
    range_end: "fd00:2::9",
    prefix: "fd00:1::",
    prefix_end: "fd00:1::ffff:ffff:ffff:ffff",
    prefix_len: 64,
};

impl Family {
    fn service(self, n: u32) -> String {
        format!("{}{n}", self.service)
    }
    fn client(self, n: u32) -> String {
        format!("{}{n}", self.client)
    }
    fn endpoint(self, n: u32) -> String {
        format!("{}{n}", self.endpoint)
    }

    /// The table: a dnat map keyed by address, protocol, port and endpoint number, a verdict
    /// map with chains to go to, a concatenated interval set, and an affinity map whose
    /// elements time out.
    fn create(self, ns: &Netns) {
        let Family {
            word,
            addr_type: a,
            daddr,
            ..
        } = self;
        let script = format!(
            "table {word} {TABLE} {{
  chain svc1 {{ }}
  chain svc2 {{ }}
  map svc_dnat {{ typeof {daddr} . meta l4proto . th dport . numgen random mod 1 : {daddr} . th dport; }}
  map svc_vmap {{ type {a} . inet_proto . inet_service : verdict; }}
  set svc_ranges {{ type {a} . inet_proto . inet_service . {a}; flags interval; }}
  map affinity {{ type {a} . {a} . inet_proto . inet_service : {a} . inet_service; flags dynamic,timeout; }}
}}
"
        );
        nft(ns, &["-f", "-"], Some(&script));
    }
}

fn addr(text: &str) -> Part {
    match text.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => Part::Ipv4(a),
        Ok(IpAddr::V6(a)) => Part::Ipv6(a),
        Err(e) => panic!("{text}: {e}"),
    }
}

/// Runs nft in the namespace; panics with its stderr when it fails.
fn nft(ns: &Netns, args: &[&str], stdin: Option<&str>) -> String {
    let mut argv = vec!["nft"];
    argv.extend_from_slice(args);
    let out = ns.run(&argv, stdin);
    assert!(
        out.status.success(),
        "nft {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn socket(ns: &Netns) -> NetfilterSocket {
    NetfilterSocket::open_in(Some(&ns.name)).expect("netlink socket in the namespace")
}

/// One JSON value of `nft -j` as nft's text spells it.
fn text(value: &Json) -> String {
    match value {
        Json::String(s) => s.clone(),
        Json::Number(n) => n.to_string(),
        Json::Array(pair) if pair.len() == 2 => format!("{} : {}", text(&pair[0]), text(&pair[1])),
        Json::Object(o) => {
            if let Some(parts) = o.get("concat").and_then(Json::as_array) {
                return parts.iter().map(text).collect::<Vec<_>>().join(" . ");
            }
            if let Some(p) = o.get("prefix") {
                return format!("{}/{}", text(&p["addr"]), text(&p["len"]));
            }
            if let Some(r) = o.get("range").and_then(Json::as_array) {
                return format!("{}-{}", text(&r[0]), text(&r[1]));
            }
            if let Some(e) = o.get("elem") {
                let mut s = text(&e["val"]);
                if let Some(t) = e.get("timeout") {
                    s += &format!(" timeout {t}s");
                }
                if let Some(c) = e.get("comment") {
                    s += &format!(" comment {c}");
                }
                return s;
            }
            for verdict in ["goto", "jump"] {
                if let Some(v) = o.get(verdict) {
                    return format!("{verdict} {}", text(&v["target"]));
                }
            }
            match o.keys().next() {
                Some(k) if o.len() == 1 && o[k].is_null() => k.clone(),
                _ => value.to_string(),
            }
        }
        other => other.to_string(),
    }
}

/// Every set's and map's elements, as nft spells them (timeouts without expiry).
fn listing(ns: &Netns, f: Family) -> Listing {
    let json: Json = serde_json::from_str(&nft(ns, &["-j", "list", "table", f.word, TABLE], None))
        .expect("nft -j output is JSON");
    let mut out = BTreeMap::new();
    for object in json["nftables"].as_array().expect("nftables array") {
        let Some(container) = object.get("set").or_else(|| object.get("map")) else {
            continue;
        };
        let name = container["name"].as_str().expect("name").to_string();
        let elements = container
            .get("elem")
            .and_then(Json::as_array)
            .map(|elems| elems.iter().map(text).collect())
            .unwrap_or_default();
        out.insert(name, elements);
    }
    out
}

fn set_of(items: &[String]) -> BTreeSet<String> {
    items.iter().cloned().collect()
}

/// Each set's and map's elements as nft lists them.
type Listing = BTreeMap<String, BTreeSet<String>>;

/// The elements of the first test, and how nft lists them.
fn sample(f: Family) -> (Vec<(&'static str, Element)>, Listing) {
    let s1 = f.service(1);
    let s2 = f.service(2);
    let (c1, e1, e2) = (f.client(1), f.endpoint(1), f.endpoint(2));
    let dnat = |service: &str, port, n, endpoint: &str, target| {
        Element::new(Value::concat([
            addr(service),
            TCP,
            Part::Port(port),
            Part::Integer(n),
        ]))
        .value(Value::concat([addr(endpoint), Part::Port(target)]))
    };
    let vmap = |service: &str, proto, port, verdict| {
        Element::new(Value::concat([addr(service), proto, Part::Port(port)])).verdict(verdict)
    };
    let elements = vec![
        ("svc_dnat", dnat(&s1, 80, 0, &e1, 8080)),
        ("svc_dnat", dnat(&s1, 80, 1, &e2, 8080)),
        ("svc_dnat", dnat(&s2, 443, 7, &e2, 8443)),
        ("svc_vmap", vmap(&s1, TCP, 80, Verdict::Goto("svc1".into()))),
        ("svc_vmap", vmap(&s1, UDP, 53, Verdict::Jump("svc2".into()))),
        ("svc_vmap", vmap(&s2, TCP, 443, Verdict::Drop)),
        ("svc_vmap", vmap(&s2, TCP, 444, Verdict::Accept)),
        ("svc_vmap", vmap(&s2, TCP, 445, Verdict::Return)),
        (
            "svc_ranges",
            Element::new(Value::concat([
                addr(&c1),
                TCP,
                Part::Port(80),
                addr(f.prefix),
            ]))
            .to(Value::concat([
                addr(&c1),
                TCP,
                Part::Port(80),
                addr(f.prefix_end),
            ])),
        ),
        (
            "svc_ranges",
            Element::new(Value::concat([
                addr(&c1),
                TCP,
                Part::Port(1000),
                addr(f.range_start),
            ]))
            .to(Value::concat([
                addr(&c1),
                TCP,
                Part::Port(2000),
                addr(f.range_end),
            ])),
        ),
        (
            "svc_ranges",
            Element::new(Value::concat([addr(&c1), UDP, Part::Port(53), addr(&e1)])),
        ),
        (
            "affinity",
            Element::new(Value::concat([addr(&c1), addr(&s1), TCP, Part::Port(80)]))
                .value(Value::concat([addr(&e1), Part::Port(8080)]))
                .timeout(Duration::from_secs(10800))
                .comment("ns/web:http"),
        ),
        (
            "affinity",
            Element::new(Value::concat([addr(&c1), addr(&s2), TCP, Part::Port(443)]))
                .value(Value::concat([addr(&e2), Part::Port(8443)])),
        ),
    ];
    let mut expected = BTreeMap::new();
    expected.insert(
        "svc_dnat".to_string(),
        set_of(&[
            format!("{s1} . tcp . 80 . 0 : {e1} . 8080"),
            format!("{s1} . tcp . 80 . 1 : {e2} . 8080"),
            format!("{s2} . tcp . 443 . 7 : {e2} . 8443"),
        ]),
    );
    expected.insert(
        "svc_vmap".to_string(),
        set_of(&[
            format!("{s1} . tcp . 80 : goto svc1"),
            format!("{s1} . udp . 53 : jump svc2"),
            format!("{s2} . tcp . 443 : drop"),
            format!("{s2} . tcp . 444 : accept"),
            format!("{s2} . tcp . 445 : return"),
        ]),
    );
    expected.insert(
        "svc_ranges".to_string(),
        set_of(&[
            format!("{c1} . tcp . 80 . {}/{}", f.prefix, f.prefix_len),
            format!("{c1} . tcp . 1000-2000 . {}-{}", f.range_start, f.range_end),
            format!("{c1} . udp . 53 . {e1}"),
        ]),
    );
    expected.insert(
        "affinity".to_string(),
        set_of(&[
            format!("{c1} . {s1} . tcp . 80 timeout 10800s comment \"ns/web:http\" : {e1} . 8080"),
            format!("{c1} . {s2} . tcp . 443 : {e2} . 8443"),
        ]),
    );
    (elements, expected)
}

fn add_all(ns: &Netns, f: Family, elements: &[(&str, Element)]) {
    let mut batch = ElementBatch::new(f.family, TABLE);
    for (set, element) in elements {
        batch.add(set, element).expect("valid element");
    }
    batch.send(&mut socket(ns)).expect("batch committed");
}

fn elements_added_over_netlink_are_what_nft_lists(f: Family) {
    let ns = Netns::new("nftelem");
    f.create(&ns);
    let (elements, expected) = sample(f);
    add_all(&ns, f, &elements);
    assert_eq!(listing(&ns, f), expected);

    // The timed affinity entry counts down from its timeout.
    let json: Json = serde_json::from_str(&nft(
        &ns,
        &["-j", "list", "map", f.word, TABLE, "affinity"],
        None,
    ))
    .expect("JSON");
    let expires: Vec<u64> = json["nftables"][1]["map"]["elem"]
        .as_array()
        .expect("elements")
        .iter()
        .filter_map(|e| e[0]["elem"]["expires"].as_u64())
        .collect();
    assert_eq!(expires.len(), 1, "{json}");
    assert!(
        (10790..=10800).contains(&expires[0]),
        "expires {}",
        expires[0]
    );
}

#[test]
fn ipv4_elements_added_over_netlink_are_what_nft_lists() {
    if possible() {
        elements_added_over_netlink_are_what_nft_lists(V4);
    }
}

#[test]
fn ipv6_elements_added_over_netlink_are_what_nft_lists() {
    if possible() {
        elements_added_over_netlink_are_what_nft_lists(V6);
    }
}

fn deleting_elements_removes_exactly_those(f: Family) {
    let ns = Netns::new("nftdel");
    f.create(&ns);
    let (elements, mut expected) = sample(f);
    add_all(&ns, f, &elements);

    // Delete one of each container (the interval one by its key and key end), flush another.
    let mut batch = ElementBatch::new(f.family, TABLE);
    for index in [1, 3, 9] {
        let (set, element) = &elements[index];
        batch.delete(set, element).expect("valid");
    }
    batch.flush("affinity").expect("valid");
    let committed = batch.send(&mut socket(&ns)).expect("deletes committed");
    assert_eq!(committed.elements, 3);
    assert_eq!(committed.messages, 4);

    let (s1, e2, c1) = (f.service(1), f.endpoint(2), f.client(1));
    expected
        .get_mut("svc_dnat")
        .map(|s| s.remove(&format!("{s1} . tcp . 80 . 1 : {e2} . 8080")));
    expected
        .get_mut("svc_vmap")
        .map(|s| s.remove(&format!("{s1} . tcp . 80 : goto svc1")));
    expected.get_mut("svc_ranges").map(|s| {
        s.remove(&format!(
            "{c1} . tcp . 1000-2000 . {}-{}",
            f.range_start, f.range_end
        ))
    });
    expected.insert("affinity".to_string(), BTreeSet::new());
    assert_eq!(listing(&ns, f), expected);
}

#[test]
fn ipv4_deleting_elements_removes_exactly_those() {
    if possible() {
        deleting_elements_removes_exactly_those(V4);
    }
}

#[test]
fn ipv6_deleting_elements_removes_exactly_those() {
    if possible() {
        deleting_elements_removes_exactly_those(V6);
    }
}

/// `count` dnat elements of distinct services from 10.100.0.0 (fd00:100::), endpoint `n % 250 + 1`.
fn many(f: Family, count: u32) -> Vec<Element> {
    (0..count)
        .map(|i| {
            let service = match f.family {
                IpFamily::V4 => Part::Ipv4(std::net::Ipv4Addr::from(0x0a64_0000 + i)),
                IpFamily::V6 => Part::Ipv6(std::net::Ipv6Addr::from(
                    0xfd00_0100_0000_0000_0000_0000_0000_0000u128 + u128::from(i),
                )),
            };
            Element::new(Value::concat([
                service,
                TCP,
                Part::Port(80),
                Part::Integer(0),
            ]))
            .value(Value::concat([
                addr(&f.endpoint(i % 250 + 1)),
                Part::Port(8080),
            ]))
        })
        .collect()
}

fn a_refused_batch_changes_nothing_and_names_the_element(f: Family) {
    let ns = Netns::new("nftbad");
    f.create(&ns);
    let (elements, expected) = sample(f);
    add_all(&ns, f, &elements);
    let mut socket = socket(&ns);

    // 3,000 good adds with a key one part short at #2,500 (in the second message), then
    // deletes and a flush: the kernel refuses the short key, and applies nothing.
    let good = many(f, 3000);
    let short = Element::new(Value::concat([addr(&f.service(9)), TCP, Part::Port(80)]))
        .value(Value::concat([addr(&f.endpoint(1)), Part::Port(8080)]));
    let mut batch = ElementBatch::new(f.family, TABLE);
    for (i, element) in good.iter().enumerate() {
        let element = if i == 2500 { &short } else { element };
        batch.add("svc_dnat", element).expect("valid");
    }
    batch.delete("svc_vmap", &elements[3].1).expect("valid");
    batch.flush("affinity").expect("valid");
    let error = batch
        .send(&mut socket)
        .expect_err("the short key is refused");
    eprintln!("{error}");
    match &error {
        ElementError::Refused {
            refused: Some((set, operation)),
            element: Some(element),
            errno,
            refused_messages,
            ..
        } => {
            assert_eq!(set, "svc_dnat");
            assert_eq!(*operation, Operation::Add);
            assert_eq!(element.index, 2500, "{error}");
            assert_eq!(element.key, format!("{} . tcp . 80", f.service(9)));
            assert_eq!(*errno, libc::EINVAL);
            assert_eq!(*refused_messages, 1);
        }
        other => panic!("unexpected error: {other}"),
    }
    assert!(error.to_string().contains("#2500"), "{error}");
    assert_eq!(listing(&ns, f), expected, "a refused batch changes nothing");

    // Deleting an element that is not there, after an add and a delete that would succeed:
    // refused, named, nothing changed.
    let mut batch = ElementBatch::new(f.family, TABLE);
    let new = Element::new(Value::concat([addr(&f.service(3)), TCP, Part::Port(8)]));
    batch
        .add("svc_vmap", &new.verdict(Verdict::Drop))
        .expect("valid");
    batch.delete("svc_vmap", &elements[4].1).expect("valid");
    let gone = Element::new(Value::concat([addr(&f.service(4)), TCP, Part::Port(9)]));
    batch.delete("svc_vmap", &gone).expect("valid");
    let error = batch
        .send(&mut socket)
        .expect_err("deleting a missing element is refused");
    eprintln!("{error}");
    match &error {
        ElementError::Refused {
            refused: Some((set, Operation::Delete)),
            element: Some(element),
            errno,
            ..
        } => {
            assert_eq!(set, "svc_vmap");
            assert_eq!(element.index, 2);
            assert_eq!(element.key, format!("{} . tcp . 9", f.service(4)));
            assert_eq!(*errno, libc::ENOENT);
        }
        other => panic!("unexpected error: {other}"),
    }
    assert_eq!(listing(&ns, f), expected, "a refused batch changes nothing");

    // A flush of a set that does not exist is refused as a whole message.
    let mut batch = ElementBatch::new(f.family, TABLE);
    batch.flush("nope").expect("valid name");
    match batch.send(&mut socket) {
        Err(ElementError::Refused {
            refused: Some((set, Operation::Flush)),
            element: None,
            errno,
            ..
        }) => {
            assert_eq!(set, "nope");
            assert_eq!(errno, libc::ENOENT);
        }
        other => panic!("unexpected outcome: {other:?}"),
    }
}

#[test]
fn ipv4_a_refused_batch_changes_nothing_and_names_the_element() {
    if possible() {
        a_refused_batch_changes_nothing_and_names_the_element(V4);
    }
}

#[test]
fn ipv6_a_refused_batch_changes_nothing_and_names_the_element() {
    if possible() {
        a_refused_batch_changes_nothing_and_names_the_element(V6);
    }
}

#[test]
fn deleting_a_missing_element_names_it() {
    if !possible() {
        return;
    }
    let f = V4;
    let ns = Netns::new("nftmiss");
    f.create(&ns);
    let (elements, expected) = sample(f);
    add_all(&ns, f, &elements);
    let mut batch = ElementBatch::new(f.family, TABLE);
    for (set, element) in &elements[..3] {
        batch.delete(set, element).expect("valid");
    }
    let missing = Element::new(Value::concat([
        addr("10.96.0.3"),
        TCP,
        Part::Port(80),
        Part::Integer(0),
    ]));
    batch.delete("svc_dnat", &missing).expect("valid");
    let error = batch
        .send(&mut socket(&ns))
        .expect_err("deleting a missing element is refused");
    match &error {
        ElementError::Refused {
            refused: Some((set, Operation::Delete)),
            element: Some(element),
            errno,
            ..
        } => {
            assert_eq!(set, "svc_dnat");
            assert_eq!(element.index, 3);
            assert_eq!(element.key, "10.96.0.3 . tcp . 80 . 0");
            assert_eq!(*errno, libc::ENOENT);
        }
        other => panic!("unexpected error: {other}"),
    }
    assert_eq!(listing(&ns, f), expected, "a refused batch changes nothing");
}

fn a_hundred_thousand_elements_in_one_batch(f: Family) {
    let ns = Netns::new("nft100k");
    f.create(&ns);
    let elements = many(f, 100_000);
    let started = Instant::now();
    let mut batch = ElementBatch::new(f.family, TABLE);
    for element in &elements {
        batch.add("svc_dnat", element).expect("valid");
    }
    let committed = batch.send(&mut socket(&ns)).expect("committed");
    eprintln!(
        "{}: 100,000 elements in {} messages, {} bytes, {:?}",
        f.word,
        committed.messages,
        committed.bytes,
        started.elapsed()
    );
    assert_eq!(committed.elements, 100_000);
    let json: Json = serde_json::from_str(&nft(
        &ns,
        &["-j", "list", "map", f.word, TABLE, "svc_dnat"],
        None,
    ))
    .expect("JSON");
    let listed = json["nftables"][1]["map"]["elem"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(listed, 100_000);
    // The last one is there, as sent.
    let last = format!(
        "{{ {} . tcp . 80 . 0 }}",
        match f.family {
            IpFamily::V4 => std::net::Ipv4Addr::from(0x0a64_0000u32 + 99_999).to_string(),
            IpFamily::V6 =>
                std::net::Ipv6Addr::from(0xfd00_0100_0000_0000_0000_0000_0000_0000u128 + 99_999)
                    .to_string(),
        }
    );
    let out = nft(
        &ns,
        &["get", "element", f.word, TABLE, "svc_dnat", &last],
        None,
    );
    assert!(
        out.contains(&format!("{} . 8080", f.endpoint(99_999 % 250 + 1))),
        "{out}"
    );
}

#[test]
fn ipv4_a_hundred_thousand_elements_in_one_batch() {
    if possible() {
        a_hundred_thousand_elements_in_one_batch(V4);
    }
}

#[test]
fn ipv6_a_hundred_thousand_elements_in_one_batch() {
    if possible() {
        a_hundred_thousand_elements_in_one_batch(V6);
    }
}

/// The byte layout equals nft's: nft's own lookup, from its own parse of the key, finds the
/// element written over netlink, and does not find one that was not.
fn nft_get_element_finds_what_netlink_wrote(f: Family) {
    let ns = Netns::new("nftget");
    f.create(&ns);
    let (s1, e1) = (f.service(1), f.endpoint(1));
    let element = Element::new(Value::concat([
        addr(&s1),
        TCP,
        Part::Port(80),
        Part::Integer(0),
    ]))
    .value(Value::concat([addr(&e1), Part::Port(8080)]));
    add_all(&ns, f, &[("svc_dnat", element)]);
    let key = format!("{{ {s1} . tcp . 80 . 0 }}");
    let out = nft(
        &ns,
        &["get", "element", f.word, TABLE, "svc_dnat", &key],
        None,
    );
    assert!(
        out.contains(&format!("{s1} . tcp . 80 . 0 : {e1} . 8080")),
        "{out}"
    );
    // The kernel's own lookup agrees.
    let mut socket = socket(&ns);
    let mut found = |key: Value| {
        elements::contains(&mut socket, f.family, TABLE, "svc_dnat", &Element::new(key))
            .expect("lookup")
    };
    assert!(found(Value::concat([
        addr(&s1),
        TCP,
        Part::Port(80),
        Part::Integer(0)
    ])));
    assert!(!found(Value::concat([
        addr(&s1),
        TCP,
        Part::Port(80),
        Part::Integer(1)
    ])));
    for other in [
        format!("{{ {s1} . tcp . 80 . 1 }}"),
        format!("{{ {s1} . udp . 80 . 0 }}"),
        format!("{{ {s1} . tcp . 20480 . 0 }}"),
    ] {
        let miss = ns.run(
            &["nft", "get", "element", f.word, TABLE, "svc_dnat", &other],
            None,
        );
        assert!(!miss.status.success(), "{other} was found");
    }
}

#[test]
fn ipv4_nft_get_element_finds_what_netlink_wrote() {
    if possible() {
        nft_get_element_finds_what_netlink_wrote(V4);
    }
}

#[test]
fn ipv6_nft_get_element_finds_what_netlink_wrote() {
    if possible() {
        nft_get_element_finds_what_netlink_wrote(V6);
    }
}

/// An add does not overwrite an element's data (the kernel refuses it); a delete and an add in
/// one batch does, atomically.
#[test]
fn changing_an_elements_data_is_a_delete_and_an_add_in_one_batch() {
    if !possible() {
        return;
    }
    let f = V4;
    let ns = Netns::new("nftrepl");
    f.create(&ns);
    let (elements, mut expected) = sample(f);
    add_all(&ns, f, &elements);
    let key = Value::concat([addr("10.96.0.1"), TCP, Part::Port(80)]);
    let moved = Element::new(key.clone()).verdict(Verdict::Goto("svc2".into()));

    let mut batch = ElementBatch::new(f.family, TABLE);
    batch.add("svc_vmap", &moved).expect("valid");
    match batch.send(&mut socket(&ns)) {
        Err(ElementError::Refused {
            element: Some(element),
            errno,
            ..
        }) => {
            assert_eq!(element.key, "10.96.0.1 . tcp . 80");
            assert!(
                errno == libc::EEXIST || errno == libc::EBUSY,
                "errno {errno}"
            );
        }
        other => panic!("unexpected outcome: {other:?}"),
    }
    assert_eq!(listing(&ns, f), expected);

    let mut batch = ElementBatch::new(f.family, TABLE);
    batch.delete("svc_vmap", &Element::new(key)).expect("valid");
    batch.add("svc_vmap", &moved).expect("valid");
    batch.send(&mut socket(&ns)).expect("replaced");
    if let Some(vmap) = expected.get_mut("svc_vmap") {
        vmap.remove("10.96.0.1 . tcp . 80 : goto svc1");
        vmap.insert("10.96.0.1 . tcp . 80 : goto svc2".to_string());
    }
    assert_eq!(listing(&ns, f), expected);
}

// ---- Reading elements back over netlink (element_dump) ----

impl Family {
    fn addr_kind(self) -> PartKind {
        match self.family {
            IpFamily::V4 => PartKind::Ipv4,
            IpFamily::V6 => PartKind::Ipv6,
        }
    }

    /// The key and data layouts of the test table's sets and maps.
    fn layout(self, set: &str) -> (Vec<PartKind>, Option<Vec<PartKind>>) {
        use PartKind::{Integer, Port, Proto};
        let a = self.addr_kind();
        match set {
            "svc_dnat" => (vec![a, Proto, Port, Integer], Some(vec![a, Port])),
            "svc_vmap" => (vec![a, Proto, Port], None),
            "svc_ranges" => (vec![a, Proto, Port, a], None),
            "affinity" | "affinity_default" => (vec![a, a, Proto, Port], Some(vec![a, Port])),
            other => panic!("no layout for {other}"),
        }
    }
}

/// `set`'s elements over netlink; `None` when the table or set does not exist.
fn dump(
    socket: &mut NetfilterSocket,
    f: Family,
    table: &str,
    set: &str,
) -> Option<Vec<ListedElement>> {
    dump_as(socket, f, table, set, set)
}

/// `set`'s elements read with the layout of the test table's `layout_of`.
fn dump_as(
    socket: &mut NetfilterSocket,
    f: Family,
    table: &str,
    set: &str,
    layout_of: &str,
) -> Option<Vec<ListedElement>> {
    let (key, data) = f.layout(layout_of);
    element_dump::list(socket, f.family, table, set, &key, data.as_deref()).expect("dump")
}

/// Elements in a stable order, to compare lists whose order is the kernel's hash order.
fn sorted(mut elements: Vec<Element>) -> Vec<Element> {
    elements.sort_by_cached_key(|e| format!("{e:?}"));
    elements
}

fn elements_only(listed: &[ListedElement]) -> Vec<Element> {
    listed.iter().map(|l| l.element.clone()).collect()
}

fn a_dump_reads_back_what_was_written(f: Family) {
    let ns = Netns::new("nftdump");
    f.create(&ns);
    let (written, _) = sample(f);
    add_all(&ns, f, &written);
    let mut socket = socket(&ns);
    for set in ["svc_dnat", "svc_vmap", "svc_ranges", "affinity"] {
        let expected: Vec<Element> = written
            .iter()
            .filter(|(s, _)| *s == set)
            .map(|(_, e)| e.clone())
            .collect();
        let listed = dump(&mut socket, f, TABLE, set).expect("the set exists");
        assert_eq!(
            sorted(elements_only(&listed)),
            sorted(expected.clone()),
            "{set}"
        );
        for l in &listed {
            match l.element.timeout {
                // The affinity entry with a timeout counts down from it.
                Some(timeout) => {
                    assert_eq!(timeout, Duration::from_secs(10800));
                    let expires = l.expires.expect("an element with a timeout expires");
                    assert!(
                        expires <= timeout && expires > timeout - Duration::from_secs(10),
                        "expires in {expires:?}"
                    );
                }
                None => assert_eq!(l.expires, None, "{set}: {:?}", l.element),
            }
        }
    }
    // The checks above can fail: a wrong layout is an error, not a silent misread.
    let (key, _) = f.layout("svc_vmap");
    let error = element_dump::list(&mut socket, f.family, TABLE, "svc_dnat", &key, None)
        .expect_err("the dnat map's key is longer than the vmap's");
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
    assert!(error.to_string().contains("does not fit"), "{error}");
}

#[test]
fn ipv4_a_dump_reads_back_what_was_written() {
    if possible() {
        a_dump_reads_back_what_was_written(V4);
    }
}

#[test]
fn ipv6_a_dump_reads_back_what_was_written() {
    if possible() {
        a_dump_reads_back_what_was_written(V6);
    }
}

/// Elements nft writes from its own text decode as the same elements built from parts: nft's
/// byte layout is the reader's (the integer in host order, ports in network order, key ends
/// from ranges and prefixes, comments in nft's user data), and a timeout given in the text
/// is read back with the time left.
fn elements_written_by_nft_decode_as_built_from_parts(f: Family) {
    let ns = Netns::new("nftdtext");
    f.create(&ns);
    let (s9, c1, e9) = (f.service(9), f.client(1), f.endpoint(9));
    let w = f.word;
    let script = format!(
        "add map {w} {TABLE} affinity_default {{ type {a} . {a} . inet_proto . inet_service : {a} . inet_service; flags timeout; timeout 30s; }}
add element {w} {TABLE} svc_dnat {{ {s9} . tcp . 8080 . 5 : {e9} . 9090, {s9} . udp . 53 . 65535 comment \"dns\" : {e9} . 53 }}
add element {w} {TABLE} svc_vmap {{ {s9} . sctp . 7 : goto svc1, {s9} . tcp . 1 : jump svc2, {s9} . tcp . 2 : drop }}
add element {w} {TABLE} svc_ranges {{ {c1} . tcp . 1000-2000 . {}/{}, {c1} . udp . 53 . {e9} }}
add element {w} {TABLE} affinity {{ {c1} . {s9} . tcp . 443 timeout 600s : {e9} . 8443 }}
add element {w} {TABLE} affinity_default {{ {c1} . {s9} . tcp . 80 : {e9} . 8080 }}
",
        f.prefix,
        f.prefix_len,
        a = f.addr_type,
    );
    nft(&ns, &["-f", "-"], Some(&script));
    let (s9, c1, e9) = (addr(&s9), addr(&c1), addr(&e9));
    let mut socket = socket(&ns);
    let mut read = |set| elements_only(&dump(&mut socket, f, TABLE, set).expect("exists"));

    let dnat = |proto, port, n| Value::concat([s9, proto, Part::Port(port), Part::Integer(n)]);
    let endpoint = |port| Value::concat([e9, Part::Port(port)]);
    assert_eq!(
        sorted(read("svc_dnat")),
        sorted(vec![
            Element::new(dnat(TCP, 8080, 5)).value(endpoint(9090)),
            Element::new(dnat(UDP, 53, 65535))
                .value(endpoint(53))
                .comment("dns"),
        ])
    );
    let vmap = |proto, port| Value::concat([s9, proto, Part::Port(port)]);
    assert_eq!(
        sorted(read("svc_vmap")),
        sorted(vec![
            Element::new(vmap(Part::Proto(132), 7)).verdict(Verdict::Goto("svc1".into())),
            Element::new(vmap(TCP, 1)).verdict(Verdict::Jump("svc2".into())),
            Element::new(vmap(TCP, 2)).verdict(Verdict::Drop),
        ])
    );
    let range = |proto, port, last| Value::concat([c1, proto, Part::Port(port), last]);
    assert_eq!(
        sorted(read("svc_ranges")),
        sorted(vec![
            Element::new(range(TCP, 1000, addr(f.prefix))).to(range(TCP, 2000, addr(f.prefix_end))),
            // nft sends a key end equal to the key: read as a single value.
            Element::new(range(UDP, 53, e9)),
        ])
    );

    // A per-element timeout, as the packet path's `update @affinity { … timeout T }` sets it.
    let affinity = dump(&mut socket, f, TABLE, "affinity").expect("exists");
    let key = |port| Value::concat([c1, s9, TCP, Part::Port(port)]);
    assert_eq!(
        elements_only(&affinity),
        vec![Element::new(key(443))
            .value(endpoint(8443))
            .timeout(Duration::from_secs(600))]
    );
    let expires = affinity[0].expires.expect("it expires");
    assert!(
        expires <= Duration::from_secs(600) && expires > Duration::from_secs(590),
        "expires in {expires:?}"
    );
    // The set's default timeout: no timeout of the element's own, but an expiry.
    let default = dump(&mut socket, f, TABLE, "affinity_default").expect("exists");
    assert_eq!(
        elements_only(&default),
        vec![Element::new(key(80)).value(endpoint(8080))]
    );
    let expires = default[0].expires.expect("it expires");
    assert!(
        expires <= Duration::from_secs(30) && expires > Duration::from_secs(20),
        "expires in {expires:?}"
    );
}

#[test]
fn ipv4_elements_written_by_nft_decode_as_built_from_parts() {
    if possible() {
        elements_written_by_nft_decode_as_built_from_parts(V4);
    }
}

#[test]
fn ipv6_elements_written_by_nft_decode_as_built_from_parts() {
    if possible() {
        elements_written_by_nft_decode_as_built_from_parts(V6);
    }
}

#[test]
fn a_missing_table_or_set_is_none_and_an_empty_map_is_empty() {
    if !possible() {
        return;
    }
    let f = V4;
    let ns = Netns::new("nftdnone");
    let mut socket = socket(&ns);
    assert_eq!(dump(&mut socket, f, TABLE, "svc_dnat"), None, "no table");
    f.create(&ns);
    assert_eq!(dump(&mut socket, f, TABLE, "svc_dnat"), Some(Vec::new()));
    assert_eq!(
        dump_as(&mut socket, f, TABLE, "nope", "svc_dnat"),
        None,
        "no set"
    );
    assert_eq!(
        dump(&mut socket, f, "other", "svc_dnat"),
        None,
        "no such table"
    );
    // The table of the other family is not this one.
    assert_eq!(
        dump(&mut socket, V6, TABLE, "svc_dnat"),
        None,
        "no ip6 table"
    );
    let (key, data) = f.layout("svc_dnat");
    let mut seen = 0;
    let present = element_dump::for_each(
        &mut socket,
        f.family,
        TABLE,
        "nope",
        &key,
        data.as_deref(),
        |_| seen += 1,
    )
    .expect("dump");
    assert!(!present);
    assert_eq!(seen, 0);
    // After a flush, empty again; the socket still answers after the missing ones.
    add_all(&ns, f, &sample(f).0);
    assert_eq!(
        dump(&mut socket, f, TABLE, "svc_dnat").map(|l| l.len()),
        Some(3)
    );
    let mut batch = ElementBatch::new(f.family, TABLE);
    batch.flush("svc_dnat").expect("valid");
    batch.send(&mut socket).expect("flushed");
    assert_eq!(dump(&mut socket, f, TABLE, "svc_dnat"), Some(Vec::new()));
}

fn a_hundred_thousand_elements_dump_whole(f: Family) {
    let ns = Netns::new("nftd100k");
    f.create(&ns);
    let written = many(f, 100_000);
    let mut batch = ElementBatch::new(f.family, TABLE);
    for element in &written {
        batch.add("svc_dnat", element).expect("valid");
    }
    let mut socket = socket(&ns);
    batch.send(&mut socket).expect("committed");
    // At once: the kernel is still growing the map's hash table, which reorders the walk
    // (a dump then repeats and misses elements; `list` notices and dumps again).
    let started = Instant::now();
    let mut listed = elements_only(&dump(&mut socket, f, TABLE, "svc_dnat").expect("exists"));
    eprintln!(
        "{}: 100,000 elements dumped in {:?}",
        f.word,
        started.elapsed()
    );
    assert_eq!(listed.len(), 100_000);
    // Written in increasing service address order: the same order by key bytes.
    listed.sort_by_cached_key(|e| e.key.encode());
    assert_eq!(listed[99_999], written[99_999]);
    assert_eq!(listed[12_345], written[12_345]);
    assert!(listed == written, "the dump differs from what was written");
    assert!(listed
        .iter()
        .all(|e| matches!(&e.data, Some(Data::Value(v)) if v.parts().len() == 2)));
}

#[test]
fn ipv4_a_hundred_thousand_elements_dump_whole() {
    if possible() {
        a_hundred_thousand_elements_dump_whole(V4);
    }
}

#[test]
fn ipv6_a_hundred_thousand_elements_dump_whole() {
    if possible() {
        a_hundred_thousand_elements_dump_whole(V6);
    }
}

/// Transactions committed while a dump runs make it interrupted: `for_each` says so, `list`
/// retries and gives up after its attempts. Without transactions the same dumps complete.
#[test]
fn a_dump_during_transactions_is_interrupted() {
    if !possible() {
        return;
    }
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let f = V4;
    let ns = Netns::new("nftdintr");
    f.create(&ns);
    let mut batch = ElementBatch::new(f.family, TABLE);
    for element in many(f, 50_000) {
        batch.add("svc_dnat", &element).expect("valid");
    }
    let mut socket = socket(&ns);
    batch.send(&mut socket).expect("committed");
    let (key, data) = f.layout("svc_dnat");
    // Without transactions a dump completes (once the kernel has finished growing the map's
    // hash table after the load, which interrupts dumps too).
    let mut complete = Vec::new();
    for _ in 0..5 {
        let mut count = 0;
        let outcome = element_dump::for_each(
            &mut socket,
            f.family,
            TABLE,
            "svc_dnat",
            &key,
            data.as_deref(),
            |_| count += 1,
        );
        complete.push(
            outcome
                .map(|present| (present, count))
                .map_err(|e| e.kind()),
        );
        if complete.last().is_some_and(Result::is_ok) {
            break;
        }
    }
    assert_eq!(complete.last(), Some(&Ok((true, 50_000))), "{complete:?}");

    let stop = AtomicBool::new(false);
    let commits = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            // Adds and deletes one verdict map element, one transaction each, until stopped.
            let mut writer = NetfilterSocket::open_in(Some(&ns.name)).expect("socket");
            let element = Element::new(Value::concat([addr(&f.service(200)), TCP, Part::Port(1)]));
            let mut present = false;
            while !stop.load(Ordering::Relaxed) {
                let mut batch = ElementBatch::new(f.family, TABLE);
                if present {
                    batch.delete("svc_vmap", &element).expect("valid");
                } else {
                    batch
                        .add("svc_vmap", &element.clone().verdict(Verdict::Drop))
                        .expect("valid");
                }
                batch.send(&mut writer).expect("committed");
                present = !present;
                commits.fetch_add(1, Ordering::Relaxed);
            }
        });
        while commits.load(Ordering::Relaxed) < 10 {
            std::thread::yield_now();
        }
        // Commits land between the dump's messages; a few tries for a scheduler that runs
        // the writer late.
        let mut outcomes = Vec::new();
        for _ in 0..5 {
            let before = commits.load(Ordering::Relaxed);
            let outcome = element_dump::for_each(
                &mut socket,
                f.family,
                TABLE,
                "svc_dnat",
                &key,
                data.as_deref(),
                |_| {},
            );
            let during = commits.load(Ordering::Relaxed) - before;
            outcomes.push((outcome.map_err(|e| (e.kind(), e.to_string())), during));
            if outcomes.iter().any(|(o, _)| o.is_err()) {
                break;
            }
        }
        let listed = element_dump::list(
            &mut socket,
            f.family,
            TABLE,
            "svc_dnat",
            &key,
            data.as_deref(),
        );
        stop.store(true, Ordering::Relaxed);
        eprintln!("for_each outcomes (result, commits during): {outcomes:?}");
        let interrupted = outcomes.iter().find_map(|(o, _)| o.clone().err());
        let (kind, text) = interrupted.expect("a dump during transactions is interrupted");
        assert_eq!(kind, std::io::ErrorKind::Interrupted);
        assert!(
            text.starts_with("the dump of ip set svc_dnat of table t was interrupted"),
            "{text}"
        );
        match listed {
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::Interrupted);
                assert!(e.to_string().starts_with("each of 3 dumps"), "{e}");
            }
            // A list can run between commits when the writer is descheduled: then whole.
            Ok(Some(elements)) => assert_eq!(elements.len(), 50_000),
            Ok(None) => panic!("the map exists"),
        }
    });
}
