//! The `kproxy` binary: the command line lives in [`kproxy::cli`], so that tests can check
//! arguments (a DaemonSet's) with the same parser.

use std::process::ExitCode;

/// mimalloc: the translators allocate many small objects, and the agent's threads would
/// otherwise each get a glibc arena that keeps freed memory.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    kproxy::cli::main()
}
