//! What the installed `nft` can load of the `maps` layout.
//!
//! nft before 1.0.6.1 / 1.1.0 cannot write a map update whose key or data is a concatenation
//! longer than 16 bytes (it reserves one 16-byte register for each: netlink_linearize.c asserts
//! `dreg < ctx->reg_low` and aborts; fixed upstream by "netlink_linearize: skip set element
//! expression in map statement key" and "dynset: avoid errouneous assert with ipv6 concat
//! data"). The IPv6 `remember-T` rules of the `maps` layout
//! (`update @affinity { ip6 saddr . ct original ip6 daddr . … : ip6 daddr . th dport }`) are
//! such updates; the IPv4 ones fit (a 16-byte key, 8 bytes of data).

use super::netns::Netns;

/// A minimal table with an IPv6 affinity-map update as the `maps` layout writes it.
const PROBE: &str = "add table ip6 probe
add chain ip6 probe c
add map ip6 probe m { type ipv6_addr . ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service ; flags dynamic,timeout ; }
add rule ip6 probe c meta l4proto tcp update @m { ip6 saddr . ip6 daddr . meta l4proto . th dport timeout 60s : ip6 daddr . th dport }
";

/// Whether this nft writes the IPv6 affinity updates (checked with `nft -c` in `ns`).
pub fn writes_ipv6_affinity_updates(ns: &Netns) -> bool {
    ns.run(&["nft", "-c", "-f", "-"], Some(PROBE))
        .status
        .success()
}

/// Whether a script line is an IPv6 affinity update of the `maps` layout.
pub fn is_ipv6_affinity_update(line: &str) -> bool {
    line.starts_with("add rule ip6 kproxy remember-") && line.contains(" update @affinity ")
}

/// The script without its IPv6 affinity updates, and how many there were.
pub fn without_ipv6_affinity_updates(script: &str) -> (String, usize) {
    let mut kept = String::new();
    let mut dropped = 0;
    for line in script.lines() {
        if is_ipv6_affinity_update(line) {
            dropped += 1;
        } else {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    (kept, dropped)
}

/// `nft ARGS` in `ns`; panics when it fails, else returns its output.
pub fn nft(ns: &Netns, args: &[&str]) -> String {
    let mut argv = vec!["nft"];
    argv.extend_from_slice(args);
    let out = ns.run(&argv, None);
    assert!(
        out.status.success(),
        "nft {} in {}: {}",
        args.join(" "),
        ns.name,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}
