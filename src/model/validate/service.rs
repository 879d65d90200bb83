//! One Service, checked field by field as the API server would (api-validation.md §5), plus
//! kproxy's own address policy (§7.3). A field the API server refuses skips the whole Service;
//! an address only kproxy's policy refuses is left out alone, with a note.

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec as ApiServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::address::{self, check_service_cidr, parse, parse_programmable, Class};
use super::syntax::{
    is_dns1035_label, is_dns1123_label, is_iana_svc_name, optional_port, port_number, protocol,
    shorten, Check, Indexed,
};
use super::{
    has_ignore_label, metadata_names, ClusterSettings, PortSpec, ServiceSpec, Verdict,
    DEFAULT_AFFINITY_TIMEOUT, MAX_AFFINITY_TIMEOUT,
};
use crate::family::{parse_cidr_sloppy, IpFamily};

/// Checks one Service (module docs).
pub fn validate_service(service: &Service, settings: &ClusterSettings) -> Verdict<ServiceSpec> {
    let mut left_out = Vec::new();
    match check(service, settings, &mut left_out) {
        Ok(Some(spec)) => Verdict::Proxied { spec, left_out },
        Ok(None) => Verdict::NotProxied,
        Err(reason) => Verdict::Skipped(reason),
    }
}

/// `Ok(None)`: valid, but not proxied by kube-proxy (headless, ExternalName, another proxy's).
fn check(
    service: &Service,
    settings: &ClusterSettings,
    left_out: &mut Vec<String>,
) -> Check<Option<ServiceSpec>> {
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

    let Some(cluster_ips) = cluster_ips(spec, service_type, settings)? else {
        return Ok(None); // headless, or no cluster IP allocated (§7.3)
    };
    let ports = service_ports(spec, service_type)?;
    let external_ips = external_ips(spec, left_out)?;
    let load_balancer_ips = load_balancer_ips(service, service_type, left_out)?;
    let is_load_balancer = service_type == "LoadBalancer";
    let source_ranges = source_ranges(spec, is_load_balancer)?;
    if spec.allocate_load_balancer_node_ports.is_some() && !is_load_balancer {
        return Err(format!(
            "spec.allocateLoadBalancerNodePorts is set on a Service of type {service_type}; it is only allowed for LoadBalancer"
        ));
    }
    let affinity_timeout = affinity_timeout(spec)?;

    // kube-proxy's apiservice.ExternallyAccessible: by type, or a ClusterIP with external IPs
    // (§5.9).
    let externally_accessible = matches!(service_type, "NodePort" | "LoadBalancer")
        || (service_type == "ClusterIP" && !external_ips.is_empty());
    let external_local = traffic_policy_local(
        spec.external_traffic_policy.as_deref(),
        "spec.externalTrafficPolicy",
    )?;
    let internal_policy_local = traffic_policy_local(
        spec.internal_traffic_policy.as_deref(),
        "spec.internalTrafficPolicy",
    )?;
    let external_policy_local = external_local && externally_accessible;
    // The API server refuses a health-check node port anywhere else, but kube-proxy's own
    // test vectors carry one on a Cluster-policy LoadBalancer; it is ignored there, as
    // kube-proxy ignores it.
    let health_check_node_port = if is_load_balancer && external_policy_local {
        optional_port(spec.health_check_node_port, "spec.healthCheckNodePort")?
    } else {
        None
    };
    if let Some(hcnp) = health_check_node_port {
        // §7.1 item 5: the same pool as the node ports, the Service's own included.
        if let Some(i) = ports.iter().position(|p| p.node_port == Some(hcnp)) {
            return Err(format!(
                "spec.healthCheckNodePort {hcnp} is also spec.ports[{i}].nodePort; the API server allocates them from one pool"
            ));
        }
    }
    let created = service
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|time| time.0);

    Ok(Some(ServiceSpec {
        namespace,
        name,
        created,
        cluster_ips,
        ports,
        external_ips,
        load_balancer_ips,
        source_ranges,
        affinity_timeout,
        external_policy_local,
        internal_policy_local,
        health_check_node_port,
    }))
}

/// The cluster IPs, at most one per family (§5.4); `None` for a headless Service.
fn cluster_ips(
    spec: &ApiServiceSpec,
    service_type: &str,
    settings: &ClusterSettings,
) -> Check<Option<Vec<IpAddr>>> {
    let primary = spec.cluster_ip.as_deref().unwrap_or("");
    let listed = spec.cluster_ips.as_deref().unwrap_or_default();
    let families = ip_families(spec)?;
    let headless = primary == "None" || listed.first().is_some_and(|ip| ip == "None");
    if headless {
        if listed.len() > 1 {
            return Err(
                "spec.clusterIPs: \"None\" must be the only entry of a headless Service".into(),
            );
        }
        if service_type != "ClusterIP" {
            return Err(format!(
                "spec.clusterIP \"None\" (headless) is only allowed for type ClusterIP, not {service_type}"
            ));
        }
        return Ok(None);
    }
    // The API server copies a lone clusterIP into clusterIPs (§1), never the other way.
    let texts: Vec<(&str, String)> = if listed.is_empty() {
        if primary.is_empty() {
            return Ok(None); // not allocated: cannot be proxied (§7.3)
        }
        vec![(primary, "spec.clusterIP".into())]
    } else {
        if primary.is_empty() {
            return Err("spec.clusterIPs is set but spec.clusterIP is empty; they must agree (spec.clusterIP = spec.clusterIPs[0])".into());
        }
        if primary != listed[0] {
            return Err(format!(
                "spec.clusterIP {:?} differs from spec.clusterIPs[0] {:?}",
                shorten(primary),
                shorten(&listed[0])
            ));
        }
        if listed.len() > 2 {
            return Err(format!(
                "spec.clusterIPs has {} entries; at most two (one per family) are allowed",
                listed.len()
            ));
        }
        listed
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let field = if i == 0 {
                    "spec.clusterIP".to_string()
                } else {
                    format!("spec.clusterIPs[{i}]")
                };
                (text.as_str(), field)
            })
            .collect()
    };
    let mut ips: Vec<IpAddr> = Vec::new();
    for (text, field) in &texts {
        let ip = parse_programmable(text, field)?;
        if ips.iter().any(|o| IpFamily::of(o) == IpFamily::of(&ip)) {
            return Err(format!(
                "{field}: more than one {} cluster IP",
                IpFamily::of(&ip)
            ));
        }
        check_service_cidr(ip, text, field, &settings.service_cidrs)?;
        ips.push(ip);
    }
    for (i, (ip, want)) in ips.iter().zip(&families).enumerate() {
        if *want != IpFamily::of(ip) {
            return Err(format!(
                "cluster IP {ip} is {} but spec.ipFamilies[{i}] is {:?}",
                IpFamily::of(ip),
                want.api_name()
            ));
        }
    }
    if ips.len() > 1 && spec.ip_family_policy.as_deref() == Some("SingleStack") {
        return Err(
            "spec.ipFamilyPolicy is SingleStack but spec.clusterIPs has two entries".into(),
        );
    }
    Ok(Some(ips))
}

/// `spec.ipFamilies` and `spec.ipFamilyPolicy`, checked (§5.4).
fn ip_families(spec: &ApiServiceSpec) -> Check<Vec<IpFamily>> {
    match spec.ip_family_policy.as_deref() {
        None | Some("SingleStack" | "PreferDualStack" | "RequireDualStack") => {}
        Some(other) => {
            return Err(format!(
                "spec.ipFamilyPolicy {:?} is unknown (want SingleStack, PreferDualStack or RequireDualStack)",
                shorten(other)
            ))
        }
    }
    let mut families = Vec::new();
    for (i, text) in spec.ip_families.iter().flatten().enumerate() {
        let family = match text.as_str() {
            "IPv4" => IpFamily::V4,
            "IPv6" => IpFamily::V6,
            other => {
                return Err(format!(
                    "spec.ipFamilies[{i}] {:?} is unknown (want IPv4 or IPv6)",
                    shorten(other)
                ))
            }
        };
        if families.contains(&family) {
            return Err(format!("spec.ipFamilies[{i}] {family} is listed twice"));
        }
        families.push(family);
    }
    if families.len() > 1 && spec.ip_family_policy.as_deref() == Some("SingleStack") {
        return Err(
            "spec.ipFamilyPolicy is SingleStack but spec.ipFamilies has two entries".into(),
        );
    }
    Ok(families)
}

/// `spec.ports` (§5.3).
fn service_ports(spec: &ApiServiceSpec, service_type: &str) -> Check<Vec<PortSpec>> {
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        return Err(
            "spec.ports is empty; a Service with a cluster IP needs at least one port".into(),
        );
    }
    let mut specs: Vec<PortSpec> = Vec::with_capacity(ports.len());
    let mut names = BTreeSet::new();
    for (i, port) in ports.iter().enumerate() {
        let field = Indexed("spec.ports", i);
        let spec = service_port(port, field, ports.len(), service_type)?;
        if !names.insert(spec.name.clone()) {
            return Err(format!(
                "{field}.name {:?} is used by more than one port",
                spec.name
            ));
        }
        if specs
            .iter()
            .any(|o| (o.port, o.protocol) == (spec.port, spec.protocol))
        {
            return Err(format!(
                "{field}: port {}/{} is defined more than once",
                spec.port,
                spec.protocol.lower()
            ));
        }
        if let Some(node_port) = spec.node_port {
            if specs
                .iter()
                .any(|o| (o.node_port, o.protocol) == (Some(node_port), spec.protocol))
            {
                return Err(format!(
                    "{field}.nodePort {node_port}/{} is used by more than one port",
                    spec.protocol.lower()
                ));
            }
        }
        specs.push(spec);
    }
    Ok(specs)
}

fn service_port(
    port: &ServicePort,
    field: Indexed,
    count: usize,
    service_type: &str,
) -> Check<PortSpec> {
    let name = port.name.clone().unwrap_or_default();
    if name.is_empty() {
        if count > 1 {
            return Err(format!(
                "{field}.name is required when a Service has several ports"
            ));
        }
    } else if !is_dns1123_label(&name) {
        return Err(format!(
            "{field}.name {:?} is not a valid DNS-1123 label",
            shorten(&name)
        ));
    }
    let protocol = protocol(port.protocol.as_deref(), field)?;
    let number = port_number(port.port, format_args!("{field}.port"))?;
    let node_port = optional_port(port.node_port, format_args!("{field}.nodePort"))?;
    if node_port.is_some() && service_type == "ClusterIP" {
        return Err(format!(
            "{field}.nodePort is set on a Service of type ClusterIP; only NodePort and LoadBalancer Services have node ports"
        ));
    }
    match &port.target_port {
        Some(IntOrString::Int(n)) if *n != 0 => {
            port_number(*n, format_args!("{field}.targetPort"))?;
        }
        Some(IntOrString::String(named)) if !named.is_empty() && !is_iana_svc_name(named) => {
            return Err(format!(
                "{field}.targetPort {:?} is neither a port number nor a valid port name",
                shorten(named)
            ));
        }
        _ => {}
    }
    Ok(PortSpec {
        name,
        protocol,
        port: number,
        node_port,
    })
}

/// `spec.externalIPs` (§5.7): the API server refuses the endpoint-IP classes (§4.5), so they
/// skip the Service; kproxy's further classes leave out only the address. Repeats are listed
/// once.
fn external_ips(spec: &ApiServiceSpec, left_out: &mut Vec<String>) -> Check<Vec<IpAddr>> {
    let mut ips: Vec<IpAddr> = Vec::new();
    for (i, text) in spec.external_ips.iter().flatten().enumerate() {
        let field = Indexed("spec.externalIPs", i);
        let ip = parse(text, field)?;
        if let Some(class) = Class::refused_by_api_server(ip) {
            return Err(format!(
                "{field} {:?} is {class}, which the API server refuses for external IPs",
                shorten(text)
            ));
        }
        match Class::of(ip) {
            Some(class) => left_out.push(format!(
                "{field} {:?} is {class}; that external IP is left out",
                shorten(text)
            )),
            None if ips.contains(&ip) => {}
            None => ips.push(ip),
        }
    }
    Ok(ips)
}

/// `status.loadBalancer.ingress[].ip` in VIP mode (§5.11). The API server checks only the
/// syntax there; kproxy's address classes leave out only that address.
fn load_balancer_ips(
    service: &Service,
    service_type: &str,
    left_out: &mut Vec<String>,
) -> Check<Vec<IpAddr>> {
    let ingress = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_deref())
        .unwrap_or_default();
    let mut ips: Vec<IpAddr> = Vec::new();
    for (i, ing) in ingress.iter().enumerate() {
        let Some(text) = ing.ip.as_deref().filter(|t| !t.is_empty()) else {
            continue; // hostname-only ingress
        };
        let field = format!("status.loadBalancer.ingress[{i}].ip");
        let ip = address::parse(text, &field)?;
        match ing.ip_mode.as_deref() {
            None | Some("VIP") => {}
            Some("Proxy") => continue,
            Some(other) => {
                return Err(format!(
                    "status.loadBalancer.ingress[{i}].ipMode {:?} is unknown (want VIP or Proxy)",
                    shorten(other)
                ))
            }
        }
        if let Some(class) = Class::of(ip) {
            left_out.push(format!(
                "{field} {:?} is {class}; that load-balancer IP is left out",
                shorten(text)
            ));
        } else if service_type != "LoadBalancer" {
            // The API server keeps load-balancer status for LoadBalancer Services only.
            left_out.push(format!(
                "{field} {:?} is set on a Service of type {service_type}; only LoadBalancer Services have load-balancer IPs, so it is left out",
                shorten(text)
            ));
        } else if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    Ok(ips)
}

/// `spec.loadBalancerSourceRanges` (§5.8), LoadBalancer Services only.
fn source_ranges(spec: &ApiServiceSpec, is_load_balancer: bool) -> Check<Vec<ipnet::IpNet>> {
    let ranges = spec
        .load_balancer_source_ranges
        .as_deref()
        .unwrap_or_default();
    if !ranges.is_empty() && !is_load_balancer {
        return Err(
            "spec.loadBalancerSourceRanges is set, but only LoadBalancer Services may have it"
                .into(),
        );
    }
    ranges
        .iter()
        .enumerate()
        .map(|(i, range)| {
            // The API server lets whitespace padding through; kube-proxy trims it.
            parse_cidr_sloppy(range.trim()).ok_or_else(|| {
                format!(
                    "spec.loadBalancerSourceRanges[{i}] {:?} is not a CIDR",
                    shorten(range)
                )
            })
        })
        .collect()
}

/// `spec.sessionAffinity` and its timeout (§5.6); `None` without affinity.
fn affinity_timeout(spec: &ApiServiceSpec) -> Check<Option<u32>> {
    match spec.session_affinity.as_deref() {
        None | Some("") | Some("None") => Ok(None),
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match timeout {
                None => Ok(Some(DEFAULT_AFFINITY_TIMEOUT)),
                Some(t) => match u32::try_from(t) {
                    Ok(t) if (1..=MAX_AFFINITY_TIMEOUT).contains(&t) => Ok(Some(t)),
                    _ => Err(format!(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds {t} is outside 1..{MAX_AFFINITY_TIMEOUT}"
                    )),
                },
            }
        }
        Some(other) => Err(format!(
            "spec.sessionAffinity {:?} is unknown (want None or ClientIP)",
            shorten(other)
        )),
    }
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
