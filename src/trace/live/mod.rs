//! `kproxy trace --live`: the rules and affinity state this network namespace holds now.

use crate::backend::Mode;
use crate::family::IpFamily;

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

/// Reads this network namespace's rules of one mode and family.
pub fn read(mode: Mode, family: IpFamily) -> anyhow::Result<LiveRules> {
    anyhow::bail!(
        "--live is not implemented yet for {} ({family})",
        mode.name()
    )
}
