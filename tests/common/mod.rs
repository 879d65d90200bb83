//! Helpers shared by the integration tests: locating `../shared`, kube-proxy's canonical
//! iptables ordering, and readable diffs.
#![allow(dead_code)]

pub mod agent;
pub mod cluster;
pub mod netns;
pub mod nft;
pub mod topology;
pub mod vector;

use std::path::{Path, PathBuf};

/// `../shared` beside the repository (CI puts it there). Missing is a failure, not a skip.
pub fn shared_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared");
    assert!(
        dir.is_dir(),
        "{} is missing: the conformance vectors live there (CI checks out shared/ beside the repo)",
        dir.display()
    );
    dir
}

pub fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A unified diff of two texts, for assertion messages.
pub fn diff(expected: &str, actual: &str) -> String {
    similar::TextDiff::from_lines(expected, actual)
        .unified_diff()
        .context_radius(3)
        .header("expected", "actual")
        .to_string()
}

/// The first line where two texts differ, as `line N: expected … / actual …`.
pub fn first_difference(expected: &str, actual: &str) -> Option<String> {
    let mut e = expected.lines();
    let mut a = actual.lines();
    let mut n = 0;
    loop {
        n += 1;
        match (e.next(), a.next()) {
            (None, None) => return None,
            (x, y) if x == y => continue,
            (x, y) => {
                return Some(format!(
                    "line {n}: expected {:?}, got {:?}",
                    x.unwrap_or("<end>"),
                    y.unwrap_or("<end>")
                ))
            }
        }
    }
}

/// Re-sorts `iptables-restore` input into the canonical order of kube-proxy's tests
/// (shared/conformance/kube-proxy/README.md, "Normalisation before comparing", iptables).
pub fn canonical_iptables(text: &str) -> String {
    struct Table {
        name: String,
        chains: Vec<String>,
        rules: Vec<(String, String)>,
        deletes: Vec<String>,
    }
    let mut tables: Vec<Table> = Vec::new();
    for line in text.trim_start().lines() {
        if let Some(name) = line.strip_prefix('*') {
            tables.push(Table {
                name: name.to_string(),
                chains: vec![],
                rules: vec![],
                deletes: vec![],
            });
            continue;
        }
        let table = tables.last_mut().expect("a line before the first *table");
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split(' ').next().unwrap_or_default();
            table.chains.push(name.to_string());
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split(' ').next().unwrap_or_default();
            table.rules.push((chain.to_string(), line.to_string()));
        } else if let Some(chain) = line.strip_prefix("-X ") {
            table.deletes.push(chain.to_string());
        } else if line == "COMMIT" || line.is_empty() || line.starts_with('#') {
        } else {
            panic!("unexpected restore line {line:?}");
        }
    }
    tables.sort_by(|a, b| a.name.cmp(&b.name));
    let rank = |c: &str| -> (u8, String) {
        match c {
            "KUBE-NODEPORTS" => (0, c.into()),
            "KUBE-SERVICES" => (1, c.into()),
            _ if c.starts_with("KUBE-") => (2, c.into()),
            _ => (3, c.into()),
        }
    };
    let mut out = String::new();
    for table in &mut tables {
        table.chains.sort_by_key(|c| rank(c));
        out.push_str(&format!("*{}\n", table.name));
        for chain in &table.chains {
            out.push_str(&format!(":{chain} - [0:0]\n"));
        }
        for chain in &table.chains {
            let mut rules: Vec<&String> = table
                .rules
                .iter()
                .filter(|(c, _)| c == chain)
                .map(|(_, r)| r)
                .collect();
            if chain == "KUBE-NODEPORTS" || chain == "KUBE-SERVICES" {
                let last = rules
                    .iter()
                    .position(|r| r.contains("must be the last rule"))
                    .map(|i| rules.remove(i));
                rules.sort_by_key(|r| comment_service(r));
                rules.extend(last);
            }
            for r in rules {
                out.push_str(r);
                out.push('\n');
            }
        }
        for chain in &table.deletes {
            out.push_str(&format!("-X {chain}\n"));
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// The service name in a rule's comment: the text up to the first space or colon.
fn comment_service(rule: &str) -> String {
    let Some(i) = rule.find("--comment ") else {
        return String::new();
    };
    let rest = rule[i + 10..].trim_start_matches('"');
    rest.split([' ', ':', '"'])
        .next()
        .unwrap_or_default()
        .to_string()
}

/// kube-proxy's consistency check on a dump: every non-built-in `-j` target is a declared
/// chain with rules (KUBE-NODEPORTS may be empty), and every declared per-service chain is
/// jumped to. Returns the problems found.
pub fn iptables_consistency(text: &str) -> Vec<String> {
    const BUILTIN_TARGETS: [&str; 7] = [
        "ACCEPT",
        "DROP",
        "REJECT",
        "RETURN",
        "DNAT",
        "MARK",
        "MASQUERADE",
    ];
    const TOP_LEVEL: [&str; 9] = [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
        "KUBE-FIREWALL",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
        "KUBE-PROXY-CANARY",
    ];
    let mut problems = Vec::new();
    for table in text.split('*').filter(|t| !t.trim().is_empty()) {
        let declared: Vec<&str> = table
            .lines()
            .filter_map(|l| l.strip_prefix(':'))
            .filter_map(|d| d.split(' ').next())
            .collect();
        let rule_chains: Vec<&str> = table
            .lines()
            .filter_map(|l| l.strip_prefix("-A "))
            .filter_map(|r| r.split(' ').next())
            .collect();
        let mut jumped = Vec::new();
        for line in table.lines().filter(|l| l.starts_with("-A ")) {
            if let Some(i) = line.find(" -j ") {
                let target = line[i + 4..].split(' ').next().unwrap_or_default();
                if BUILTIN_TARGETS.contains(&target) {
                    continue;
                }
                jumped.push(target);
                if !declared.contains(&target) {
                    problems.push(format!("{line}: target {target} is not declared"));
                } else if target != "KUBE-NODEPORTS" && !rule_chains.contains(&target) {
                    problems.push(format!("{line}: target {target} has no rules"));
                }
            }
        }
        for chain in declared {
            if !TOP_LEVEL.contains(&chain) && !jumped.contains(&chain) {
                problems.push(format!("chain {chain} is declared but never jumped to"));
            }
        }
    }
    problems
}

/// Normalises an nftables table dump (`add …` lines) the way kube-proxy's nftables tests do
/// (shared/conformance/kube-proxy/README.md, "Normalisation before comparing", nftables): drop
/// empty and `#` lines; order by object kind (table, chain, rule, set, map, element), then by
/// object name; rules of one chain keep their order, other lines of one object sort by text.
pub fn canonical_nftables(text: &str) -> String {
    #[derive(PartialEq, Eq, PartialOrd, Ord)]
    enum Tiebreak {
        Position(usize),
        Text(String),
    }
    const KINDS: [&str; 6] = ["table", "chain", "rule", "set", "map", "element"];
    let mut lines: Vec<(usize, String, Tiebreak, &str)> = Vec::new();
    for (position, line) in text.lines().enumerate() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let words: Vec<&str> = line.split(' ').collect();
        assert!(
            words.len() >= 4 && words[0] == "add",
            "not an `add` line of a table dump: {line:?}"
        );
        let kind = KINDS
            .iter()
            .position(|k| *k == words[1])
            .unwrap_or_else(|| panic!("unknown object kind in {line:?}"));
        let name = words.get(4).copied().unwrap_or_default().to_string();
        let tiebreak = if words[1] == "rule" {
            Tiebreak::Position(position)
        } else {
            Tiebreak::Text(line.to_string())
        };
        lines.push((kind, name, tiebreak, line));
    }
    lines.sort();
    let mut out = String::new();
    for (_, _, _, line) in lines {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Cross-references in an nftables table dump: every `jump`/`goto` target is a declared chain,
/// every `@name` a declared set or map, and every element's container declared. Returns the
/// problems found.
pub fn nftables_consistency(text: &str) -> Vec<String> {
    let mut chains = Vec::new();
    let mut containers = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split(' ').collect();
        match words.as_slice() {
            ["add", "chain", _, _, name, ..] => chains.push(name.to_string()),
            ["add", "set" | "map", _, _, name, ..] => containers.push(name.to_string()),
            _ => {}
        }
    }
    let mut problems = Vec::new();
    for line in text.lines() {
        // Quoted comments are prose: `@` or `goto` inside them refer to nothing.
        let unquoted: String = line.split('"').step_by(2).collect::<Vec<_>>().join("\"\"");
        let words: Vec<&str> = unquoted.split(' ').collect();
        if let ["add", "element", _, _, container, ..] = words.as_slice() {
            if !containers.iter().any(|c| c == container) {
                problems.push(format!("{line}: container {container} is not declared"));
            }
        }
        if let ["add", "rule", _, _, chain, ..] = words.as_slice() {
            if !chains.iter().any(|c| c == chain) {
                problems.push(format!("{line}: chain {chain} is not declared"));
            }
        }
        for pair in words.windows(2) {
            if (pair[0] == "jump" || pair[0] == "goto") && !chains.iter().any(|c| c == pair[1]) {
                problems.push(format!("{line}: target {} is not declared", pair[1]));
            }
        }
        for word in &words {
            if let Some(name) = word.strip_prefix('@') {
                if !containers.iter().any(|c| c == name) {
                    problems.push(format!("{line}: @{name} is not declared"));
                }
            }
        }
    }
    problems
}
