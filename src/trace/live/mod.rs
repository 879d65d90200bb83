//! `kproxy trace --live`: the rules and affinity state this network namespace holds now.
//!
//! Each mode has a pure reader of what the kernel tools print ([`iptables_save`], [`nft_json`],
//! and [`xt_recent`] for the `recent` lists) and a thin part that runs the tools.

pub mod iptables_save;
pub mod nft_json;
pub mod xt_recent;

use crate::backend::Mode;
use crate::config::NftablesLayout;
use crate::family::IpFamily;
use crate::sync::iptables::BackendChoice;

use super::{AffinityState, Host, Rules};

/// What `--live` traces over.
pub struct LiveRules {
    pub rules: Box<dyn Rules>,
    pub affinity: AffinityState,
    /// This namespace's own addresses.
    pub host: Host,
    /// Things worth telling about the live state (e.g. `recent` lists near their limit).
    pub notes: Vec<String>,
}

/// Reads this network namespace's rules of one mode and family (iptables: the backend the
/// node uses, detected as the syncer does).
pub fn read(mode: Mode, family: IpFamily) -> anyhow::Result<LiveRules> {
    read_with(mode, family, BackendChoice::Auto, NftablesLayout::KubeProxy)
}

/// [`read`] with the iptables backend (`--iptables-backend`) and the nftables layout
/// (`--nftables-layout`) given.
pub fn read_with(
    mode: Mode,
    family: IpFamily,
    backend: BackendChoice,
    layout: NftablesLayout,
) -> anyhow::Result<LiveRules> {
    let host = Host::new(crate::host::addresses());
    match mode {
        Mode::Iptables => {
            let saved = iptables_save::read(family, backend)?;
            let lists = saved.rules.recent_lists();
            let recent = xt_recent::read(&lists, &saved.recent_seconds);
            let mut notes = saved.notes;
            notes.extend(recent.notes);
            Ok(LiveRules {
                rules: Box::new(saved.rules),
                affinity: recent.affinity,
                host,
                notes,
            })
        }
        Mode::Nftables => {
            let table = match layout {
                NftablesLayout::KubeProxy => crate::nftables::TABLE_NAME,
                NftablesLayout::Maps => crate::nftables::MAPS_TABLE_NAME,
            };
            let listed = nft_json::read(family, table)?;
            Ok(LiveRules {
                rules: Box::new(listed.rules),
                affinity: listed.affinity,
                host,
                notes: listed.notes,
            })
        }
    }
}
