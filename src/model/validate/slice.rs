//! One EndpointSlice, checked as the API server would (api-validation.md §6), plus kproxy's
//! address policy (§7.3). A malformed slice is skipped whole; a bad endpoint is left out alone,
//! with a note, and the slice's other endpoints stay.

use std::collections::BTreeSet;
use std::sync::Arc;

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};

use super::address::{parse, Class};
use super::syntax::{
    is_dns1035_label, is_dns1123_label, is_dns1123_subdomain, is_label_value, protocol, shorten,
    Check, Indexed,
};
use super::{
    has_ignore_label, metadata_names, SliceEndpoint, SlicePort, SliceSpec, TopologyHints, Verdict,
    SERVICE_NAME_LABEL,
};
use crate::family::IpFamily;

/// §6.3 and §6.5: the API server's limits.
const MAX_ENDPOINTS: usize = 1000;
const MAX_ADDRESSES: usize = 100;
const MAX_PORTS: usize = 20000;
/// §6.4: per endpoint, per kind of hint.
const MAX_HINTS: usize = 8;

/// Checks one EndpointSlice (module docs).
pub fn validate_slice(slice: &EndpointSlice) -> Verdict<SliceSpec> {
    let mut left_out = Vec::new();
    match check(slice, &mut left_out) {
        Ok(Some(spec)) => Verdict::Proxied { spec, left_out },
        Ok(None) => Verdict::NotProxied,
        Err(reason) => Verdict::Skipped(reason),
    }
}

/// `Ok(None)`: valid, but not used by kube-proxy (FQDN, or another proxy's).
fn check(slice: &EndpointSlice, left_out: &mut Vec<String>) -> Check<Option<SliceSpec>> {
    let (namespace, name) =
        metadata_names(&slice.metadata, is_dns1123_subdomain, "DNS-1123 subdomain")?;
    if has_ignore_label(&slice.metadata) {
        return Ok(None);
    }
    let service_name = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .ok_or_else(|| {
            format!("label {SERVICE_NAME_LABEL} is missing, so it belongs to no Service")
        })?
        .clone();
    if !is_dns1035_label(&service_name) {
        return Err(format!(
            "label {SERVICE_NAME_LABEL} {:?} is not a valid Service name",
            shorten(&service_name)
        ));
    }
    let family = match slice.address_type.as_str() {
        "IPv4" => IpFamily::V4,
        "IPv6" => IpFamily::V6,
        "FQDN" => return Ok(None),
        other => {
            return Err(format!(
                "addressType {:?} is unknown (want IPv4, IPv6 or FQDN)",
                shorten(other)
            ))
        }
    };
    let ports = slice_ports(slice, left_out)?;
    if slice.endpoints.len() > MAX_ENDPOINTS {
        return Err(format!(
            "endpoints has {} entries; the API server allows at most {MAX_ENDPOINTS}",
            slice.endpoints.len()
        ));
    }
    let mut endpoints = Vec::with_capacity(slice.endpoints.len());
    for (i, endpoint) in slice.endpoints.iter().enumerate() {
        match slice_endpoint(endpoint, i, family) {
            Ok(endpoint) => endpoints.push(endpoint),
            Err(reason) => left_out.push(format!("{reason}; that endpoint is left out")),
        }
    }
    Ok(Some(SliceSpec {
        namespace,
        name,
        service_name,
        family,
        ports,
        endpoints,
    }))
}

/// `ports` (§6.5). A number outside 1–65535 is not checked by the API server; kube-proxy
/// ignores absent and 0 ones, kproxy leaves out the rest too (§7.3).
fn slice_ports(slice: &EndpointSlice, left_out: &mut Vec<String>) -> Check<Vec<SlicePort>> {
    let listed = slice.ports.as_deref().unwrap_or_default();
    if listed.len() > MAX_PORTS {
        return Err(format!(
            "ports has {} entries; the API server allows at most {MAX_PORTS}",
            listed.len()
        ));
    }
    let mut ports = Vec::new();
    let mut names = BTreeSet::new();
    for (i, port) in listed.iter().enumerate() {
        let field = Indexed("ports", i);
        // A hand-written manifest may leave out the name of an unnamed port; the API server
        // defaults it to "" (§2.2).
        let port_name = port.name.clone().unwrap_or_default();
        if !port_name.is_empty() && !is_dns1123_label(&port_name) {
            return Err(format!(
                "{field}.name {:?} is not a valid DNS-1123 label",
                shorten(&port_name)
            ));
        }
        let protocol = protocol(port.protocol.as_deref(), field)?;
        if !names.insert(port_name.clone()) {
            return Err(format!(
                "{field}.name {port_name:?} is used by more than one port (whatever the protocol)"
            ));
        }
        let number = match port.port {
            None | Some(0) => continue,
            Some(n) => match u16::try_from(n) {
                Ok(number) => number,
                Err(_) => {
                    left_out.push(format!(
                        "{field}.port {n} is outside 1..65535; that port is left out"
                    ));
                    continue;
                }
            },
        };
        ports.push(SlicePort {
            name: port_name,
            protocol,
            port: number,
        });
    }
    Ok(ports)
}

/// One endpoint (§6.3, §6.4); the error names the field and the reason.
fn slice_endpoint(endpoint: &Endpoint, i: usize, family: IpFamily) -> Check<SliceEndpoint> {
    let field = Indexed("endpoints", i);
    let count = endpoint.addresses.len();
    if count == 0 || count > MAX_ADDRESSES {
        return Err(format!(
            "{field}.addresses has {count} entries; the API server wants 1 to {MAX_ADDRESSES}"
        ));
    }
    let mut first = None;
    // Only the first address is used (§6.3), but the API server checks them all.
    for (j, text) in endpoint.addresses.iter().enumerate() {
        let field = EndpointAddress(i, j);
        let ip = parse(text, field)?;
        if let Some(class) = Class::of(ip) {
            return Err(format!("{field} {:?} is {class}", shorten(text)));
        }
        if IpFamily::of(&ip) != family {
            return Err(format!(
                "{field} {:?} is not an {family} address, but the slice's addressType is {family}",
                shorten(text)
            ));
        }
        first.get_or_insert(ip);
    }
    let Some(ip) = first else {
        return Err(format!("{field}.addresses is empty"));
    };
    if let Some(hostname) = &endpoint.hostname {
        if !is_dns1123_label(hostname) {
            return Err(format!(
                "{field}.hostname {:?} is not a valid DNS-1123 label",
                shorten(hostname)
            ));
        }
    }
    if let Some(node) = &endpoint.node_name {
        if !is_dns1123_subdomain(node) {
            return Err(format!(
                "{field}.nodeName {:?} is not a valid node name (DNS-1123 subdomain)",
                shorten(node)
            ));
        }
    }
    let hints = endpoint.hints.as_ref();
    let zone_hints: Vec<String> = hints
        .and_then(|h| h.for_zones.as_ref())
        .map(|z| z.iter().map(|z| z.name.clone()).collect())
        .unwrap_or_default();
    check_hints(
        &zone_hints,
        format_args!("{field}.hints.forZones"),
        is_label_value,
        "label value",
    )?;
    let node_hints: Vec<String> = hints
        .and_then(|h| h.for_nodes.as_ref())
        .map(|n| n.iter().map(|n| n.name.clone()).collect())
        .unwrap_or_default();
    check_hints(
        &node_hints,
        format_args!("{field}.hints.forNodes"),
        is_dns1123_subdomain,
        "node name (DNS-1123 subdomain)",
    )?;
    let conditions = endpoint.conditions.as_ref();
    Ok(SliceEndpoint {
        ip,
        ready: conditions.and_then(|c| c.ready).unwrap_or(true),
        serving: conditions.and_then(|c| c.serving).unwrap_or(true),
        terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
        node_name: endpoint.node_name.as_deref().map(Arc::from),
        hints: TopologyHints::new(zone_hints, node_hints),
    })
}

/// `endpoints[i].addresses[j]`, printed only when needed.
#[derive(Clone, Copy)]
struct EndpointAddress(usize, usize);

impl std::fmt::Display for EndpointAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "endpoints[{}].addresses[{}]", self.0, self.1)
    }
}

/// At most [`MAX_HINTS`] names, each valid, none twice (§6.4).
fn check_hints(
    names: &[String],
    field: std::fmt::Arguments<'_>,
    valid: fn(&str) -> bool,
    syntax: &str,
) -> Check<()> {
    if names.len() > MAX_HINTS {
        return Err(format!(
            "{field} has {} entries; the API server allows at most {MAX_HINTS}",
            names.len()
        ));
    }
    let mut seen = BTreeSet::new();
    for (k, name) in names.iter().enumerate() {
        if !valid(name) {
            return Err(format!(
                "{field}[{k}].name {:?} is not a valid {syntax}",
                shorten(name)
            ));
        }
        if !seen.insert(name) {
            return Err(format!("{field}[{k}].name {name:?} is listed twice"));
        }
    }
    Ok(())
}
