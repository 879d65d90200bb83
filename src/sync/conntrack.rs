//! Stale UDP conntrack entries (spec §7). (Being implemented.)

use super::SyncError;
use crate::model::ProxyModel;

/// Deletes UDP flows to a service address whose backend is no longer a serving endpoint.
/// Returns the number of entries deleted.
pub fn cleanup_stale_udp(models: &[ProxyModel]) -> Result<usize, SyncError> {
    let _ = models;
    Ok(0)
}
