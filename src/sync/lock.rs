//! One writer per network namespace: [`NetnsLock`] is held by every kproxy process that
//! changes the kernel's rules (`sync --once`, `cleanup`, and `run` for its whole life), so two
//! of them never interleave their transactions (issue 9: two concurrent syncs left both inputs'
//! services, or duplicated jump rules).
//!
//! # How
//!
//! The lock is a listening Unix socket bound to a name in the *abstract* socket namespace
//! (`\0kproxy-netns-lock`). Linux scopes abstract socket names to the network namespace of the
//! socket (see unix(7)), which is exactly the scope of the rules we write. A second `bind` of
//! the name fails with `EADDRINUSE` while the holder's socket is open; the kernel closes it when
//! the holder exits in any way, `kill -9` included, so a crashed holder can never leave a stale
//! lock. A contender that finds the name taken connects to it and reads `SO_PEERCRED`, which
//! carries the pid and uid of the process that called `listen` (in the contender's PID
//! namespace; 0 when the holder's is not visible from it), and its `/proc/<pid>/cmdline`, to
//! name the holder in its message. The holder never needs to `accept`: a connection waits in
//! the backlog, and a contender connects only once per attempt to name the holder.
//!
//! # Why not a file lock
//!
//! `flock` on a file named after the namespace (e.g. `/run/kproxy/netns-<inode of
//! /proc/self/ns/net>.lock`) dies with its process too, but it is scoped to the *file*, not to
//! the network namespace: two containers sharing the host network but not the host's `/run`
//! (each with its own mount namespace, the usual DaemonSet case unless a hostPath is mounted)
//! would each lock their own file and write at the same time — the failure the iptables
//! `xtables.lock` has had for the same reason. The inode number alone is also only unique
//! per nsfs device, and the files would accumulate. The abstract socket needs no filesystem,
//! no cleanup and no agreement on a path.
//!
//! The price: abstract names have no permissions, so any process in the namespace can take the
//! name. A contender then reports that process (pid, uid and command line), so the squatter is
//! easy to find; it cannot take rules away from us, only delay a writer.

use std::io;
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::time::{Duration, Instant};

/// The abstract socket name of the lock (without the leading NUL).
pub const LOCK_NAME: &str = "kproxy-netns-lock";

/// How often a waiting contender tries again.
const RETRY: Duration = Duration::from_millis(100);

/// The lock of this network namespace, held until dropped (or the process ends).
#[derive(Debug)]
pub struct NetnsLock {
    /// Bound and listening: the name is ours while it is open.
    _socket: UnixListener,
}

/// Who holds the lock, as far as the contender can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// In the contender's PID namespace; `None` when the holder's is not visible from it.
    pub pid: Option<u32>,
    pub uid: Option<u32>,
    /// `/proc/<pid>/cmdline`, arguments joined by spaces.
    pub command: Option<String>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "pid {pid}")?,
            None => f.write_str("a process whose pid is not visible here (another PID namespace, or it is just ending)")?,
        }
        if let Some(uid) = self.uid {
            write!(f, ", uid {uid}")?;
        }
        if let Some(command) = &self.command {
            write!(f, ", command line {command:?}")?;
        }
        Ok(())
    }
}

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "this network namespace's writer lock is held by {holder}, another kproxy changing its \
         rules, and was still held after {:.1}s; wait for it to finish, stop it (a `kproxy run` \
         holds the lock while it runs), or pass a longer --lock-timeout", waited.as_secs_f64()
    )]
    Held { holder: Holder, waited: Duration },
    #[error("cannot take the network namespace lock (abstract socket @{name}): {source}")]
    Io {
        name: String,
        #[source]
        source: io::Error,
    },
}

impl NetnsLock {
    /// Takes the lock of the calling thread's network namespace, waiting up to `timeout` for
    /// a holder to release it; `waiting` is called once with the holder when the lock is
    /// taken, before the wait (to log it).
    pub fn acquire(
        timeout: Duration,
        waiting: impl FnOnce(&Holder),
    ) -> Result<NetnsLock, LockError> {
        NetnsLock::acquire_named(LOCK_NAME, timeout, waiting)
    }

    /// [`NetnsLock::acquire`] under another abstract name (tests in a shared namespace).
    pub fn acquire_named(
        name: &str,
        timeout: Duration,
        waiting: impl FnOnce(&Holder),
    ) -> Result<NetnsLock, LockError> {
        let started = Instant::now();
        let mut waiting = Some(waiting);
        loop {
            match NetnsLock::try_acquire_named(name) {
                Ok(Ok(lock)) => return Ok(lock),
                Ok(Err(holder)) => {
                    let waited = started.elapsed();
                    if waited >= timeout {
                        // The holder may have changed while we waited: name the current one.
                        let holder = match NetnsLock::try_acquire_named(name) {
                            Ok(Ok(lock)) => return Ok(lock),
                            Ok(Err(now)) => now,
                            Err(_) => holder,
                        };
                        return Err(LockError::Held { holder, waited });
                    }
                    if let Some(waiting) = waiting.take() {
                        waiting(&holder);
                    }
                    std::thread::sleep(RETRY.min(timeout - waited));
                }
                Err(source) => {
                    return Err(LockError::Io {
                        name: name.to_string(),
                        source,
                    })
                }
            }
        }
    }

    /// One attempt: the lock, or who holds it.
    pub fn try_acquire_named(name: &str) -> io::Result<Result<NetnsLock, Holder>> {
        let address = SocketAddr::from_abstract_name(name.as_bytes())?;
        match UnixListener::bind_addr(&address) {
            Ok(socket) => Ok(Ok(NetnsLock { _socket: socket })),
            Err(err) if err.kind() == io::ErrorKind::AddrInUse => Ok(Err(holder_of(&address))),
            Err(err) => Err(err),
        }
    }
}

/// Connects to the holder's socket and reads who it is. The holder may exit meanwhile: then
/// nothing is known.
fn holder_of(address: &SocketAddr) -> Holder {
    let Ok(stream) = UnixStream::connect_addr(address) else {
        return Holder {
            pid: None,
            uid: None,
            command: None,
        };
    };
    let (pid, uid) = match peer_credentials(&stream) {
        Some((pid, uid)) => (u32::try_from(pid).ok().filter(|p| *p != 0), Some(uid)),
        None => (None, None),
    };
    Holder {
        pid,
        uid,
        command: pid.and_then(command_line),
    }
}

/// `SO_PEERCRED` of a connected Unix socket: (pid, uid). (std's `peer_cred` is unstable.)
fn peer_credentials(stream: &UnixStream) -> Option<(i32, u32)> {
    let mut credentials = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the fd is a valid socket for the duration of the call, and the buffer is a
    // `ucred` of the length passed.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut credentials as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some((credentials.pid, credentials.uid))
}

/// `/proc/<pid>/cmdline` with its NUL separators as spaces.
fn command_line(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let words: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    (!words.is_empty()).then(|| words.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unique(purpose: &str) -> String {
        format!("kproxy-test-{purpose}-{}", std::process::id())
    }

    #[test]
    fn a_second_taker_is_refused_with_the_holder_named_after_the_timeout() {
        let name = unique("refused");
        let _held = NetnsLock::acquire_named(&name, Duration::ZERO, |_| {}).expect("free");
        let started = Instant::now();
        let mut told = None;
        let err = NetnsLock::acquire_named(&name, Duration::from_millis(300), |h| {
            told = Some(h.clone())
        })
        .expect_err("held");
        assert!(started.elapsed() >= Duration::from_millis(300));
        let LockError::Held { holder, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(holder.pid, Some(std::process::id()));
        assert_eq!(told.as_ref(), Some(holder));
        let me = command_line(std::process::id()).expect("own cmdline");
        assert!(err.to_string().contains(&me), "{err}");
        assert!(err.to_string().contains("--lock-timeout"), "{err}");
    }

    #[test]
    fn a_released_lock_is_taken_by_the_waiting_one() {
        let name = unique("released");
        let held = NetnsLock::acquire_named(&name, Duration::ZERO, |_| {}).expect("free");
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(held);
        });
        let started = Instant::now();
        let mut waited = false;
        NetnsLock::acquire_named(&name, Duration::from_secs(10), |_| waited = true)
            .expect("taken once released");
        assert!(waited);
        assert!(started.elapsed() < Duration::from_secs(5));
        releaser.join().expect("releaser");
    }
}
