//! The kernel tools accept kproxy's iptables output as printed: every golden case and the
//! example go through `iptables-restore --test` and then a real restore, each in a fresh
//! network namespace (the restore also catches jumps to undeclared chains, which `--test`
//! does not).

mod common;

use std::fs;

use common::netns::{kernel_tests_possible, Netns};

/// Splits dual-stack output into its IPv4 and IPv6 restore inputs.
fn per_family(text: &str) -> Vec<(&'static str, String)> {
    if let Some(i) = text.find("# ip6tables-restore input") {
        vec![
            ("iptables-restore", text[..i].to_string()),
            ("ip6tables-restore", text[i..].to_string()),
        ]
    } else if text.contains("fd00") {
        vec![("ip6tables-restore", text.to_string())]
    } else {
        vec![("iptables-restore", text.to_string())]
    }
}

fn restore(tool: &str, text: &str, what: &str) {
    let ns = Netns::new("restore");
    for args in [vec![tool, "--test"], vec![tool]] {
        let out = ns.run(&args, Some(text));
        assert!(
            out.status.success(),
            "{what}: `{}` refused it: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The real restore left kproxy's chains in the namespace.
    let save = if tool.starts_with("ip6") {
        "ip6tables-save"
    } else {
        "iptables-save"
    };
    let dump = String::from_utf8(ns.run(&[save, "-t", "nat"], None).stdout).unwrap_or_default();
    assert!(
        dump.contains(":KUBE-SERVICES"),
        "{what}: nothing was loaded:\n{dump}"
    );
}

#[test]
fn golden_iptables_outputs_load_into_the_kernel() {
    if !kernel_tests_possible(&["iptables-restore", "ip6tables-restore"]) {
        return;
    }
    let root = common::repo_dir().join("rules-golden");
    let mut checked = 0;
    for entry in fs::read_dir(root).expect("rules-golden") {
        let path = entry.expect("entry").path().join("iptables.txt");
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        for (tool, part) in per_family(&text) {
            restore(tool, &part, &path.display().to_string());
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} golden outputs found");
}

#[test]
fn restore_check_rejects_broken_input() {
    if !kernel_tests_possible(&["iptables-restore"]) {
        return;
    }
    let ns = Netns::new("restore");
    let broken = "*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -j KUBE-SVC-MISSING\nCOMMIT\n";
    let out = ns.run(&["iptables-restore"], Some(broken));
    assert!(
        !out.status.success(),
        "a jump to an undeclared chain must be refused"
    );
}
