//! Manifest reading benchmark (issue 9): the synthetic cluster (10,000 Services x 10 endpoints
//! by default) as a JSON `kind: List` (the shape of `kubectl get services,endpointslices -o
//! json`), as a YAML `kind: List` and as the multi-document YAML of `kproxy generate`; for
//! each, the time to read it in this process, then (with `--kproxy`) `kproxy render` end to
//! end in both modes, with wall time and peak RSS, and (with `--restore`, root) the time
//! `iptables-restore --test` takes to parse the rendered rules in a scratch network namespace.
//!
//! ```text
//! cargo build --release --bin kproxy --example manifest_bench
//! target/release/examples/manifest_bench --out /tmp/manifests --kproxy target/release/kproxy --restore
//! ```
//!
//! Arguments: `[--services N] [--endpoints N] [--runs N] [--out DIR] [--kproxy PATH]
//! [--restore]`. The inputs stay in `--out` (default: a temporary directory) for
//! `/usr/bin/time -v kproxy render FILE` or `perf record -g`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kproxy::source::Manifests;

struct Args {
    services: usize,
    endpoints: usize,
    runs: usize,
    out: Option<PathBuf>,
    kproxy: Option<PathBuf>,
    restore: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        services: 10_000,
        endpoints: 10,
        runs: 5,
        out: None,
        kproxy: None,
        restore: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String| v.parse::<usize>().map_err(|e| format!("{v}: {e}"));
        match flag.as_str() {
            "--services" => args.services = number(value()?)?,
            "--endpoints" => args.endpoints = number(value()?)?,
            "--runs" => args.runs = number(value()?)?.max(1),
            "--out" => args.out = Some(value()?.into()),
            "--kproxy" => args.kproxy = Some(value()?.into()),
            "--restore" => args.restore = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

/// Writes the three inputs into `dir`; returns their paths.
fn write_inputs(dir: &Path, services: usize, endpoints: usize) -> std::io::Result<Vec<PathBuf>> {
    let state = kproxy::synthetic::cluster(services, endpoints).map_err(std::io::Error::other)?;
    let items: Vec<serde_json::Value> = state
        .services
        .iter()
        .map(serde_json::to_value)
        .chain(state.endpoint_slices.iter().map(serde_json::to_value))
        .collect::<Result<_, _>>()?;
    let list = serde_json::json!({
        "apiVersion": "v1",
        "items": items,
        "kind": "List",
        "metadata": {"resourceVersion": ""},
    });
    let json = dir.join("list.json");
    std::fs::write(&json, serde_json::to_string_pretty(&list)?)?;
    let yaml_list = dir.join("list.yaml");
    std::fs::write(
        &yaml_list,
        serde_yaml::to_string(&list).map_err(std::io::Error::other)?,
    )?;
    let stream = dir.join("stream.yaml");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&stream)?);
    kproxy::synthetic::write_manifests(&state, &mut out)?;
    std::io::Write::flush(&mut out)?;
    Ok(vec![json, yaml_list, stream])
}

fn min_median(mut times: Vec<Duration>) -> String {
    times.sort();
    format!(
        "min {:.0} ms, median {:.0} ms",
        times[0].as_secs_f64() * 1e3,
        times[times.len() / 2].as_secs_f64() * 1e3
    )
}

/// `kproxy render` under `/usr/bin/time`: wall time and peak RSS of each run.
fn render(
    kproxy: &Path,
    mode: &str,
    input: &Path,
    rules: &Path,
) -> Result<(Duration, u64), String> {
    let stats = rules.with_extension("time");
    let status = Command::new("/usr/bin/time")
        .args(["-f", "%e %M", "-o"])
        .arg(&stats)
        .arg(kproxy)
        .args(["render", "--hostname", "node-1", "--node-ip", "192.168.0.2"])
        .args(["--cluster-cidr", "10.128.0.0/9", "--mode", mode])
        .arg(input)
        .stdout(std::fs::File::create(rules).map_err(|e| e.to_string())?)
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("/usr/bin/time: {e}"))?;
    if !status.success() {
        return Err(format!(
            "kproxy render {} failed: {status}",
            input.display()
        ));
    }
    let text = std::fs::read_to_string(&stats).map_err(|e| e.to_string())?;
    let mut fields = text.split_whitespace();
    let seconds: f64 = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
    let kib: u64 = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((Duration::from_secs_f64(seconds), kib))
}

/// `iptables-restore --test` of `rules` in a scratch network namespace.
fn restore_test(rules: &Path) -> Result<Duration, String> {
    let netns = format!("kproxy-manifest-bench-{}", std::process::id());
    let ip = |args: &[&str]| Command::new("ip").args(args).status();
    ip(&["netns", "add", &netns]).map_err(|e| format!("ip netns add: {e}"))?;
    let start = Instant::now();
    let status = Command::new("ip")
        .args(["netns", "exec", &netns, "iptables-restore", "--test"])
        .stdin(std::fs::File::open(rules).map_err(|e| e.to_string())?)
        .status();
    let elapsed = start.elapsed();
    let _ = ip(&["netns", "del", &netns]);
    match status {
        Ok(status) if status.success() => Ok(elapsed),
        Ok(status) => Err(format!("iptables-restore --test failed: {status}")),
        Err(err) => Err(format!("iptables-restore: {err}")),
    }
}

fn main() -> Result<(), String> {
    let args = parse_args()?;
    let tmp;
    let dir = match &args.out {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
            dir.clone()
        }
        None => {
            tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
            tmp.path().to_path_buf()
        }
    };
    let inputs = write_inputs(&dir, args.services, args.endpoints).map_err(|e| e.to_string())?;
    let mut restore_times = Vec::new();
    for input in &inputs {
        let data = std::fs::read(input).map_err(|e| e.to_string())?;
        let times = (0..args.runs)
            .map(|_| {
                let start = Instant::now();
                let mut manifests = Manifests::default();
                manifests
                    .add_bytes(&data, "bench")
                    .map(|()| (start.elapsed(), manifests.state.services.len()))
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let services = times[0].1;
        println!(
            "read {} ({:.1} MB, {services} services): {} over {} runs",
            input.display(),
            data.len() as f64 / 1e6,
            min_median(times.into_iter().map(|t| t.0).collect()),
            args.runs
        );
        let Some(kproxy) = &args.kproxy else { continue };
        for mode in ["iptables", "nftables"] {
            let rules = dir.join(format!("rules-{mode}.txt"));
            let runs = (0..args.runs)
                .map(|_| render(kproxy, mode, input, &rules))
                .collect::<Result<Vec<_>, _>>()?;
            let peak = runs.iter().map(|r| r.1).max().unwrap_or(0);
            println!(
                "  kproxy render --mode {mode}: {}; peak RSS {:.0} MB",
                min_median(runs.into_iter().map(|r| r.0).collect()),
                peak as f64 / 1024.0
            );
            if args.restore && mode == "iptables" && restore_times.is_empty() {
                restore_times = (0..args.runs)
                    .map(|_| restore_test(&rules))
                    .collect::<Result<Vec<_>, _>>()?;
            }
        }
    }
    if !restore_times.is_empty() {
        println!(
            "iptables-restore --test of the iptables rules: {}",
            min_median(restore_times)
        );
    }
    Ok(())
}
