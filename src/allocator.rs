//! The binary's allocator is mimalloc (src/main.rs). It returns freed memory to the system
//! lazily: pages freed during a sync are purged only once a later allocation finds their delay
//! expired, so after a full sync of a large cluster (whose translation frees several hundred
//! MiB of temporaries) the agent would keep them resident until the next sync, however long
//! that takes.

// The mimalloc crate, which links the library, exposes no call to collect; its C API does.
use mimalloc as _;

extern "C" {
    /// `void mi_collect(bool force)`: frees the calling thread's empty pages and, with
    /// `force`, purges every pending page now instead of after its delay.
    fn mi_collect(force: bool);
}

/// Gives memory freed so far back to the system now. Costs a walk over the allocator's pages:
/// for after large syncs, not after every one. Harmless where mimalloc is not the global
/// allocator (tests): its heaps are then empty.
pub fn release_freed_memory() {
    // SAFETY: mi_collect takes no pointers and may be called from any thread at any time.
    unsafe { mi_collect(true) }
}
