//! The `recent` lists behind iptables session affinity: who has an entry
//! (`/proc/net/xt_recent/<LIST>`) and how full each list is against the module's
//! `ip_list_tot`.
//!
//! An entry older than the rule's `--seconds` stays listed until a `--rcheck … --reap` of that
//! list reaps it, so a plain reading would call a stale client sticky. When this kernel's clock
//! can be read — `jiffies:` from `/proc/timer_list` and `CONFIG_HZ` from the kernel config
//! (`/boot/config-<release>` or `/proc/config.gz`) — an entry whose `last_seen` is older than
//! the list's `--seconds` is left out (and said so); otherwise every listed client counts as
//! having an entry, and a note says that ages were not checked.
//!
//! Pure functions take the files' text; [`read`] reads them.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::trace::AffinityState;

/// The module's default `ip_list_tot`: addresses per list.
pub const DEFAULT_LIST_TOTAL: usize = 100;

/// Lists at or above this share of `ip_list_tot` get a note.
pub const FULL_SHARE: f64 = 0.8;

/// One line of `/proc/net/xt_recent/<LIST>`:
/// `src=10.0.0.9 ttl: 64 last_seen: 4295012345 oldest_pkt: 1 4295012345`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecentEntry {
    pub client: IpAddr,
    /// In jiffies.
    pub last_seen: u64,
}

/// The entries of one list file, and how many lines were not understood.
pub fn parse_list(text: &str) -> (Vec<RecentEntry>, usize) {
    let mut entries = Vec::new();
    let mut unreadable = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match parse_entry(line) {
            Some(entry) => entries.push(entry),
            None => unreadable += 1,
        }
    }
    (entries, unreadable)
}

fn parse_entry(line: &str) -> Option<RecentEntry> {
    let mut words = line.split_whitespace();
    let client = words.next()?.strip_prefix("src=")?.parse().ok()?;
    let mut last_seen = None;
    while let Some(word) = words.next() {
        if word == "last_seen:" {
            last_seen = words.next()?.parse().ok();
            break;
        }
    }
    Some(RecentEntry {
        client,
        last_seen: last_seen?,
    })
}

/// The kernel's clock: the jiffies counter now, and its ticks per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    pub now: u64,
    pub hz: u64,
}

/// `jiffies: N` from `/proc/timer_list`.
pub fn parse_jiffies(timer_list: &str) -> Option<u64> {
    timer_list
        .lines()
        .find_map(|l| l.trim().strip_prefix("jiffies:"))
        .and_then(|n| n.trim().parse().ok())
}

/// `CONFIG_HZ=N` from a kernel config.
pub fn parse_hz(config: &str) -> Option<u64> {
    config
        .lines()
        .find_map(|l| l.trim().strip_prefix("CONFIG_HZ="))
        .and_then(|n| n.trim().parse().ok())
        .filter(|hz| (1..=100_000).contains(hz))
}

/// Whether an entry would still satisfy `--rcheck --seconds seconds`: seen less than
/// `seconds` ago (the kernel's `time_after(last_seen, jiffies - seconds * HZ)`).
pub fn is_live(entry: &RecentEntry, clock: Clock, seconds: u32) -> bool {
    let age = clock.now.wrapping_sub(entry.last_seen);
    // A last_seen "in the future" (wrapped) is as new as it gets.
    let age = if age > u64::MAX / 2 { 0 } else { age };
    age < u64::from(seconds).saturating_mul(clock.hz)
}

/// Who has an entry in which list, and what is worth telling about the lists.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecentState {
    pub affinity: AffinityState,
    pub notes: Vec<String>,
}

/// One list as read: its entries, or `None` when its file could not be read.
#[derive(Debug, Clone, PartialEq)]
pub struct ListFile {
    pub name: String,
    pub entries: Option<Vec<RecentEntry>>,
    pub unreadable_lines: usize,
}

/// Judges the lists: clients with a live entry go into the affinity state; a summary note, one
/// note per list at or above [`FULL_SHARE`] of `limit`, and notes on stale or unreadable
/// entries. `seconds` is each list's `--rcheck --seconds`; `clock` the kernel's, if known.
pub fn assess(
    lists: &[ListFile],
    seconds: &BTreeMap<String, u32>,
    clock: Option<Clock>,
    limit: Option<usize>,
) -> RecentState {
    let mut state = RecentState::default();
    let limit_known = limit.is_some();
    let limit = limit.unwrap_or(DEFAULT_LIST_TOTAL);
    let mut total = 0;
    let mut unchecked_ages = false;
    let mut fullness = Vec::new();
    for list in lists {
        let Some(entries) = &list.entries else {
            state.notes.push(format!(
                "recent list {} is named by the rules but /proc/net/xt_recent/{} could not be \
                 read: its clients are taken as having no entry",
                list.name, list.name
            ));
            continue;
        };
        if list.unreadable_lines > 0 {
            state.notes.push(format!(
                "recent list {}: {} line(s) not understood",
                list.name, list.unreadable_lines
            ));
        }
        total += entries.len();
        let mut stale = 0;
        for entry in entries {
            let live = match (clock, seconds.get(&list.name)) {
                (Some(clock), Some(&s)) => is_live(entry, clock, s),
                (None, Some(_)) => {
                    unchecked_ages = true;
                    true
                }
                (_, None) => true,
            };
            if live {
                state.affinity.insert(&list.name, entry.client);
            } else {
                stale += 1;
            }
        }
        if stale > 0 {
            state.notes.push(format!(
                "recent list {}: {stale} entr{} older than its --seconds {} left out (listed \
                 until a check of the list reaps them)",
                list.name,
                if stale == 1 { "y" } else { "ies" },
                seconds.get(&list.name).copied().unwrap_or_default()
            ));
        }
        // Stale entries still take a place: the list is as full as its file is long.
        if limit > 0 && entries.len() as f64 >= FULL_SHARE * limit as f64 {
            fullness.push(format!(
                "recent list {} holds {} of {limit} addresses (xt_recent ip_list_tot){}: when \
                 it is full, every new client evicts the oldest entry, and that client silently \
                 loses its session affinity. Raise the limit with the module parameter \
                 ip_list_tot, set when xt_recent is loaded (`modprobe xt_recent \
                 ip_list_tot=N`, or `options xt_recent ip_list_tot=N` in /etc/modprobe.d/); it \
                 cannot be changed while the module is loaded, so the rules using `-m recent` \
                 must be removed and the module unloaded first",
                list.name,
                entries.len(),
                if entries.len() >= limit { ", full" } else { "" }
            ));
        }
    }
    state.notes.insert(
        0,
        format!(
            "recent lists: {} list{} with {total} entr{} in all; limit {limit} addresses per \
             list (xt_recent ip_list_tot{})",
            lists.len(),
            if lists.len() == 1 { "" } else { "s" },
            if total == 1 { "y" } else { "ies" },
            if limit_known {
                ""
            } else {
                ", not readable: the default assumed"
            }
        ),
    );
    if unchecked_ages {
        state.notes.push(
            "the ages of recent entries were not checked (this kernel's jiffies or CONFIG_HZ \
             could not be read): an entry older than its rule's --seconds stays listed until a \
             check reaps it, so a client may be shown as sticky whose entry has lapsed"
                .into(),
        );
    }
    state.notes.extend(fullness);
    state
}

/// `ip_list_tot` from the module's parameters.
pub fn parse_limit(text: &str) -> Option<usize> {
    text.trim().parse().ok()
}

/// Reads every list the rules name, the module's limit and the kernel's clock, and judges
/// them with [`assess`].
pub fn read(lists: &[String], seconds: &BTreeMap<String, u32>) -> RecentState {
    let files: Vec<ListFile> = lists
        .iter()
        .map(|name| {
            let text = std::fs::read_to_string(format!("/proc/net/xt_recent/{name}")).ok();
            let (entries, unreadable_lines) = match &text {
                Some(text) => {
                    let (entries, unreadable) = parse_list(text);
                    (Some(entries), unreadable)
                }
                None => (None, 0),
            };
            ListFile {
                name: name.clone(),
                entries,
                unreadable_lines,
            }
        })
        .collect();
    let limit = std::fs::read_to_string("/sys/module/xt_recent/parameters/ip_list_tot")
        .ok()
        .and_then(|t| parse_limit(&t));
    let clock = read_clock();
    assess(&files, seconds, clock, limit)
}

/// The kernel's jiffies and HZ, when both can be read.
fn read_clock() -> Option<Clock> {
    let hz = kernel_config().as_deref().and_then(parse_hz)?;
    let now = std::fs::read_to_string("/proc/timer_list")
        .ok()
        .as_deref()
        .and_then(parse_jiffies)?;
    Some(Clock { now, hz })
}

/// The running kernel's config: `/boot/config-<release>`, else `/proc/config.gz` through
/// `gzip -dc`.
fn kernel_config() -> Option<String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    if let Ok(text) = std::fs::read_to_string(format!("/boot/config-{}", release.trim())) {
        return Some(text);
    }
    let output = std::process::Command::new("gzip")
        .args(["-dc", "/proc/config.gz"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = "src=10.0.0.10 ttl: 0 last_seen: 4297593293 oldest_pkt: 1 4297593293\n\
                        src=10.0.0.9 ttl: 64 last_seen: 4295012345 oldest_pkt: 1 4295012345\n";

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    #[test]
    fn list_lines_are_read() {
        let (entries, unreadable) = parse_list(LIST);
        assert_eq!(unreadable, 0);
        assert_eq!(
            entries,
            vec![
                RecentEntry {
                    client: ip("10.0.0.10"),
                    last_seen: 4297593293
                },
                RecentEntry {
                    client: ip("10.0.0.9"),
                    last_seen: 4295012345
                }
            ]
        );
        let (entries, unreadable) =
            parse_list("src=fd00::9 ttl: 0 last_seen: 5 oldest_pkt: 1 5\ngarbage\nsrc=x\n");
        assert_eq!((entries.len(), unreadable), (1, 2));
    }

    #[test]
    fn clock_parts_are_read() {
        assert_eq!(
            parse_jiffies("now at 1 nsecs\n\ncpu: 0\n jiffies: 4297593294\njiffies: 1\n"),
            Some(4297593294)
        );
        assert_eq!(
            parse_hz("# CONFIG_HZ_100 is not set\nCONFIG_HZ_250=y\nCONFIG_HZ=250\n"),
            Some(250)
        );
        assert_eq!(parse_hz("CONFIG_HZ_250=y\n"), None);
    }

    #[test]
    fn ages_follow_the_kernels_comparison() {
        let entry = RecentEntry {
            client: ip("10.0.0.9"),
            last_seen: 1_000,
        };
        let clock = |now| Clock { now, hz: 250 };
        assert!(is_live(&entry, clock(1_000), 10));
        assert!(is_live(&entry, clock(3_499), 10));
        assert!(!is_live(&entry, clock(3_500), 10));
        // Jiffies that wrapped past zero.
        let wrapped = RecentEntry {
            client: ip("10.0.0.9"),
            last_seen: u64::MAX - 10,
        };
        assert!(is_live(&wrapped, clock(100), 10));
        assert!(is_live(&entry, clock(999), 10), "seen after now: live");
    }

    fn file(name: &str, count: usize) -> ListFile {
        ListFile {
            name: name.into(),
            entries: Some(
                (0..count)
                    .map(|i| RecentEntry {
                        client: IpAddr::from([10, 1, (i / 256) as u8, (i % 256) as u8]),
                        last_seen: 1_000,
                    })
                    .collect(),
            ),
            unreadable_lines: 0,
        }
    }

    #[test]
    fn full_lists_get_a_note_naming_list_count_limit_and_remedy() {
        let lists = [
            file("KUBE-SEP-A", 80),
            file("KUBE-SEP-B", 79),
            file("KUBE-SEP-C", 1),
        ];
        let state = assess(&lists, &BTreeMap::new(), None, Some(100));
        assert!(
            state.notes[0].starts_with("recent lists: 3 lists with 160 entries in all; limit 100"),
            "{:?}",
            state.notes
        );
        let full: Vec<&String> = state
            .notes
            .iter()
            .filter(|n| n.contains("ip_list_tot=N"))
            .collect();
        assert_eq!(full.len(), 1, "{:?}", state.notes);
        for part in [
            "KUBE-SEP-A",
            "80 of 100",
            "evicts the oldest",
            "modprobe xt_recent",
        ] {
            assert!(full[0].contains(part), "{part}: {}", full[0]);
        }
        assert!(state.affinity.contains("KUBE-SEP-C", ip("10.1.0.0")));
        let state = assess(&[file("L", 100)], &BTreeMap::new(), None, Some(100));
        assert!(state
            .notes
            .iter()
            .any(|n| n.contains("100 of 100 addresses (xt_recent ip_list_tot), full")));
        let state = assess(&[file("L", 3)], &BTreeMap::new(), None, Some(3));
        assert_eq!(state.notes.len(), 2, "{:?}", state.notes);
    }

    #[test]
    fn stale_entries_are_left_out_when_the_clock_is_known() {
        let lists = [file("L", 2)];
        let seconds = BTreeMap::from([("L".to_string(), 10)]);
        let fresh = assess(
            &lists,
            &seconds,
            Some(Clock {
                now: 1_100,
                hz: 100,
            }),
            Some(100),
        );
        assert!(fresh.affinity.contains("L", ip("10.1.0.1")));
        let stale = assess(
            &lists,
            &seconds,
            Some(Clock {
                now: 9_000,
                hz: 100,
            }),
            Some(100),
        );
        assert!(!stale.affinity.contains("L", ip("10.1.0.1")));
        assert!(stale
            .notes
            .iter()
            .any(|n| n.contains("2 entries older than its --seconds 10")));
        let unknown = assess(&lists, &seconds, None, None);
        assert!(unknown.affinity.contains("L", ip("10.1.0.1")));
        assert!(unknown.notes.iter().any(|n| n.contains("were not checked")));
        assert!(unknown.notes[0].contains("the default assumed"));
    }
}
