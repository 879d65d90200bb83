//! nftables mode: one `nft -f -` transaction per family and sync. (Being implemented.)

use super::{SyncError, SyncReport};
use crate::family::IpFamily;
use crate::nftables::Ruleset;

/// One-shot sync for `kproxy sync --once`: reads what the kernel holds, applies the difference.
pub fn sync_once(rulesets: &[Ruleset]) -> Result<Vec<SyncReport>, SyncError> {
    let _ = rulesets;
    Err(SyncError::Read {
        tool: "nft".into(),
        family: IpFamily::V4,
        message: "nftables sync is not implemented yet".into(),
    })
}

/// Removes every object kproxy owns (the `kube-proxy` tables) and nothing else.
pub fn cleanup(families: &[IpFamily]) -> Result<(), SyncError> {
    let _ = families;
    Ok(())
}
