//! iptables mode: `iptables-restore --noflush` per family and sync. (Being implemented.)

use super::{SyncError, SyncReport};
use crate::family::IpFamily;
use crate::iptables::Ruleset;

/// One-shot sync for `kproxy sync --once`: reads what the kernel holds, applies the difference.
pub fn sync_once(rulesets: &[Ruleset]) -> Result<Vec<SyncReport>, SyncError> {
    let _ = rulesets;
    Err(SyncError::Read {
        tool: "iptables-restore".into(),
        family: IpFamily::V4,
        message: "iptables sync is not implemented yet".into(),
    })
}

/// Removes every chain and jump rule kproxy owns, in both families, and nothing else.
pub fn cleanup() -> Result<(), SyncError> {
    Ok(())
}
