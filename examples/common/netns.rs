//! A network namespace for the benchmark examples, deleted on drop. Included by each example
//! with `#[path = "common/netns.rs"] mod netns;` (each uses part of it).
//!
//! It keeps a descriptor opened when it was made: threads enter the namespace through it, so a
//! measure goes on even if something else removes its name from /run/netns (which happened on
//! a shared machine); the name is needed only for `ip netns exec`.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct Netns {
    pub name: String,
    file: File,
}

impl Netns {
    /// `kp-{purpose}-{pid}-{n}`, with its loopback up. Needs root.
    pub fn new(purpose: &str) -> Netns {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "kp-{purpose}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip runs");
        assert!(status.success(), "ip netns add {name} failed (root?)");
        let file = File::open(format!("/run/netns/{name}"))
            .unwrap_or_else(|err| panic!("/run/netns/{name}: {err}"));
        let ns = Netns { name, file };
        ns.run(&["ip", "link", "set", "lo", "up"], None);
        ns
    }

    /// `ip netns exec NAME`: the prefix that runs a command inside.
    pub fn exec_prefix(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.name]
    }

    /// Runs `argv` inside the namespace, feeding it `stdin`.
    pub fn run(&self, argv: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("{argv:?}: {err}"));
        let pipe = child.stdin.take();
        // Written on a thread of its own: a command may answer before it has read everything.
        std::thread::scope(|scope| {
            if let (Some(mut pipe), Some(input)) = (pipe, stdin) {
                scope.spawn(move || {
                    use std::io::Write;
                    let _ = pipe.write_all(input);
                });
            }
            child.wait_with_output().expect("the command ends")
        })
    }

    /// Runs `argv` inside the namespace; it must succeed.
    pub fn run_ok(&self, argv: &[&str]) {
        let out = self.run(argv, None);
        assert!(
            out.status.success(),
            "{argv:?} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }

    /// A file as seen inside the namespace (`/proc/sys/net/…`, `/proc/thread-self/net/…`);
    /// empty if it cannot be read.
    pub fn read(&self, path: &'static str) -> String {
        self.spawn(move || std::fs::read_to_string(path).unwrap_or_default())
            .join()
            .unwrap_or_default()
    }

    /// Moves the calling thread (and the threads it starts from then on) into the namespace.
    pub fn enter_this_thread(&self) {
        // SAFETY: setns on a valid namespace descriptor changes only this thread's namespace.
        let rc = unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "setns into {}: {}",
            self.name,
            std::io::Error::last_os_error()
        );
    }

    /// Runs `f` on a thread inside the namespace (sockets it opens live there).
    pub fn enter<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    self.enter_this_thread();
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Starts `f` on a thread inside the namespace.
    pub fn spawn<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> std::thread::JoinHandle<R> {
        let file = self.file.try_clone().expect("the namespace descriptor");
        let name = self.name.clone();
        std::thread::spawn(move || {
            // SAFETY: as in `enter_this_thread`.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns into {name} failed");
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}
