//! The `kproxy` binary's contract: inputs, messages and exit statuses (design notes,
//! "Command-line contract").

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn kproxy(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kproxy"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kproxy runs");
    let mut pipe = child.stdin.take().expect("stdin");
    // kproxy may exit before reading its input (a bad flag is refused first): a closed pipe
    // is then no failure of the test, the exit status and message are what it checks.
    match pipe.write_all(stdin.unwrap_or("").as_bytes()) {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => panic!("stdin: {err}"),
        _ => {}
    }
    drop(pipe);
    child.wait_with_output().expect("kproxy finishes")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn renders_the_session_affinity_example() {
    let out = kproxy(
        &["render", "--hostname", "n1", "examples/my-service.yaml"],
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let rules = text(&out.stdout);
    assert_eq!(
        rules.matches("--rcheck --seconds 10000 --reap").count(),
        3,
        "{rules}"
    );
    assert_eq!(
        rules.matches("-m recent --name KUBE-SEP-").count(),
        6,
        "{rules}"
    );
    assert!(rules.starts_with("*filter\n") && rules.ends_with("COMMIT\n"));
}

#[test]
fn reads_directories_and_stdin() {
    let from_dir = kproxy(&["render", "--hostname", "n1", "examples/"], None);
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/my-service.yaml"),
    )
    .unwrap();
    let from_stdin = kproxy(&["render", "--hostname", "n1", "-"], Some(&example));
    assert_eq!(
        from_dir.status.code(),
        Some(0),
        "{}",
        text(&from_dir.stderr)
    );
    assert_eq!(
        from_stdin.status.code(),
        Some(0),
        "{}",
        text(&from_stdin.stderr)
    );
    assert!(text(&from_dir.stdout).contains("default/my-service:http"));
    assert!(text(&from_stdin.stdout).contains("default/my-service:http"));
}

#[test]
fn malformed_yaml_fails_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.yaml");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: [unclosed\n",
    )
    .unwrap();
    let out = kproxy(
        &["render", "--hostname", "n1", path.to_str().unwrap()],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("broken.yaml: malformed YAML/JSON at line "),
        "stderr: {err}"
    );
    assert!(out.stdout.is_empty(), "no rules on a failed read");
}

#[test]
fn unreadable_input_fails() {
    let out = kproxy(&["render", "--hostname", "n1", "/nonexistent/x.yaml"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot read /nonexistent/x.yaml"));
}

#[test]
fn bad_flags_exit_2() {
    let out = kproxy(&["render", "--mode", "ipvs", "examples/"], None);
    assert_eq!(out.status.code(), Some(2));
    let out = kproxy(&["render", "--node-ip", "not-an-ip", "examples/"], None);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn invalid_objects_are_reported_and_skipped_with_status_0() {
    let input = "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: ns}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 0}]}\n";
    let out = kproxy(&["render", "--hostname", "n1", "-"], Some(input));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        text(&out.stderr),
        "kproxy: skipped Service ns/bad: spec.ports[0].port 0 is outside 1..65535\n"
    );
    assert!(text(&out.stdout).contains("*nat"));
}

#[test]
fn generate_produces_readable_manifests() {
    let out = kproxy(&["generate", "--services", "20", "--endpoints", "3"], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let rendered = kproxy(
        &["render", "--hostname", "n1", "-"],
        Some(&text(&out.stdout)),
    );
    assert_eq!(
        rendered.status.code(),
        Some(0),
        "{}",
        text(&rendered.stderr)
    );
    assert!(rendered.stderr.is_empty(), "{}", text(&rendered.stderr));
    let rules = text(&rendered.stdout);
    // 20 services, plus a second (UDP) port on every twentieth: one capture rule each (no
    // --cluster-cidr, so no masquerade rule repeats the comment).
    assert_eq!(rules.matches(" cluster IP\" -m").count(), 21, "{rules}");
    assert_eq!(rules.matches("-j DNAT").count(), 21 * 3);
}

/// `generate --output json` is one `v1` `List` of the objects the YAML output holds: every
/// mode and layout renders byte-identical rules from either.
#[test]
fn generate_json_renders_as_the_yaml() {
    let generate = |format: &str| {
        let out = kproxy(
            &[
                "generate",
                "--services",
                "50",
                "--endpoints",
                "3",
                "--output",
                format,
            ],
            None,
        );
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let yaml = generate("yaml");
    assert_eq!(
        yaml,
        text(&kproxy(&["generate", "--services", "50", "--endpoints", "3"], None).stdout),
        "yaml is the default"
    );
    let json = generate("json");
    let list: serde_json::Value = serde_json::from_str(&json).expect("one JSON document");
    assert_eq!(list["apiVersion"], "v1");
    assert_eq!(list["kind"], "List");
    let items = list["items"].as_array().expect("a List has items");
    assert_eq!(items.len(), 100, "50 Services and 50 EndpointSlices");
    assert_eq!(items[0]["kind"], "Service");
    assert_eq!(items[50]["kind"], "EndpointSlice");

    for flags in [
        &["--mode", "iptables"][..],
        &["--mode", "nftables"][..],
        &["--mode", "nftables", "--nftables-layout", "maps"][..],
    ] {
        let render = |input: &str| {
            let mut args = vec!["render", "--hostname", "node-1", "--node-ip", "10.0.0.1"];
            args.extend_from_slice(flags);
            args.push("-");
            let out = kproxy(&args, Some(input));
            assert_eq!(
                out.status.code(),
                Some(0),
                "{flags:?}: {}",
                text(&out.stderr)
            );
            assert!(out.stderr.is_empty(), "{flags:?}: {}", text(&out.stderr));
            text(&out.stdout)
        };
        let from_yaml = render(&yaml);
        // 50 Services and 3 more UDP ports (every twentieth Service): every endpoint is there.
        assert!(from_yaml.contains("10.128.0.150"), "{flags:?}: {from_yaml}");
        assert!(from_yaml.lines().count() > 150, "{flags:?}: {from_yaml}");
        assert!(
            from_yaml == render(&json),
            "{flags:?}: JSON and YAML render differently"
        );
    }
}

/// `--service-cidr`: comma-separated, at most one CIDR per family; a bad value is a bad flag
/// (clap reports it, status 2). Cluster IPs outside it are refused.
#[test]
fn service_cidr_flag() {
    let input = "apiVersion: v1\nkind: Service\nmetadata: {name: out, namespace: ns}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: in, namespace: ns}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n";
    for bad in [
        "bogus",
        "10.96.0.0/16,10.97.0.0/16",
        "10.96.0.0/16,",
        "fd00::/112,fd01::/112",
    ] {
        let out = kproxy(
            &["render", "--hostname", "n1", "--service-cidr", bad, "-"],
            Some(input),
        );
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("--service-cidr"),
            "{bad}: {}",
            text(&out.stderr)
        );
    }
    let out = kproxy(
        &[
            "render",
            "--hostname",
            "n1",
            "--service-cidr",
            "10.96.0.0/16,fd00:10:96::/112",
            "-",
        ],
        Some(input),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr),
        "kproxy: skipped Service ns/out: spec.clusterIP \"10.0.0.1\" is outside the service CIDR 10.96.0.0/16 (--service-cidr); the API server allocates cluster IPs only from it\n"
    );
    assert!(text(&out.stdout).contains("ns/in"));
}

/// A count the generator's address ranges cannot hold is refused with a message, not a panic
/// or wrapped-around addresses.
#[test]
fn generate_refuses_what_does_not_fit() {
    // A kproxy that wraps around would run until memory is gone: stop it after a minute.
    let mut child = Command::new(env!("CARGO_BIN_EXE_kproxy"))
        .args(["generate", "--services", "18446744073709551615"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kproxy runs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child
        .try_wait()
        .expect("kproxy can be waited for")
        .is_none()
    {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kproxy generate did not refuse the count within a minute");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("kproxy finishes");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(
            "18446744073709551615 Services need more cluster IPs than 10.96.0.0/12 holds"
        ),
        "{}",
        text(&out.stderr)
    );
    assert!(out.stdout.is_empty());
}
