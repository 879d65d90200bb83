//! Extra copies of kproxy's jump rules in the built-in chains (§4.2), as two writers at once
//! used to leave them (each ran `-C`, saw nothing, and ran `-I`), go on the next full sync.
//!
//! Of n copies the first n−1 are deleted with `-D CHAIN RULE`, which deletes the first (top)
//! copy each time: the bottom one, the oldest when copies were inserted at the top, stays
//! where it is. So no other rule moves relative to it, and a rule that is not an exact copy is
//! never touched. All deletions of a table are one `iptables-restore` commit: there is no
//! moment without the jump.

use super::{spawn_error, tool_message, Applier, KernelTable, Tool, JUMPS};
use crate::family::IpFamily;
use crate::sync::SyncError;

/// The restore payload deleting `extra` copies of each rule `(table, saved rule)`, one commit
/// per table, tables in order of first appearance; empty when there is nothing to delete.
fn payload(extra: &[(&str, String, usize)]) -> String {
    let mut tables: Vec<&str> = Vec::new();
    for (table, _, _) in extra {
        if !tables.contains(table) {
            tables.push(table);
        }
    }
    let mut out = String::new();
    for table in tables {
        out.push_str(&format!("*{table}\n"));
        for (_, rule, copies) in extra.iter().filter(|(t, _, _)| *t == table) {
            let spec = rule.strip_prefix("-A ").unwrap_or(rule);
            for _ in 0..*copies {
                out.push_str("-D ");
                out.push_str(spec);
                out.push('\n');
            }
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// The exact number of copies of `rule` in `table`'s `chain`, from `iptables -S CHAIN` (one
/// chain, cheap even where the table is large).
fn exact_copies(
    applier: &mut impl Applier,
    family: IpFamily,
    table: &str,
    chain: &str,
    rule: &str,
) -> Result<usize, SyncError> {
    let exit = applier
        .iptables(family, &["-t", table, "-S", chain])
        .map_err(spawn_error)?;
    if !exit.success() {
        return Err(SyncError::Read {
            tool: applier.program(family, Tool::Iptables),
            family,
            message: tool_message(&exit),
        });
    }
    Ok(exit.stdout.lines().filter(|l| *l == rule).count())
}

/// Deletes the extra copies of kproxy's jump rules that `kernel` (read at the start of this
/// full sync) shows.
pub(super) fn remove_duplicate_jumps(
    applier: &mut impl Applier,
    family: IpFamily,
    kernel: &[KernelTable],
) -> Result<(), SyncError> {
    let mut extra = Vec::new();
    for jump in JUMPS {
        let Some(table) = kernel.iter().find(|k| k.table == jump.table) else {
            continue;
        };
        let rule = jump.save_line();
        let mut copies = table.jumps.get(&rule).copied().unwrap_or(0);
        if copies > 1 && !table.jumps_exact {
            copies = exact_copies(applier, family, jump.table, jump.chain, &rule)?;
        }
        if copies > 1 {
            extra.push((jump.table, rule, copies - 1));
        }
    }
    if extra.is_empty() {
        return Ok(());
    }
    let text = payload(&extra);
    let exit = applier.restore(family, &text).map_err(spawn_error)?;
    if exit.success() {
        return Ok(());
    }
    Err(SyncError::Refused {
        tool: applier.program(family, Tool::Restore),
        family,
        object: Some("the deletion of duplicated jump rules".into()),
        message: tool_message(&exit),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_copies_are_deleted_in_one_commit_per_table() {
        let extra = [
            ("filter", "-A INPUT -j KUBE-FIREWALL".to_string(), 2),
            (
                "nat",
                "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
                    .to_string(),
                1,
            ),
            ("filter", "-A OUTPUT -j KUBE-FIREWALL".to_string(), 1),
        ];
        assert_eq!(
            payload(&extra),
            "*filter\n-D INPUT -j KUBE-FIREWALL\n-D INPUT -j KUBE-FIREWALL\n-D OUTPUT -j KUBE-FIREWALL\nCOMMIT\n\
             *nat\n-D OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\nCOMMIT\n"
        );
        assert_eq!(payload(&[]), "");
    }
}
