//! Removes the `maps` layout's affinity entries that pin a client to an endpoint its frontend
//! no longer has (which ones: [`crate::nftables::affinity_pins`]), right after the commit
//! that removed the endpoint: only the clients pinned to it pick again, and none stays pinned
//! to an endpoint that is gone.
//!
//! The entries are read with a netlink dump and deleted in one batch. An entry can expire
//! between the two (the kernel then refuses the batch: `ENOENT`), and a packet that chose its
//! endpoint just before the commit can record it just after the dump: so the sweep lists
//! again after deleting, until a listing finds nothing stale, [`PASSES`] times at most.
//! Until the sweep has run (milliseconds after the commit) a pinned client of a removed
//! endpoint can still be sent to it (docs/maps-layout.md, "Endpoint removal and affinity").

use std::net::IpAddr;

use super::element_dump;
use super::elements::{self, ElementBatch, ElementError, Part, PartKind};
use crate::family::IpFamily;
use crate::model::Protocol;
use crate::nftables::affinity_pins::{stale_pins, AffinityPin, ElementLookup};
use crate::nftables::translate::maps::AFFINITY;
use crate::sync::netlink::NetfilterSocket;
use crate::sync::SyncError;

/// Listings (and deletions) per sweep at most.
pub const PASSES: usize = 3;

/// Deletes the entries of `table`'s affinity map that are stale against `wanted` (the
/// elements committed); returns how many were deleted.
pub fn sweep(
    socket: &mut NetfilterSocket,
    family: IpFamily,
    table: &str,
    wanted: &dyn ElementLookup,
) -> Result<usize, SyncError> {
    let error = |message: String| SyncError::Refused {
        tool: "nf_tables netlink".into(),
        family,
        object: Some(format!("map {table} {AFFINITY}")),
        message,
    };
    let address = match family {
        IpFamily::V4 => PartKind::Ipv4,
        IpFamily::V6 => PartKind::Ipv6,
    };
    let key = [address, address, PartKind::Proto, PartKind::Port];
    let data = [address, PartKind::Port];
    let mut deleted = 0;
    for _ in 0..PASSES {
        let listed = element_dump::list(socket, family, table, AFFINITY, &key, Some(&data))
            .map_err(|e| error(format!("cannot list the affinity entries: {e}")))?
            .unwrap_or_default();
        let (pins, positions): (Vec<AffinityPin>, Vec<usize>) = listed
            .iter()
            .enumerate()
            .filter_map(|(i, l)| pin_of(&l.element).map(|pin| (pin, i)))
            .unzip();
        let stale = stale_pins(wanted, &pins);
        if stale.is_empty() {
            return Ok(deleted);
        }
        let mut batch = ElementBatch::new(family, table);
        for i in stale {
            let entry = &listed[positions[i]].element;
            batch
                .delete(AFFINITY, &elements::Element::new(entry.key.clone()))
                .map_err(|e| error(e.to_string()))?;
        }
        match batch.send(socket) {
            Ok(committed) => deleted += committed.elements,
            // An entry expired since the listing: list again.
            Err(ElementError::Refused { errno, .. }) if errno == libc::ENOENT => {}
            Err(e) => return Err(error(e.to_string())),
        }
    }
    Ok(deleted)
}

/// An entry's key and data as an [`AffinityPin`]; `None` for a shape kproxy does not write.
fn pin_of(element: &elements::Element) -> Option<AffinityPin> {
    let address = |part: &Part| match *part {
        Part::Ipv4(a) => Some(IpAddr::V4(a)),
        Part::Ipv6(a) => Some(IpAddr::V6(a)),
        _ => None,
    };
    let [client, frontend, Part::Proto(protocol), Part::Port(port)] = element.key.parts() else {
        return None;
    };
    let Some(elements::Data::Value(data)) = &element.data else {
        return None;
    };
    let [endpoint, Part::Port(endpoint_port)] = data.parts() else {
        return None;
    };
    Some(AffinityPin {
        client: address(client)?,
        frontend: address(frontend)?,
        protocol: Protocol::from_number(*protocol)?,
        port: *port,
        endpoint: address(endpoint)?,
        endpoint_port: *endpoint_port,
    })
}
