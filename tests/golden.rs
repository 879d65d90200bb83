//! Golden files: `rules-golden/<case>/` holds `input.yaml`, the render flags in `flags`, and
//! the expected output of each mode (`iptables.txt`, `nftables.txt`, and `nftables-maps.txt` for
//! the `maps` nftables layout). The real `kproxy render` binary renders each case; any change in
//! output fails with a diff.
//!
//! To accept intended changes: `KPROXY_UPDATE_GOLDEN=1 cargo test --test golden`, then review
//! the diff of `rules-golden/` like any other change.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

/// Each golden file's name and the flags that select its mode.
const MODES: [(&str, &[&str]); 3] = [
    ("iptables", &["--mode", "iptables"]),
    ("nftables", &["--mode", "nftables"]),
    (
        "nftables-maps",
        &["--mode", "nftables", "--nftables-layout", "maps"],
    ),
];

fn render(case: &Path, mode: &[&str]) -> String {
    let flags = fs::read_to_string(case.join("flags")).unwrap_or_default();
    let output = Command::new(env!("CARGO_BIN_EXE_kproxy"))
        .arg("render")
        .args(mode)
        .args(flags.split_whitespace())
        .arg(case.join("input.yaml"))
        .output()
        .expect("kproxy runs");
    assert!(
        output.status.success(),
        "{}: kproxy render {} failed: {}",
        case.display(),
        mode.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("output is UTF-8")
}

#[test]
fn golden_cases_render_unchanged() {
    let root = common::repo_dir().join("rules-golden");
    let mut cases: Vec<_> = fs::read_dir(&root)
        .expect("rules-golden exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("input.yaml").is_file())
        .collect();
    cases.sort();
    assert!(cases.len() >= 10, "expected at least 10 golden cases");
    let update = std::env::var_os("KPROXY_UPDATE_GOLDEN").is_some();
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        for (mode, flags) in MODES {
            let expected_path = case.join(format!("{mode}.txt"));
            if !expected_path.exists() && !update {
                continue;
            }
            let actual = render(case, flags);
            if update {
                fs::write(&expected_path, &actual).expect("write golden file");
                continue;
            }
            let expected = fs::read_to_string(&expected_path).expect("read golden file");
            checked += 1;
            if expected != actual {
                failures.push(format!(
                    "{name}/{mode}.txt differs (KPROXY_UPDATE_GOLDEN=1 to accept):\n{}",
                    common::diff(&expected, &actual)
                ));
            } else {
                println!("golden {name}/{mode}: unchanged");
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        update || checked >= cases.len(),
        "every case has an iptables.txt"
    );
}
