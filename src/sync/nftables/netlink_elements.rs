//! A transaction whose set and map elements go to the kernel over netlink (issue 11, the
//! `maps` layout: docs/maps-layout.md, "Syncing"). `nft -f` spends most of a large load
//! parsing its own text; elements are most of the `maps` layout, and [`super::elements`]
//! encodes them straight into the kernel's wire format. Chains, rules and declarations stay
//! `nft -f` text: netlink would mean hand-encoding every rule expression.
//!
//! [`ElementRoute::split`] cuts a transaction (in the syncer's phase order) into three steps,
//! each atomic on its own, in dependency order:
//!
//! 1. **`nft -f`, before**: the table, chains and their rules, set and map declarations,
//!    flushes of chains, deletions of containers no longer wanted — everything elements may
//!    refer to (a verdict element's chain must exist before the element).
//! 2. **netlink**: element deletions, flushes of sets and maps and element additions, as one
//!    batch ([`super::elements::ElementBatch`]).
//! 3. **`nft -f`, after**: deletions that come after elements in the transaction (chains
//!    that deleted elements pointed at), and the other layout's table when a node switches
//!    layouts — deleted only once the new table routes, so that a refused step 2 leaves the
//!    old table working.
//!
//! A sync that changes only elements — every endpoint and service change in the `maps`
//! layout — is step 2 alone: one atomic batch. When a step is refused, the steps before it
//! stay applied (new chains and declarations nothing points at yet, or rewritten fixed
//! chains) and the syncer's next sync is full.

use std::fmt::Write as _;

use super::elements::{self, Data, Part};
use crate::nftables::{Command, Element, ElementValue, Object, ObjectId, Value, Verdict};

/// One element operation of step 2, borrowed from the transaction.
#[derive(Debug, Clone, Copy)]
pub enum ElementOp<'c> {
    Add(&'c Element),
    Delete {
        container: &'c str,
        key: &'c [Value],
    },
    Flush(&'c str),
}

/// A transaction cut into its three steps (module docs).
#[derive(Debug, Default)]
pub struct ElementRoute<'c> {
    pub before: Vec<Command<'c>>,
    pub elements: Vec<ElementOp<'c>>,
    pub after: Vec<Command<'c>>,
}

impl<'c> ElementRoute<'c> {
    /// Splits `commands`, which are in the syncer's phase order: element commands (and
    /// flushes of sets and maps) go to step 2; a deletion that follows an element command
    /// goes to step 3; everything else to step 1.
    pub fn split(commands: &'c [Command<'c>]) -> ElementRoute<'c> {
        let mut route = ElementRoute::default();
        for command in commands {
            match *command {
                Command::Add(Object::Element(element)) => {
                    route.elements.push(ElementOp::Add(element))
                }
                Command::Delete(ObjectId::Element { container, key }) => {
                    route.elements.push(ElementOp::Delete { container, key })
                }
                Command::Flush(ObjectId::Set(name) | ObjectId::Map(name)) => {
                    route.elements.push(ElementOp::Flush(name))
                }
                Command::Delete(_) if !route.elements.is_empty() => route.after.push(*command),
                _ => route.before.push(*command),
            }
        }
        route
    }
}

/// The wire form of a model element: its key (with the key end of a range), data and
/// comment.
pub fn wire_element(element: &Element) -> Result<elements::Element, String> {
    let mut wire = wire_key(&element.key)?;
    wire.data = match &element.value {
        None => None,
        Some(ElementValue::Data(values)) => Some(Data::Value(wire_data(values)?)),
        Some(ElementValue::Verdict(verdict)) => Some(Data::Verdict(wire_verdict(verdict)?)),
    };
    wire.comment = element.comment.as_ref().map(|c| c.to_string());
    Ok(wire)
}

/// The wire form of a key. A network is a range from its first to its last address: the
/// key holds every part's start, the key end every part's end (a concatenated interval set
/// compares part by part, ends included).
pub fn wire_key(key: &[Value]) -> Result<elements::Element, String> {
    let mut start = Vec::with_capacity(key.len());
    let mut end = Vec::with_capacity(key.len());
    let mut range = false;
    for value in key {
        match value {
            Value::Net(net) => {
                range = true;
                start.push(address_part(net.network()));
                end.push(address_part(net.broadcast()));
            }
            other => {
                let part = scalar_part(other)?;
                start.push(part);
                end.push(part);
            }
        }
    }
    let element = elements::Element::new(elements::Value::concat(start));
    Ok(if range {
        element.to(elements::Value::concat(end))
    } else {
        element
    })
}

fn wire_data(values: &[Value]) -> Result<elements::Value, String> {
    let parts = values
        .iter()
        .map(scalar_part)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(elements::Value::concat(parts))
}

fn wire_verdict(verdict: &Verdict) -> Result<elements::Verdict, String> {
    Ok(match verdict {
        Verdict::Jump(chain) => elements::Verdict::Jump(chain.to_string()),
        Verdict::Goto(chain) => elements::Verdict::Goto(chain.to_string()),
        Verdict::Drop => elements::Verdict::Drop,
        Verdict::Reject => return Err("reject is a statement, not a map verdict".into()),
    })
}

fn address_part(address: std::net::IpAddr) -> Part {
    match address {
        std::net::IpAddr::V4(a) => Part::Ipv4(a),
        std::net::IpAddr::V6(a) => Part::Ipv6(a),
    }
}

fn scalar_part(value: &Value) -> Result<Part, String> {
    Ok(match value {
        Value::Addr(address) => address_part(*address),
        Value::Protocol(protocol) => Part::Proto(protocol.number()),
        Value::Port(port) => Part::Port(*port),
        Value::Integer(n) => Part::Integer(*n),
        Value::Net(_) | Value::Set { .. } => {
            let mut text = String::new();
            let _ = write!(text, "{value:?}");
            return Err(format!("{text} has no place in an element's data"));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;
    use crate::nftables::{Chain, Name};
    use std::net::Ipv4Addr;

    fn element(container: &str, key: Vec<Value>, value: Option<ElementValue>) -> Element {
        Element {
            container: Name::from(container),
            key: key.into(),
            value,
            comment: None,
        }
    }

    #[test]
    fn a_network_in_a_key_is_a_range_from_its_first_to_its_last_address() {
        let key = vec![
            Value::Addr("10.0.0.1".parse().expect("address")),
            Value::Protocol(Protocol::Tcp),
            Value::Port(80),
            Value::Net("203.0.113.0/24".parse().expect("network")),
        ];
        let wire = wire_key(&key).expect("a key");
        assert_eq!(
            wire.key.to_string(),
            "10.0.0.1 . tcp . 80 . 203.0.113.0",
            "start"
        );
        assert_eq!(
            wire.key_end.map(|v| v.to_string()).as_deref(),
            Some("10.0.0.1 . tcp . 80 . 203.0.113.255")
        );
        let plain = wire_key(&key[..3]).expect("a key");
        assert_eq!(plain.key_end, None);
    }

    #[test]
    fn data_and_verdicts_are_carried_and_what_has_no_wire_form_is_refused() {
        let endpoint = element(
            "cluster-endpoints",
            vec![Value::Integer(2)],
            Some(ElementValue::Data(smallvec::smallvec![
                Value::Addr("10.244.1.5".parse().expect("address")),
                Value::Port(8080),
            ])),
        );
        let wire = wire_element(&endpoint).expect("an element");
        assert_eq!(
            wire.data,
            Some(Data::Value(elements::Value::concat([
                Part::Ipv4(Ipv4Addr::new(10, 244, 1, 5)),
                Part::Port(8080)
            ])))
        );
        let goto = element(
            "service-ips",
            vec![Value::Port(1)],
            Some(ElementValue::Verdict(Verdict::Goto("pick-3".into()))),
        );
        assert_eq!(
            wire_element(&goto).expect("an element").data,
            Some(Data::Verdict(elements::Verdict::Goto("pick-3".into())))
        );
        let reject = element(
            "m",
            vec![Value::Port(1)],
            Some(ElementValue::Verdict(Verdict::Reject)),
        );
        assert!(wire_element(&reject).is_err());
        let net_data = element(
            "m",
            vec![Value::Port(1)],
            Some(ElementValue::Data(smallvec::smallvec![Value::Net(
                "10.0.0.0/8".parse().expect("network"),
            )])),
        );
        assert!(wire_element(&net_data).is_err());
    }

    #[test]
    fn elements_go_between_the_declarations_and_the_deletions_that_follow_them() {
        let chain = Chain {
            name: "pick-2".into(),
            base: None,
            comment: None,
            rules: Default::default(),
        };
        let add = element("service-ips", vec![Value::Port(1)], None);
        let gone_chain = ObjectId::Chain("pick-9".into());
        let gone_set = ObjectId::Set("old".into());
        let map = ObjectId::Map("affinity-timeouts".into());
        let stale = ObjectId::Element {
            container: "service-ips".into(),
            key: vec![Value::Port(2)],
        };
        let commands = [
            Command::Add(Object::Chain(&chain)),
            Command::Delete(&gone_set),
            Command::Flush(&map),
            Command::Delete(&stale),
            Command::Add(Object::Element(&add)),
            Command::Delete(&gone_chain),
        ];
        let route = ElementRoute::split(&commands);
        assert_eq!(route.before.len(), 2, "{:?}", route.before);
        assert!(matches!(route.before[0], Command::Add(Object::Chain(_))));
        assert!(matches!(route.before[1], Command::Delete(ObjectId::Set(_))));
        assert!(matches!(
            route.elements[..],
            [
                ElementOp::Flush("affinity-timeouts"),
                ElementOp::Delete {
                    container: "service-ips",
                    ..
                },
                ElementOp::Add(_)
            ]
        ));
        assert!(matches!(
            route.after[..],
            [Command::Delete(ObjectId::Chain(_))]
        ));
    }
}
