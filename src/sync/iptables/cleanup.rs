//! `kproxy cleanup` in iptables mode (spec §4.12): every chain kproxy owns and its jump rules
//! from the built-in chains go, in both families and every installed backend, and nothing
//! else. All or nothing: the kernel refuses to delete a chain another rule still jumps to, so
//! the rules are read first, and a rule that is not kproxy's but jumps to one of its chains
//! (say `-A FORWARD -j KUBE-FIREWALL`) stops the cleanup before anything is removed, with that
//! rule named. Then each family's removal is one `iptables-restore` whose per-table commits
//! each delete the jumps and the chains together, so no table is ever left with kproxy's jumps
//! gone but its chains in place.

use super::{
    spawn_error, tool_message, Applier, Backend, BackendChoice, SystemApplier, Tool, JUMPS,
};
use crate::family::IpFamily;
use crate::iptables::{is_owned_chain, KUBE_PROXY_CANARY};
use crate::rule_words::arguments;
use crate::sync::SyncError;

/// The tables kproxy writes chains into.
const TABLES: [&str; 3] = ["filter", "nat", "mangle"];

/// What kproxy owns in one table, as one `iptables-save` showed it.
#[derive(Debug, Default, PartialEq, Eq)]
struct OwnedTable {
    table: String,
    /// kproxy's chains in this table.
    chains: Vec<String>,
    /// kproxy's jump rules (§4.2) from other chains, as saved, one entry per copy.
    jumps: Vec<String>,
    /// Other rules that jump to one of kproxy's chains, as saved: they keep it alive.
    holders: Vec<String>,
}

/// kproxy's part of one family's rules.
#[derive(Debug, Default, PartialEq, Eq)]
struct Owned {
    tables: Vec<OwnedTable>,
}

fn owns(table: &str, chain: &str) -> bool {
    match table {
        "filter" | "nat" => is_owned_chain(chain),
        "mangle" => chain == KUBE_PROXY_CANARY,
        _ => false,
    }
}

/// The chain a saved rule jumps or goes to, if any.
fn target(line: &str) -> Option<&str> {
    let args = arguments(line);
    args.windows(2)
        .find(|pair| pair[0] == "-j" || pair[0] == "-g")
        .map(|pair| pair[1])
}

/// Reads kproxy's chains, its jump rules and the rules holding its chains from a full
/// `iptables-save`.
fn parse(save: &str) -> Owned {
    let mut tables: Vec<OwnedTable> = Vec::new();
    let mut rules: Vec<(usize, String, String)> = Vec::new();
    for line in save.lines() {
        if let Some(name) = line.strip_prefix('*') {
            tables.push(OwnedTable {
                table: name.trim().to_string(),
                ..OwnedTable::default()
            });
            continue;
        }
        let Some(index) = tables.len().checked_sub(1) else {
            continue;
        };
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split(' ').next().unwrap_or_default();
            if owns(&tables[index].table, name) {
                tables[index].chains.push(name.to_string());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split(' ').next().unwrap_or_default().to_string();
            rules.push((index, chain, line.to_string()));
        }
    }
    for (index, chain, line) in rules {
        let table = &mut tables[index];
        if owns(&table.table, &chain) {
            continue;
        }
        let Some(target) = target(&line) else {
            continue;
        };
        if !table.chains.iter().any(|c| c == target) {
            continue;
        }
        let ours = JUMPS
            .iter()
            .any(|j| j.table == table.table && j.chain == chain && j.save_line() == line);
        if ours {
            table.jumps.push(line);
        } else {
            table.holders.push(line);
        }
    }
    tables.retain(|t| TABLES.contains(&t.table.as_str()));
    Owned { tables }
}

impl Owned {
    fn is_empty(&self) -> bool {
        self.tables
            .iter()
            .all(|t| t.chains.is_empty() && t.jumps.is_empty())
    }

    /// One restore payload: per table, kproxy's chains declared (emptied), its jump rules
    /// deleted (every copy), its chains deleted, committed together.
    fn payload(&self) -> String {
        let mut out = String::new();
        for table in &self.tables {
            if table.chains.is_empty() && table.jumps.is_empty() {
                continue;
            }
            out.push_str(&format!("*{}\n", table.table));
            for chain in &table.chains {
                out.push_str(&format!(":{chain} - [0:0]\n"));
            }
            for jump in &table.jumps {
                out.push_str("-D ");
                out.push_str(jump.strip_prefix("-A ").unwrap_or(jump));
                out.push('\n');
            }
            for chain in &table.chains {
                out.push_str(&format!("-X {chain}\n"));
            }
            out.push_str("COMMIT\n");
        }
        out
    }

    /// `filter 5 chains, nat 12 chains, 14 jump rules`
    fn summary(&self) -> String {
        let mut parts: Vec<String> = self
            .tables
            .iter()
            .filter(|t| !t.chains.is_empty())
            .map(|t| {
                let n = t.chains.len();
                format!("{} {n} chain{}", t.table, if n == 1 { "" } else { "s" })
            })
            .collect();
        let jumps: usize = self.tables.iter().map(|t| t.jumps.len()).sum();
        if jumps > 0 {
            parts.push(format!(
                "{jumps} jump rule{}",
                if jumps == 1 { "" } else { "s" }
            ));
        }
        parts.join(", ")
    }
}

/// kproxy's rules in one family of one applier, read with one full `iptables-save`, which
/// creates no table.
fn read(applier: &mut impl Applier, family: IpFamily) -> Result<Owned, SyncError> {
    let exit = applier.save(family, None).map_err(spawn_error)?;
    if !exit.success() {
        return Err(SyncError::Read {
            tool: applier.program(family, Tool::Save),
            family,
            message: tool_message(&exit),
        });
    }
    Ok(parse(&exit.stdout))
}

/// The rules found holding kproxy's chains, for the error.
fn holders(applier: &impl Applier, family: IpFamily, owned: &Owned) -> Vec<String> {
    let program = applier.program(family, Tool::Iptables);
    let mut out = Vec::new();
    for table in &owned.tables {
        for rule in &table.holders {
            out.push(format!("`{program} -t {} {rule}`", table.table));
        }
    }
    out
}

/// Removes kproxy's rules of both families through one applier; see the module docs.
/// Returns what was removed, one entry per family that held something.
pub fn cleanup_applier(applier: &mut impl Applier) -> Result<Vec<String>, SyncError> {
    let mut appliers = [applier];
    cleanup_all(&mut appliers)
}

/// Reads every applier's families first and refuses if anything holds kproxy's chains; then
/// removes, family by family.
fn cleanup_all<A: Applier>(appliers: &mut [&mut A]) -> Result<Vec<String>, SyncError> {
    let mut plans = Vec::new();
    let mut blocked = Vec::new();
    for (index, applier) in appliers.iter_mut().enumerate() {
        for family in [IpFamily::V4, IpFamily::V6] {
            let owned = read(*applier, family)?;
            blocked.extend(holders(*applier, family, &owned));
            plans.push((index, family, owned));
        }
    }
    if !blocked.is_empty() {
        return Err(SyncError::Held { rules: blocked });
    }
    let mut removed = Vec::new();
    for (index, family, owned) in plans {
        if owned.is_empty() {
            continue;
        }
        let applier = &mut *appliers[index];
        let exit = applier
            .restore(family, &owned.payload())
            .map_err(spawn_error)?;
        if !exit.success() {
            return Err(SyncError::Refused {
                tool: applier.program(family, Tool::Restore),
                family,
                object: None,
                message: tool_message(&exit),
            });
        }
        removed.push(format!(
            "{} {family}: {}",
            applier.program(family, Tool::Iptables),
            owned.summary()
        ));
    }
    Ok(removed)
}

/// [`cleanup_applier`] of one backend, or (`Auto`) of each of nft and legacy that is
/// installed (a node may have rules in both); all are read before anything is removed.
pub fn cleanup_with(choice: BackendChoice) -> Result<Vec<String>, SyncError> {
    let backends: &[Backend] = match choice {
        BackendChoice::Auto => &[Backend::Nft, Backend::Legacy],
        BackendChoice::Nft => &[Backend::Nft],
        BackendChoice::Legacy => &[Backend::Legacy],
    };
    let mut appliers: Vec<SystemApplier> = Vec::new();
    for &backend in backends {
        let mut applier = SystemApplier::for_backend(backend, &[]);
        match applier.save(IpFamily::V4, None) {
            Err(err)
                if choice == BackendChoice::Auto
                    && err.source.kind() == std::io::ErrorKind::NotFound => {}
            _ => appliers.push(applier),
        }
    }
    if appliers.is_empty() {
        appliers.push(SystemApplier::for_backend(Backend::System, &[]));
    }
    let mut refs: Vec<&mut SystemApplier> = appliers.iter_mut().collect();
    cleanup_all(&mut refs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:KUBE-PROXY-CANARY - [0:0]
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-SERVICES - [0:0]
:USER - [0:0]
-A INPUT -j KUBE-FIREWALL
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A FORWARD -j KUBE-FIREWALL
-A FORWARD -m comment --comment \"say -j KUBE-SERVICES\" -j USER
-A KUBE-SERVICES -j REJECT
COMMIT
";

    #[test]
    fn user_rules_jumping_to_kproxy_chains_are_found_and_copies_of_jumps_counted() {
        let owned = parse(SAVE);
        let filter = owned
            .tables
            .iter()
            .find(|t| t.table == "filter")
            .expect("filter");
        assert_eq!(filter.chains, vec!["KUBE-FIREWALL", "KUBE-SERVICES"]);
        assert_eq!(filter.holders, vec!["-A FORWARD -j KUBE-FIREWALL"]);
        assert_eq!(filter.jumps.len(), 3, "{:?}", filter.jumps);
        let mangle = owned
            .tables
            .iter()
            .find(|t| t.table == "mangle")
            .expect("mangle");
        assert_eq!(mangle.chains, vec![KUBE_PROXY_CANARY]);
    }

    #[test]
    fn the_payload_deletes_jumps_and_chains_in_one_commit_per_table() {
        let payload = parse(SAVE).payload();
        let filter: Vec<&str> = payload
            .split("COMMIT\n")
            .find(|s| s.starts_with("*filter"))
            .expect("filter section")
            .lines()
            .collect();
        assert_eq!(
            filter,
            vec![
                "*filter",
                ":KUBE-FIREWALL - [0:0]",
                ":KUBE-SERVICES - [0:0]",
                "-D INPUT -j KUBE-FIREWALL",
                "-D INPUT -j KUBE-FIREWALL",
                "-D FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
                "-X KUBE-FIREWALL",
                "-X KUBE-SERVICES",
            ]
        );
        assert!(payload
            .starts_with("*mangle\n:KUBE-PROXY-CANARY - [0:0]\n-X KUBE-PROXY-CANARY\nCOMMIT\n"));
    }

    #[test]
    fn the_target_is_found_outside_quotes() {
        assert_eq!(
            target("-A X -m comment --comment \"a -j B\" -j C"),
            Some("C")
        );
        assert_eq!(target("-A X -g KUBE-Y"), Some("KUBE-Y"));
        assert_eq!(target("-A X -s 1.2.3.4"), None);
    }
}
