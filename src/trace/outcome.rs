//! What a trace found, summed up over its branches: the verdict, the endpoints with their odds,
//! masquerading and session affinity; written as text for people and JSON for programs.

use std::fmt::Write as _;
use std::net::SocketAddr;

use serde_json::{json, Value as Json};

use super::packet::{AffinityEvent, Branch, End};

/// How the packet fares in kproxy's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    /// Sent to an endpoint.
    Dnat,
    Reject,
    Drop,
    /// Explicitly accepted without being rewritten.
    Accept,
    /// No rule decided anything: the packet goes on as it came.
    NoMatch,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Dnat => "dnat",
            Verdict::Reject => "reject",
            Verdict::Drop => "drop",
            Verdict::Accept => "accept",
            Verdict::NoMatch => "no-match",
        }
    }

    pub fn of(branch: &Branch) -> Verdict {
        match (branch.end, branch.dnat, branch.accepted) {
            (Some(End::Drop), _, _) => Verdict::Drop,
            (Some(End::Reject), _, _) => Verdict::Reject,
            (None, Some(_), _) => Verdict::Dnat,
            (None, None, true) => Verdict::Accept,
            (None, None, false) => Verdict::NoMatch,
        }
    }
}

/// An endpoint the packet may reach, and the odds.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointShare {
    pub endpoint: SocketAddr,
    pub probability: f64,
    /// The packet leaves with the node's address as its source.
    pub masquerade: bool,
}

/// Where the client's next connection goes while its affinity entry lasts, for each endpoint
/// the first connection can reach (traced again with the entry the first one recorded).
#[derive(Debug, Clone, PartialEq)]
pub struct NextConnection {
    pub first: SocketAddr,
    pub next: Vec<EndpointShare>,
}

impl NextConnection {
    /// The next connection surely goes where the first went.
    pub fn pinned(&self) -> bool {
        matches!(self.next.as_slice(), [only] if only.endpoint == self.first
            && (only.probability - 1.0).abs() < 1e-9)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AffinitySummary {
    pub timeout_seconds: u32,
    /// The endpoint an existing entry pins this client to.
    pub sticky_endpoint: Option<SocketAddr>,
    pub next_connection: Vec<NextConnection>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    /// The verdict of the branches, or of the likeliest when they differ ([`Trace::mixed`]).
    pub verdict: Verdict,
    /// Every endpoint a branch DNATs to, in address order; the odds sum to 1 when every branch
    /// does.
    pub endpoints: Vec<EndpointShare>,
    /// Any branch is masqueraded.
    pub masquerade: bool,
    pub affinity: Option<AffinitySummary>,
    pub branches: Vec<Branch>,
    /// Rules met that the walker did not understand.
    pub uninterpreted: Vec<String>,
}

impl Trace {
    pub fn summarise(mut branches: Vec<Branch>, next_connection: Vec<NextConnection>) -> Trace {
        branches.retain(|b| b.probability > 0.0);
        let mut totals: Vec<(Verdict, f64)> = Vec::new();
        for branch in &branches {
            let verdict = Verdict::of(branch);
            match totals.iter_mut().find(|(v, _)| *v == verdict) {
                Some((_, total)) => *total += branch.probability,
                None => totals.push((verdict, branch.probability)),
            }
        }
        totals.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let verdict = totals.first().map_or(Verdict::NoMatch, |(v, _)| *v);
        let mut endpoints: Vec<EndpointShare> = Vec::new();
        for branch in branches.iter().filter(|b| Verdict::of(b) == Verdict::Dnat) {
            let Some(endpoint) = branch.dnat else {
                continue;
            };
            match endpoints.iter_mut().find(|e| e.endpoint == endpoint) {
                Some(share) => {
                    share.probability += branch.probability;
                    share.masquerade |= branch.masquerade;
                }
                None => endpoints.push(EndpointShare {
                    endpoint,
                    probability: branch.probability,
                    masquerade: branch.masquerade,
                }),
            }
        }
        endpoints.sort_by_key(|e| e.endpoint);
        let mut affinity: Option<AffinitySummary> = None;
        for branch in &branches {
            for event in &branch.affinity {
                let (timeout, hit) = match event {
                    AffinityEvent::Checked {
                        timeout_seconds,
                        hit,
                        ..
                    } => (*timeout_seconds, *hit),
                    // An entry's own timeout (the maps layout sets it when recording).
                    AffinityEvent::RecordedMapping {
                        timeout_seconds, ..
                    } => (*timeout_seconds, false),
                    AffinityEvent::Recorded { .. } => continue,
                };
                let summary = affinity.get_or_insert(AffinitySummary {
                    timeout_seconds: timeout,
                    sticky_endpoint: None,
                    next_connection: Vec::new(),
                });
                summary.timeout_seconds = summary.timeout_seconds.max(timeout);
                if hit && summary.sticky_endpoint.is_none() {
                    summary.sticky_endpoint = branch.dnat;
                }
            }
        }
        if let Some(summary) = &mut affinity {
            summary.next_connection = next_connection;
        }
        let mut uninterpreted: Vec<String> = branches
            .iter()
            .flat_map(|b| b.uninterpreted.iter().cloned())
            .collect();
        uninterpreted.sort();
        uninterpreted.dedup();
        Trace {
            verdict,
            masquerade: branches.iter().any(|b| b.masquerade),
            endpoints,
            affinity,
            branches,
            uninterpreted,
        }
    }

    /// The steps every branch shares (up to the first random choice), then each branch's
    /// own, prefixed with its odds and where it ends.
    pub fn path(&self) -> Vec<String> {
        let shared = self.shared_steps();
        let mut path: Vec<String> = match self.branches.first() {
            Some(first) => first.steps[..shared]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            None => Vec::new(),
        };
        if self.branches.len() > 1 {
            for branch in &self.branches {
                let label = branch_label(branch);
                path.extend(
                    branch.steps[shared..]
                        .iter()
                        .map(|step| format!("{label} {step}")),
                );
            }
        }
        path
    }

    fn shared_steps(&self) -> usize {
        let Some(first) = self.branches.first() else {
            return 0;
        };
        if self.branches.len() == 1 {
            return first.steps.len();
        }
        (0..first.steps.len())
            .take_while(|&i| {
                self.branches
                    .iter()
                    .all(|b| b.steps.get(i) == first.steps.get(i))
            })
            .count()
    }

    pub fn to_json(&self) -> Json {
        let endpoint = |e: &SocketAddr| json!({"address": e.ip().to_string(), "port": e.port()});
        let share = |s: &EndpointShare| {
            json!({
                "address": s.endpoint.ip().to_string(),
                "port": s.endpoint.port(),
                "probability": s.probability,
                "masquerade": s.masquerade,
            })
        };
        json!({
            "verdict": self.verdict.as_str(),
            "endpoints": self.endpoints.iter().map(share).collect::<Vec<_>>(),
            "masquerade": self.masquerade,
            "affinity": self.affinity.as_ref().map(|a| json!({
                "timeout_seconds": a.timeout_seconds,
                "sticky_endpoint": a.sticky_endpoint.as_ref().map(endpoint),
                "next_connection": a.next_connection.iter().map(|n| json!({
                    "first": endpoint(&n.first),
                    "next": n.next.iter().map(share).collect::<Vec<_>>(),
                    "pinned": n.pinned(),
                })).collect::<Vec<_>>(),
            })),
            "path": self.path(),
            "branches": self.branches.iter().map(|b| json!({
                "probability": b.probability,
                "verdict": Verdict::of(b).as_str(),
                "endpoint": b.dnat.as_ref().map(endpoint),
                "masquerade": b.masquerade,
                "path": b.steps.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "uninterpreted": self.uninterpreted,
        })
    }

    /// The path, then the verdict and what follows from it, for people.
    pub fn to_text(&self, client: std::net::IpAddr) -> String {
        let mut out = String::new();
        let shared = self.shared_steps();
        if let Some(first) = self.branches.first() {
            for step in &first.steps[..shared] {
                let _ = writeln!(out, "  {step}");
            }
        }
        if self.branches.len() > 1 {
            let _ = writeln!(out, "  random choice, {} ways:", self.branches.len());
            for branch in &self.branches {
                let _ = writeln!(out, "    {}", branch_label(branch));
                for step in &branch.steps[shared..] {
                    let _ = writeln!(out, "      {step}");
                }
            }
        }
        if self.branches.iter().all(|b| b.steps.is_empty()) {
            let _ = writeln!(out, "  (no rule matched)");
        }
        let _ = writeln!(out, "verdict: {}", self.verdict.as_str());
        if self.branches.iter().any(|b| Verdict::of(b) != self.verdict) {
            let _ = writeln!(
                out,
                "  not every branch ends so; see each branch above for its own verdict"
            );
        }
        for share in &self.endpoints {
            let _ = writeln!(
                out,
                "  endpoint {}  probability {:.4}{}",
                crate::text::socket_string(share.endpoint),
                share.probability,
                if share.masquerade {
                    "  masqueraded"
                } else {
                    ""
                }
            );
        }
        let _ = writeln!(
            out,
            "masquerade: {}",
            if self.masquerade { "yes" } else { "no" }
        );
        match &self.affinity {
            None => {
                let _ = writeln!(out, "affinity: none");
            }
            Some(affinity) => {
                let _ = writeln!(
                    out,
                    "affinity: ClientIP, timeout {} s",
                    affinity.timeout_seconds
                );
                match affinity.sticky_endpoint {
                    Some(endpoint) => {
                        let _ = writeln!(
                            out,
                            "  an existing entry pins {client} to {}",
                            crate::text::socket_string(endpoint)
                        );
                    }
                    None => {
                        let _ = writeln!(
                            out,
                            "  {client} has no affinity entry: the endpoint is chosen at random"
                        );
                    }
                }
                for next in &affinity.next_connection {
                    let goes: Vec<String> = next
                        .next
                        .iter()
                        .map(|s| {
                            format!(
                                "{} ({:.4})",
                                crate::text::socket_string(s.endpoint),
                                s.probability
                            )
                        })
                        .collect();
                    let _ = writeln!(
                        out,
                        "  next connection within {} s after reaching {}: {}{}",
                        affinity.timeout_seconds,
                        crate::text::socket_string(next.first),
                        goes.join(", "),
                        if next.pinned() {
                            " (pinned)"
                        } else {
                            " (NOT pinned)"
                        }
                    );
                }
                let _ = writeln!(
                    out,
                    "  after {} s without a connection the entry expires and the choice is \
                     random again",
                    affinity.timeout_seconds
                );
            }
        }
        for text in &self.uninterpreted {
            let _ = writeln!(out, "not interpreted: {text}");
        }
        out
    }
}

fn branch_label(branch: &Branch) -> String {
    let end = match (Verdict::of(branch), branch.dnat) {
        (Verdict::Dnat, Some(to)) => crate::text::socket_string(to),
        (verdict, _) => verdict.as_str().to_string(),
    };
    format!("[p={:.4} → {end}]", branch.probability)
}
