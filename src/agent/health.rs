//! The proxy's health as kube-proxy reports it on `/healthz` and `/livez` (spec
//! kube-proxy-agent.md §6.1): healthy unless a queued change has waited longer than the health
//! timeout (2 × `--sync-period`) without a sync. Pure: callers pass the time.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::jiff::Timestamp;
use serde::Serialize;

use crate::family::IpFamily;

/// Per family: the last successful sync, and the oldest change queued since.
#[derive(Debug, Clone)]
pub struct ProxyHealth {
    timeout: Duration,
    last_updated: BTreeMap<IpFamily, SystemTime>,
    oldest_queued: BTreeMap<IpFamily, SystemTime>,
}

/// One health answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub healthy: bool,
    pub body: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body {
    last_updated: String,
    current_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_eligible: Option<bool>,
    healthy: bool,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    status: BTreeMap<&'static str, FamilyStatus>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FamilyStatus {
    last_updated: String,
    healthy: bool,
}

impl ProxyHealth {
    pub fn new(timeout: Duration) -> ProxyHealth {
        ProxyHealth {
            timeout,
            last_updated: BTreeMap::new(),
            oldest_queued: BTreeMap::new(),
        }
    }

    /// A change was queued for `family` (kube-proxy's `QueuedUpdate`).
    pub fn queued(&mut self, family: IpFamily, now: SystemTime) {
        self.oldest_queued.entry(family).or_insert(now);
    }

    /// `family` was synced successfully (kube-proxy's `Updated`).
    pub fn updated(&mut self, family: IpFamily, now: SystemTime) {
        self.last_updated.insert(family, now);
        self.oldest_queued.remove(&family);
    }

    /// Whether every family that has synced keeps up.
    pub fn is_healthy(&self, now: SystemTime) -> bool {
        self.last_updated
            .keys()
            .all(|family| self.family_healthy(*family, now))
    }

    fn family_healthy(&self, family: IpFamily, now: SystemTime) -> bool {
        self.oldest_queued
            .get(&family)
            .is_none_or(|queued| now.duration_since(*queued).unwrap_or_default() < self.timeout)
    }

    /// The `/healthz` (with `node_eligible`) or `/livez` (without) answer.
    pub fn report(&self, now: SystemTime, node_eligible: Option<bool>) -> Health {
        let healthy = self.is_healthy(now);
        let status: BTreeMap<&'static str, FamilyStatus> = self
            .last_updated
            .iter()
            .map(|(family, updated)| {
                (
                    family.api_name(),
                    FamilyStatus {
                        last_updated: rfc3339(*updated),
                        healthy: self.family_healthy(*family, now),
                    },
                )
            })
            .collect();
        // When healthy, kube-proxy reports the current time as lastUpdated (§6.1).
        let last_updated = if healthy {
            Some(now)
        } else {
            self.last_updated.values().max().copied()
        };
        let body = Body {
            last_updated: last_updated.map(rfc3339).unwrap_or_default(),
            current_time: rfc3339(now),
            node_eligible,
            healthy,
            status,
        };
        Health {
            healthy: healthy && node_eligible.unwrap_or(true),
            body: serde_json::to_string(&body).unwrap_or_default(),
        }
    }
}

/// RFC 3339 with as many fractional digits as needed, UTC, as Go prints `time.Time`.
pub fn rfc3339(time: SystemTime) -> String {
    Timestamp::try_from(time)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn unhealthy_only_when_a_queued_change_waits_past_the_timeout() {
        let t0 = SystemTime::UNIX_EPOCH + 1_000_000 * S;
        let mut health = ProxyHealth::new(60 * S);
        assert!(health.is_healthy(t0), "healthy before the first sync");
        health.updated(IpFamily::V4, t0);
        health.queued(IpFamily::V4, t0 + S);
        health.queued(IpFamily::V4, t0 + 50 * S); // not the oldest
        assert!(health.is_healthy(t0 + 60 * S));
        assert!(!health.is_healthy(t0 + 61 * S));
        let report = health.report(t0 + 61 * S, Some(true));
        assert!(!report.healthy);
        let body: serde_json::Value = serde_json::from_str(&report.body).unwrap();
        assert_eq!(body["healthy"], false);
        assert_eq!(body["lastUpdated"], "1970-01-12T13:46:40Z");
        assert_eq!(body["status"]["IPv4"]["healthy"], false);
        health.updated(IpFamily::V4, t0 + 62 * S);
        assert!(health.is_healthy(t0 + 62 * S));
    }

    #[test]
    fn body_has_kube_proxys_keys_and_node_eligibility() {
        let t0 = SystemTime::UNIX_EPOCH + 1_000_000 * S + Duration::from_millis(250);
        let mut health = ProxyHealth::new(60 * S);
        health.updated(IpFamily::V4, t0);
        let report = health.report(t0 + S, Some(false));
        assert!(
            !report.healthy,
            "a node that is not eligible fails /healthz"
        );
        assert_eq!(
            report.body,
            "{\"lastUpdated\":\"1970-01-12T13:46:41.25Z\",\"currentTime\":\"1970-01-12T13:46:41.25Z\",\
             \"nodeEligible\":false,\"healthy\":true,\"status\":{\"IPv4\":{\"lastUpdated\":\
             \"1970-01-12T13:46:40.25Z\",\"healthy\":true}}}"
        );
        let livez = health.report(t0 + S, None);
        assert!(livez.healthy);
        assert!(!livez.body.contains("nodeEligible"));
    }
}
