//! Who holds what (api-validation.md §7). Cluster IPs and node ports — health-check node ports
//! included, one pool for every protocol — are unique cluster-wide (§7.1); an (IP, protocol,
//! port) frontend should lead to one Service, though the API server does not ensure it (§7.2).
//! For objects it never admitted, kproxy decides itself and deterministically (§7.3): the older
//! Service (`metadata.creationTimestamp`; none counts as newest), then namespace/name, holds.
//!
//! A Service that comes second for a cluster IP or a node port is not proxied at all. A proxied
//! Service claims its frontends; when it comes second for a frontend it offers through an
//! external or load-balancer IP, it loses only that frontend. A frontend of a cluster IP always
//! holds: the address is its Service's by allocation.
//!
//! The registry is incremental: the agent sets and removes one Service at a time and learns
//! which Services' standing may have changed; `validate` sets them all at once. The outcome
//! does not depend on the order of the calls.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;

use super::validate::{ServiceKey, ServiceSpec};
use super::Protocol;
use crate::small_set::SmallSet;

/// How a Service ranks in a conflict: the smallest holds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Seniority {
    /// Without a timestamp a Service counts as the newest.
    no_timestamp: bool,
    created: Option<k8s_openapi::jiff::Timestamp>,
    namespace: String,
    name: String,
}

impl Seniority {
    fn of(spec: &ServiceSpec) -> Seniority {
        Seniority {
            no_timestamp: spec.created.is_none(),
            created: spec.created,
            namespace: spec.namespace.clone(),
            name: spec.name.clone(),
        }
    }

    fn is(&self, key: &str) -> bool {
        key.split_once('/') == Some((self.namespace.as_str(), self.name.as_str()))
    }

    fn key(&self) -> ServiceKey {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Why `self` holds against `other`, for messages.
    fn why_first(&self, other: &Seniority) -> &'static str {
        if !self.no_timestamp && (other.no_timestamp || self.created < other.created) {
            "older"
        } else {
            "created at the same time or without a creationTimestamp, and first by namespace/name"
        }
    }
}

type Rank = Arc<Seniority>;

/// What only one Service in the cluster may have (§7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Unique {
    ClusterIp(IpAddr),
    NodePort(u16),
}

/// Where traffic enters: destination address, protocol and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub ip: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

/// Which of its addresses a Service offers a frontend through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Via {
    ClusterIp,
    ExternalIp,
    LoadBalancerIp,
}

/// A frontend offered by a Service through one of its addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Offer {
    pub via: Via,
    pub frontend: Frontend,
}

/// One Service's claim on a frontend; the first in this order holds it. Within one Service,
/// an external IP comes before the same address as a load-balancer IP, as in kube-proxy's
/// iptables rule order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct FrontendClaim {
    not_cluster_ip: bool,
    rank: Rank,
    via: Via,
}

#[derive(Debug)]
struct Held {
    rank: Rank,
    unique: Vec<Unique>,
    offers: Vec<Offer>,
    /// The offers are registered: exactly while the Service holds all its `unique`.
    offers_claimed: bool,
}

/// The registry (module docs).
#[derive(Debug, Default)]
pub struct Claims {
    /// The claims on each resource, the holder first (almost always the only one).
    unique: HashMap<Unique, SmallSet<Rank>>,
    frontends: HashMap<Frontend, SmallSet<FrontendClaim>>,
    services: HashMap<ServiceKey, Held>,
}

impl Claims {
    /// Adds or replaces a Service's claims. Returns the Services whose standing may have
    /// changed (it included): they must be rebuilt.
    pub fn set(&mut self, spec: &ServiceSpec) -> BTreeSet<ServiceKey> {
        let key = spec.key();
        let mut changed = self.release(&key);
        changed.insert(key.clone());
        let rank = Arc::new(Seniority::of(spec));
        let unique = unique_of(spec);
        for resource in &unique {
            add(
                &mut self.unique,
                *resource,
                rank.clone(),
                itself,
                &mut changed,
            );
        }
        self.services.insert(
            key,
            Held {
                rank,
                unique,
                offers: offers_of(spec),
                offers_claimed: false,
            },
        );
        self.settle(&mut changed);
        changed
    }

    /// Removes a Service's claims. Returns the Services whose standing may have changed.
    pub fn remove(&mut self, key: &str) -> BTreeSet<ServiceKey> {
        let mut changed = self.release(key);
        self.settle(&mut changed);
        changed
    }

    /// The Service holds every cluster IP and node port it claims.
    pub fn is_live(&self, key: &str) -> bool {
        self.services
            .get(key)
            .is_some_and(|held| self.holds_all(held))
    }

    /// The frontends a live Service offers but another offer holds.
    pub fn withheld(&self, key: &str) -> BTreeSet<Offer> {
        let Some(held) = self.services.get(key).filter(|h| h.offers_claimed) else {
            return BTreeSet::new();
        };
        held.offers
            .iter()
            .filter(|offer| {
                self.frontend_holder(&offer.frontend).is_none_or(|first| {
                    !(Arc::ptr_eq(&first.rank, &held.rank) && first.via == offer.via)
                })
            })
            .copied()
            .collect()
    }

    /// Why the Service is not proxied: the first cluster IP or node port another Service holds.
    pub fn lost(&self, spec: &ServiceSpec) -> Option<String> {
        let mine = Seniority::of(spec);
        unique_of(spec).into_iter().find_map(|resource| {
            let holder = self.unique.get(&resource)?.first()?;
            if **holder == mine {
                return None;
            }
            let why = holder.why_first(&mine);
            let service = holder.key();
            Some(match resource {
                Unique::ClusterIp(ip) => {
                    let field = match spec.cluster_ips.iter().position(|c| *c == ip) {
                        Some(0) | None => "spec.clusterIP".to_string(),
                        Some(i) => format!("spec.clusterIPs[{i}]"),
                    };
                    format!(
                        "{field} {ip} is already used by Service {service} ({why}); the API server gives a cluster IP to one Service only"
                    )
                }
                Unique::NodePort(port) => {
                    let field = match spec.ports.iter().position(|p| p.node_port == Some(port)) {
                        Some(i) => format!("spec.ports[{i}].nodePort"),
                        None => "spec.healthCheckNodePort".to_string(),
                    };
                    format!(
                        "{field} {port} is already used by Service {service} ({why}); node ports and health-check node ports are one pool for all protocols"
                    )
                }
            })
        })
    }

    /// One message per withheld frontend of a live Service: which address, which port, who
    /// holds it.
    pub fn withheld_reasons(&self, spec: &ServiceSpec) -> Vec<String> {
        let key = spec.key();
        self.withheld(&key)
            .into_iter()
            .filter_map(|offer| {
                let holder = self.frontend_holder(&offer.frontend)?;
                let Frontend { ip, protocol, port } = offer.frontend;
                let field = match offer.via {
                    Via::ClusterIp => "spec.clusterIP",
                    Via::ExternalIp => "spec.externalIPs",
                    Via::LoadBalancerIp => "status.loadBalancer.ingress",
                };
                let by = if holder.rank.is(&key) {
                    match holder.via {
                        Via::ClusterIp => "is this Service's own cluster IP".to_string(),
                        Via::ExternalIp => "is also one of this Service's external IPs".to_string(),
                        Via::LoadBalancerIp => {
                            "is also one of this Service's load-balancer IPs".to_string()
                        }
                    }
                } else {
                    let service = holder.rank.key();
                    match holder.via {
                        Via::ClusterIp => format!("is the cluster IP of Service {service}"),
                        _ => format!(
                            "is already offered by Service {service} ({})",
                            holder.rank.why_first(&Seniority::of(spec))
                        ),
                    }
                };
                Some(format!(
                    "{field} {ip} port {port}/{} {by}; this Service's rule for it is left out",
                    protocol.lower()
                ))
            })
            .collect()
    }

    fn frontend_holder(&self, frontend: &Frontend) -> Option<&FrontendClaim> {
        self.frontends.get(frontend)?.first()
    }

    fn holds_all(&self, held: &Held) -> bool {
        held.unique.iter().all(|resource| {
            self.unique
                .get(resource)
                .and_then(SmallSet::first)
                .is_some_and(|first| Arc::ptr_eq(first, &held.rank))
        })
    }

    /// Drops every claim of a Service; returns the Services whose hold on something changed.
    fn release(&mut self, key: &str) -> BTreeSet<ServiceKey> {
        let mut changed = BTreeSet::new();
        let Some(held) = self.services.remove(key) else {
            return changed;
        };
        changed.insert(key.to_string());
        for resource in &held.unique {
            remove(&mut self.unique, resource, &held.rank, itself, &mut changed);
        }
        if held.offers_claimed {
            for offer in &held.offers {
                let claim = frontend_claim(&held.rank, offer.via);
                remove(
                    &mut self.frontends,
                    &offer.frontend,
                    &claim,
                    rank_of_claim,
                    &mut changed,
                );
            }
        }
        changed
    }

    /// Brings the frontend claims of the changed Services in line with whether they are live;
    /// whether a Service is live does not depend on frontends, so one round settles it.
    fn settle(&mut self, changed: &mut BTreeSet<ServiceKey>) {
        let keys: Vec<ServiceKey> = changed.iter().cloned().collect();
        for key in keys {
            let Some(held) = self.services.get(&key) else {
                continue;
            };
            let live = self.holds_all(held);
            if live == held.offers_claimed {
                continue;
            }
            let rank = held.rank.clone();
            let offers = held.offers.clone();
            for offer in &offers {
                let claim = frontend_claim(&rank, offer.via);
                if live {
                    add(
                        &mut self.frontends,
                        offer.frontend,
                        claim,
                        rank_of_claim,
                        changed,
                    );
                } else {
                    remove(
                        &mut self.frontends,
                        &offer.frontend,
                        &claim,
                        rank_of_claim,
                        changed,
                    );
                }
            }
            if let Some(held) = self.services.get_mut(&key) {
                held.offers_claimed = live;
            }
        }
    }
}

fn itself(rank: &Rank) -> &Rank {
    rank
}

fn rank_of_claim(claim: &FrontendClaim) -> &Rank {
    &claim.rank
}

fn frontend_claim(rank: &Rank, via: Via) -> FrontendClaim {
    FrontendClaim {
        not_cluster_ip: via != Via::ClusterIp,
        rank: rank.clone(),
        via,
    }
}

/// Adds a claim; when it becomes the first, the previous first and it have changed standing.
fn add<R: Hash + Eq, C: Ord + Clone>(
    map: &mut HashMap<R, SmallSet<C>>,
    resource: R,
    claim: C,
    rank: impl Fn(&C) -> &Rank,
    changed: &mut BTreeSet<ServiceKey>,
) {
    let claims = map.entry(resource).or_default();
    let before = claims.first().cloned();
    claims.insert(claim);
    note_new_first(before, claims.first(), rank, changed);
}

/// Removes a claim; when it was the first, it and the next have changed standing.
fn remove<R: Hash + Eq, C: Ord + Clone>(
    map: &mut HashMap<R, SmallSet<C>>,
    resource: &R,
    claim: &C,
    rank: impl Fn(&C) -> &Rank,
    changed: &mut BTreeSet<ServiceKey>,
) {
    let Some(claims) = map.get_mut(resource) else {
        return;
    };
    let before = claims.first().cloned();
    claims.remove(claim);
    note_new_first(before, claims.first(), rank, changed);
    if claims.is_empty() {
        map.remove(resource);
    }
}

fn note_new_first<C: Ord>(
    before: Option<C>,
    after: Option<&C>,
    rank: impl Fn(&C) -> &Rank,
    changed: &mut BTreeSet<ServiceKey>,
) {
    if before.as_ref() == after {
        return;
    }
    for claim in before.iter().chain(after) {
        changed.insert(rank(claim).key());
    }
}

/// Cluster IPs first, then node ports in `spec.ports` order, then the health-check node port:
/// the order `lost` reports in.
fn unique_of(spec: &ServiceSpec) -> Vec<Unique> {
    let mut unique: Vec<Unique> = spec
        .cluster_ips
        .iter()
        .map(|ip| Unique::ClusterIp(*ip))
        .collect();
    let node_ports = spec
        .ports
        .iter()
        .filter_map(|p| p.node_port)
        .chain(spec.health_check_node_port);
    for port in node_ports {
        // One number may serve several protocols of one Service (§7.1 item 4).
        if !unique.contains(&Unique::NodePort(port)) {
            unique.push(Unique::NodePort(port));
        }
    }
    unique
}

/// Every frontend of the Service: each port on each cluster, external and load-balancer IP.
fn offers_of(spec: &ServiceSpec) -> Vec<Offer> {
    let addresses = spec
        .cluster_ips
        .iter()
        .map(|ip| (Via::ClusterIp, *ip))
        .chain(spec.external_ips.iter().map(|ip| (Via::ExternalIp, *ip)))
        .chain(
            spec.load_balancer_ips
                .iter()
                .map(|ip| (Via::LoadBalancerIp, *ip)),
        );
    let mut offers: Vec<Offer> = addresses
        .flat_map(|(via, ip)| {
            spec.ports.iter().map(move |port| Offer {
                via,
                frontend: Frontend {
                    ip,
                    protocol: port.protocol,
                    port: port.port,
                },
            })
        })
        .collect();
    offers.sort();
    offers.dedup();
    offers
}
