//! Validation: turns API objects into checked, family-independent specs. An object that fails
//! any check is reported (namespace/name and the reason) and left out; nothing of it reaches
//! the rules. Every string that can end up in rule text (names, port names) is checked against
//! the API server's own syntax here, and every address is re-printed from its parsed form, so
//! no field can inject rule text.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::Protocol;
use crate::family::{parse_cidr_sloppy, parse_ip_sloppy, IpFamily};
use crate::source::{ClusterState, Note, ObjectRef};

/// Label that links an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Objects with these labels are handled by someone else (kube-proxy's informer filter, §2.1).
const IGNORE_LABELS: [&str; 2] = [
    "service.kubernetes.io/service-proxy-name",
    "service.kubernetes.io/headless",
];
/// The API server's default for `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;
/// The API server's upper bound for it.
pub const MAX_AFFINITY_TIMEOUT: u32 = 86400;

/// The validated Services and EndpointSlices.
#[derive(Debug, Clone, Default)]
pub struct ValidCluster {
    pub services: Vec<ServiceSpec>,
    pub slices: Vec<SliceSpec>,
}

/// A Service that kproxy proxies, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    /// At most one per family.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<PortSpec>,
    pub external_ips: Vec<IpAddr>,
    /// Ingress IPs in VIP mode.
    pub load_balancer_ips: Vec<IpAddr>,
    pub source_ranges: Vec<IpNet>,
    pub affinity_timeout: Option<u32>,
    /// `externalTrafficPolicy: Local` on a Service that is externally accessible by type.
    pub external_policy_local: bool,
    pub internal_policy_local: bool,
    pub health_check_node_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
}

/// An EndpointSlice of an IP address type, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceSpec {
    pub namespace: String,
    pub name: String,
    /// The Service it belongs to (its `kubernetes.io/service-name` label).
    pub service_name: String,
    pub family: IpFamily,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub ip: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
    pub zone_hints: Vec<String>,
    pub node_hints: Vec<String>,
}

/// Validates every object; the invalid ones come back as notes.
pub fn validate(state: &ClusterState) -> (ValidCluster, Vec<Note>) {
    // Services and slices are independent until they are joined in the model.
    let ((services, mut notes), (slices, slice_notes)) = crate::parallel::join(
        || {
            check_all(
                &state.services,
                "Service",
                |s| &s.metadata,
                validate_service,
            )
        },
        || {
            check_all(
                &state.endpoint_slices,
                "EndpointSlice",
                |s| &s.metadata,
                validate_slice,
            )
        },
    );
    notes.extend(slice_notes);
    let mut cluster = ValidCluster { services, slices };
    reject_duplicates(&mut cluster, &mut notes);
    (cluster, notes)
}

/// Checks every object of one kind; `Ok(None)` objects are valid but not proxied.
fn check_all<T, S>(
    objects: &[T],
    kind: &str,
    metadata: impl Fn(&T) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    check: impl Fn(&T) -> Check<Option<S>>,
) -> (Vec<S>, Vec<Note>) {
    let mut valid = Vec::with_capacity(objects.len());
    let mut notes = Vec::new();
    for object in objects {
        match check(object) {
            Ok(Some(spec)) => valid.push(spec),
            Ok(None) => {}
            Err(reason) => notes.push(Note::Invalid {
                object: object_ref(kind, metadata(object)),
                reason,
            }),
        }
    }
    (valid, notes)
}

fn object_ref(
    kind: &str,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> ObjectRef {
    ObjectRef {
        kind: kind.to_string(),
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        name: meta.name.clone().unwrap_or_else(|| "<unnamed>".into()),
    }
}

/// Two objects with the same namespace/name cannot both be right: keep the first, report the rest.
fn reject_duplicates(cluster: &mut ValidCluster, notes: &mut Vec<Note>) {
    let mut seen = BTreeSet::new();
    cluster.services.retain(|s| {
        let fresh = seen.insert((s.namespace.clone(), s.name.clone()));
        if !fresh {
            notes.push(Note::Invalid {
                object: ObjectRef {
                    kind: "Service".into(),
                    namespace: s.namespace.clone(),
                    name: s.name.clone(),
                },
                reason: "defined more than once; the first definition is used".into(),
            });
        }
        fresh
    });
    let mut seen = BTreeSet::new();
    cluster.slices.retain(|s| {
        let fresh = seen.insert((s.namespace.clone(), s.name.clone()));
        if !fresh {
            notes.push(Note::Invalid {
                object: ObjectRef {
                    kind: "EndpointSlice".into(),
                    namespace: s.namespace.clone(),
                    name: s.name.clone(),
                },
                reason: "defined more than once; the first definition is used".into(),
            });
        }
        fresh
    });
}

type Check<T> = Result<T, String>;

/// A list element's field path (`spec.ports[2]`), printed only when a message needs it: most
/// objects are valid, and a large cluster has a great many ports and endpoints.
#[derive(Clone, Copy)]
struct Indexed(&'static str, usize);

impl fmt::Display for Indexed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.0, self.1)
    }
}

/// `endpoints[i].addresses[j]`, printed only when needed.
#[derive(Clone, Copy)]
struct EndpointAddress(usize, usize);

impl fmt::Display for EndpointAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "endpoints[{}].addresses[{}]", self.0, self.1)
    }
}

fn metadata_names(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    name_rule: fn(&str) -> bool,
    name_syntax: &str,
) -> Check<(String, String)> {
    let name = meta.name.clone().ok_or("metadata.name is missing")?;
    if !name_rule(&name) {
        return Err(format!(
            "metadata.name {:?} is not a valid {name_syntax}",
            shorten(&name)
        ));
    }
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    if !is_dns1123_label(&namespace) {
        return Err(format!(
            "metadata.namespace {:?} is not a valid DNS-1123 label",
            shorten(&namespace)
        ));
    }
    Ok((namespace, name))
}

fn has_ignore_label(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .is_some_and(|labels| IGNORE_LABELS.iter().any(|l| labels.contains_key(*l)))
}

/// Checks one Service. `Ok(None)`: a valid Service that kube-proxy does not proxy (headless,
/// ExternalName, or labelled for another proxy); `Err`: why it is skipped.
pub fn validate_service(service: &Service) -> Check<Option<ServiceSpec>> {
    let (namespace, name) = metadata_names(&service.metadata, is_dns1035_label, "DNS-1035 label")?;
    if has_ignore_label(&service.metadata) {
        return Ok(None);
    }
    let spec = service.spec.as_ref().ok_or("spec is missing")?;
    let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    match service_type {
        "ClusterIP" | "NodePort" | "LoadBalancer" => {}
        "ExternalName" => return Ok(None),
        other => return Err(format!("spec.type {:?} is unknown", shorten(other))),
    }

    let cluster_ips = cluster_ips(spec)?;
    if cluster_ips.is_empty() {
        return Ok(None); // headless, or no cluster IP allocated
    }

    let ports = spec.ports.as_deref().unwrap_or_default();
    let mut port_specs = Vec::with_capacity(ports.len());
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for (i, port) in ports.iter().enumerate() {
        let field = Indexed("spec.ports", i);
        let port_name = port.name.clone().unwrap_or_default();
        if port_name.is_empty() {
            if ports.len() > 1 {
                return Err(format!(
                    "{field}.name is required when a Service has several ports"
                ));
            }
        } else if !is_dns1123_label(&port_name) {
            return Err(format!(
                "{field}.name {:?} is not a valid DNS-1123 label",
                shorten(&port_name)
            ));
        }
        if !names.insert(port_name.clone()) {
            return Err(format!(
                "{field}.name {port_name:?} is used by more than one port"
            ));
        }
        let protocol = protocol(port.protocol.as_deref(), field)?;
        let number = port_number(port.port, format_args!("{field}.port"))?;
        if !numbers.insert((number, protocol)) {
            return Err(format!(
                "{field}: port {number}/{} is defined more than once",
                protocol.lower()
            ));
        }
        let node_port = optional_port(port.node_port, format_args!("{field}.nodePort"))?;
        match &port.target_port {
            Some(IntOrString::Int(n)) if *n != 0 => {
                port_number(*n, format_args!("{field}.targetPort"))?;
            }
            Some(IntOrString::String(named)) if !is_iana_svc_name(named) => {
                return Err(format!(
                    "{field}.targetPort {:?} is neither a port number nor a valid port name",
                    shorten(named)
                ));
            }
            _ => {}
        }
        port_specs.push(PortSpec {
            name: port_name,
            protocol,
            port: number,
            node_port,
        });
    }

    let external_ips = ip_list(spec.external_ips.as_deref(), "spec.externalIPs")?;
    let mut load_balancer_ips = Vec::new();
    let ingress = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_deref())
        .unwrap_or_default();
    for (i, ing) in ingress.iter().enumerate() {
        let Some(text) = ing.ip.as_deref().filter(|t| !t.is_empty()) else {
            continue; // hostname-only ingress
        };
        let ip = parse_ip_sloppy(text).ok_or_else(|| {
            format!(
                "status.loadBalancer.ingress[{i}].ip {:?} is not an IP address",
                shorten(text)
            )
        })?;
        match ing.ip_mode.as_deref() {
            None | Some("VIP") => load_balancer_ips.push(ip),
            Some("Proxy") => {}
            Some(other) => {
                return Err(format!(
                    "status.loadBalancer.ingress[{i}].ipMode {:?} is unknown",
                    shorten(other)
                ))
            }
        }
    }
    let mut source_ranges = Vec::new();
    for (i, range) in spec
        .load_balancer_source_ranges
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        // The API server lets whitespace padding through; kube-proxy trims it.
        let net = parse_cidr_sloppy(range.trim()).ok_or_else(|| {
            format!(
                "spec.loadBalancerSourceRanges[{i}] {:?} is not a CIDR",
                shorten(range)
            )
        })?;
        source_ranges.push(net);
    }

    let affinity_timeout = match spec.session_affinity.as_deref() {
        None | Some("") | Some("None") => None,
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match timeout {
                None => Some(DEFAULT_AFFINITY_TIMEOUT),
                Some(t) if (1..=MAX_AFFINITY_TIMEOUT as i32).contains(&t) => Some(t as u32),
                Some(t) => {
                    return Err(format!(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds {t} is outside 1..{MAX_AFFINITY_TIMEOUT}"
                    ))
                }
            }
        }
        Some(other) => {
            return Err(format!(
                "spec.sessionAffinity {:?} is unknown (want None or ClientIP)",
                shorten(other)
            ))
        }
    };

    let external_local = traffic_policy_local(
        spec.external_traffic_policy.as_deref(),
        "spec.externalTrafficPolicy",
    )?;
    let internal_policy_local = traffic_policy_local(
        spec.internal_traffic_policy.as_deref(),
        "spec.internalTrafficPolicy",
    )?;
    // kube-proxy's apiservice.ExternallyAccessible: by type, or a ClusterIP with external IPs.
    let accessible_by_type = matches!(service_type, "NodePort" | "LoadBalancer")
        || (service_type == "ClusterIP" && !external_ips.is_empty());
    let external_policy_local = external_local && accessible_by_type;
    let health_check_node_port = if service_type == "LoadBalancer" && external_policy_local {
        optional_port(spec.health_check_node_port, "spec.healthCheckNodePort")?
    } else {
        None
    };

    Ok(Some(ServiceSpec {
        namespace,
        name,
        cluster_ips,
        ports: port_specs,
        external_ips,
        load_balancer_ips,
        source_ranges,
        affinity_timeout,
        external_policy_local,
        internal_policy_local,
        health_check_node_port,
    }))
}

/// The cluster IPs, at most one per family; empty for a headless Service.
fn cluster_ips(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> Check<Vec<IpAddr>> {
    let primary = spec.cluster_ip.as_deref().unwrap_or("");
    let listed = spec.cluster_ips.as_deref().unwrap_or_default();
    if primary == "None" || listed.first().is_some_and(|ip| ip == "None") {
        return Ok(Vec::new());
    }
    let mut texts: Vec<(&str, String)> = Vec::new();
    if listed.is_empty() {
        if !primary.is_empty() {
            texts.push((primary, "spec.clusterIP".into()));
        }
    } else {
        if !primary.is_empty() && primary != listed[0] {
            return Err(format!(
                "spec.clusterIP {:?} differs from spec.clusterIPs[0] {:?}",
                shorten(primary),
                shorten(&listed[0])
            ));
        }
        for (i, text) in listed.iter().enumerate() {
            texts.push((text, format!("spec.clusterIPs[{i}]")));
        }
    }
    let mut ips: Vec<IpAddr> = Vec::new();
    for (text, field) in texts {
        let ip = parse_ip_sloppy(text)
            .ok_or_else(|| format!("{field} {:?} is not an IP address", shorten(text)))?;
        if ips.iter().any(|o| IpFamily::of(o) == IpFamily::of(&ip)) {
            return Err(format!(
                "{field}: more than one {} cluster IP",
                IpFamily::of(&ip)
            ));
        }
        ips.push(ip);
    }
    if let Some(families) = spec.ip_families.as_deref() {
        for (i, ip) in ips.iter().enumerate() {
            let want = families.get(i).map(String::as_str);
            if let Some(want) = want {
                if want != IpFamily::of(ip).api_name() {
                    return Err(format!(
                        "cluster IP {ip} is {} but spec.ipFamilies[{i}] is {:?}",
                        IpFamily::of(ip),
                        shorten(want)
                    ));
                }
            }
        }
    }
    Ok(ips)
}

fn ip_list(texts: Option<&[String]>, field: &str) -> Check<Vec<IpAddr>> {
    texts
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, text)| {
            parse_ip_sloppy(text)
                .ok_or_else(|| format!("{field}[{i}] {:?} is not an IP address", shorten(text)))
        })
        .collect()
}

fn traffic_policy_local(value: Option<&str>, field: &str) -> Check<bool> {
    match value {
        None | Some("") | Some("Cluster") => Ok(false),
        Some("Local") => Ok(true),
        Some(other) => Err(format!(
            "{field} {:?} is unknown (want Cluster or Local)",
            shorten(other)
        )),
    }
}

fn protocol(value: Option<&str>, field: impl fmt::Display) -> Check<Protocol> {
    match value {
        None | Some("") => Ok(Protocol::Tcp),
        Some(text) => Protocol::from_api(text).ok_or_else(|| {
            format!(
                "{field}.protocol {:?} is unknown (want TCP, UDP or SCTP)",
                shorten(text)
            )
        }),
    }
}

fn port_number(value: i32, field: impl fmt::Display) -> Check<u16> {
    match u16::try_from(value) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(format!("{field} {value} is outside 1..65535")),
    }
}

/// A port where 0 or absent means "none".
fn optional_port(value: Option<i32>, field: impl fmt::Display) -> Check<Option<u16>> {
    match value {
        None | Some(0) => Ok(None),
        Some(n) => port_number(n, field).map(Some),
    }
}

/// Checks one EndpointSlice. `Ok(None)`: a valid slice that kube-proxy does not use (FQDN, or
/// labelled for another proxy); `Err`: why it is skipped.
pub fn validate_slice(slice: &EndpointSlice) -> Check<Option<SliceSpec>> {
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

    let mut ports = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, port) in slice
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let field = Indexed("ports", i);
        // A hand-written manifest may leave out the name of an unnamed port; the EndpointSlice
        // controller writes "" there, so read absent as "".
        let port_name = port.name.clone().unwrap_or_default();
        if !port_name.is_empty() && !is_dns1123_label(&port_name) {
            return Err(format!(
                "{field}.name {:?} is not a valid DNS-1123 label",
                shorten(&port_name)
            ));
        }
        let protocol = protocol(port.protocol.as_deref(), field)?;
        if !seen.insert((port_name.clone(), protocol)) {
            return Err(format!(
                "{field}: port name {port_name:?} with protocol {} appears more than once",
                protocol.lower()
            ));
        }
        let Some(number) = optional_port(port.port, format_args!("{field}.port"))? else {
            continue; // kube-proxy ignores ports without a number
        };
        ports.push(SlicePort {
            name: port_name,
            protocol,
            port: number,
        });
    }

    let mut endpoints = Vec::new();
    for (i, endpoint) in slice.endpoints.iter().enumerate() {
        let mut first = None;
        for (j, text) in endpoint.addresses.iter().enumerate() {
            let field = EndpointAddress(i, j);
            let ip = parse_ip_sloppy(text)
                .ok_or_else(|| format!("{field} {:?} is not an IP address", shorten(text)))?;
            if IpFamily::of(&ip) != family {
                return Err(format!(
                    "{field} {ip} is not an {family} address, but the slice's addressType is {family}"
                ));
            }
            first.get_or_insert(ip);
        }
        let Some(ip) = first else {
            continue; // kube-proxy ignores endpoints without addresses
        };
        let conditions = endpoint.conditions.as_ref();
        let hints = endpoint.hints.as_ref();
        endpoints.push(SliceEndpoint {
            ip,
            ready: conditions.and_then(|c| c.ready).unwrap_or(true),
            serving: conditions.and_then(|c| c.serving).unwrap_or(true),
            terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
            node_name: endpoint.node_name.clone(),
            zone_hints: hints
                .and_then(|h| h.for_zones.as_ref())
                .map(|z| z.iter().map(|z| z.name.clone()).collect())
                .unwrap_or_default(),
            node_hints: hints
                .and_then(|h| h.for_nodes.as_ref())
                .map(|n| n.iter().map(|n| n.name.clone()).collect())
                .unwrap_or_default(),
        });
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

/// Keeps messages one line long and readable whatever the input holds.
fn shorten(text: &str) -> String {
    const MAX: usize = 64;
    if text.chars().count() <= MAX {
        text.to_string()
    } else {
        let cut: String = text.chars().take(MAX).collect();
        format!("{cut}...")
    }
}

fn is_label_body(text: &str) -> bool {
    let bytes = text.as_bytes();
    !bytes.is_empty()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// RFC 1123 label: namespaces, port names.
pub fn is_dns1123_label(text: &str) -> bool {
    text.len() <= 63 && is_label_body(text)
}

/// RFC 1035 label: Service names (must start with a letter).
pub fn is_dns1035_label(text: &str) -> bool {
    is_dns1123_label(text) && text.as_bytes()[0].is_ascii_lowercase()
}

/// RFC 1123 subdomain: most object names.
pub fn is_dns1123_subdomain(text: &str) -> bool {
    text.len() <= 253 && text.split('.').all(is_label_body)
}

/// IANA service name: named target ports.
pub fn is_iana_svc_name(text: &str) -> bool {
    text.len() <= 15
        && is_label_body(text)
        && !text.contains("--")
        && text.bytes().any(|b| b.is_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_syntax() {
        assert!(is_dns1123_label("ns-1"));
        assert!(!is_dns1123_label("Ns"));
        assert!(!is_dns1123_label("-a"));
        assert!(!is_dns1123_label(&"a".repeat(64)));
        assert!(is_dns1035_label("svc1"));
        assert!(!is_dns1035_label("1svc"));
        assert!(is_dns1123_subdomain("svc1-abc.x"));
        assert!(!is_dns1123_subdomain("svc1..x"));
        assert!(is_iana_svc_name("http"));
        assert!(!is_iana_svc_name("8080"));
        assert!(!is_iana_svc_name("a--b"));
    }
}
