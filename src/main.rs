//! The `kproxy` binary: the command line lives in [`kproxy::cli`], so that tests can check
//! arguments (a DaemonSet's) with the same parser.

use std::process::ExitCode;

fn main() -> ExitCode {
    kproxy::cli::main()
}
