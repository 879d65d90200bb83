//! The drift check over netlink: counts the rules of one chain with an `NFT_MSG_GETRULE` dump
//! that the kernel filters by table and chain. `nft list chain` cannot do this cheaply: nft
//! 1.0.6 fetches every set of the table first, which takes seconds with thousands of Services
//! (6 s at 5,000), while the whole incremental transaction takes about 0.1 s.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::family::IpFamily;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDRLEN: usize = 16;

/// The number of rules in `table`'s `chain` of `family`, 0 when the table or chain does not
/// exist, in the named network namespace (`/run/netns/NAME`) or in this process's.
pub fn count_rules(
    netns: Option<&str>,
    family: IpFamily,
    table: &str,
    chain: &str,
) -> io::Result<usize> {
    let request = request(family, table, chain);
    match netns {
        None => dump_count(&request),
        Some(name) => {
            let path = format!("/run/netns/{name}");
            // A namespace is entered per thread; a short-lived thread leaves this one alone.
            std::thread::scope(|scope| {
                scope
                    .spawn(|| {
                        let ns = File::open(&path)?;
                        // SAFETY: setns on a valid descriptor affects only the calling thread.
                        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                            return Err(io::Error::last_os_error());
                        }
                        dump_count(&request)
                    })
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("netlink thread panicked")))
            })
        }
    }
}

/// `GETRULE` dump request for one chain.
fn request(family: IpFamily, table: &str, chain: &str) -> Vec<u8> {
    let mut msg = Vec::with_capacity(64);
    msg.extend_from_slice(&0u32.to_ne_bytes()); // length, set below
    msg.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE).to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel assigns it
                                                // nfgenmsg: family, version 0, resource id 0 (big endian).
    msg.push(match family {
        IpFamily::V4 => libc::NFPROTO_IPV4 as u8,
        IpFamily::V6 => libc::NFPROTO_IPV6 as u8,
    });
    msg.extend_from_slice(&[0, 0, 0]);
    for (kind, value) in [(NFTA_RULE_TABLE, table), (NFTA_RULE_CHAIN, chain)] {
        let len = 4 + value.len() + 1;
        msg.extend_from_slice(&(len as u16).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(value.as_bytes());
        msg.push(0);
        while msg.len() % 4 != 0 {
            msg.push(0);
        }
    }
    let len = msg.len() as u32;
    msg[..4].copy_from_slice(&len.to_ne_bytes());
    msg
}

fn dump_count(request: &[u8]) -> io::Result<usize> {
    // SAFETY: plain socket(2); the descriptor is owned by `socket` from here on.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_nl is plain data; zeroed means "the kernel".
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: the buffer and address are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut rules = 0;
    loop {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        let mut data = &buf[..n as usize];
        while data.len() >= NLMSG_HDRLEN {
            let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
            let kind = u16::from_ne_bytes([data[4], data[5]]);
            if len < NLMSG_HDRLEN || len > data.len() {
                return Err(io::Error::other("malformed netlink message"));
            }
            match kind {
                NLMSG_DONE => return Ok(rules),
                NLMSG_ERROR => {
                    let code = data
                        .get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4)
                        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                        .unwrap_or(0);
                    if code == 0 {
                        return Ok(rules);
                    }
                    if code == -libc::ENOENT {
                        return Ok(0);
                    }
                    return Err(io::Error::from_raw_os_error(-code));
                }
                k if k == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE => rules += 1,
                _ => {}
            }
            let advance = (len + 3) & !3;
            data = &data[advance.min(data.len())..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_is_a_filtered_getrule_dump() {
        let msg = request(IpFamily::V4, "kube-proxy", "services");
        assert_eq!(msg.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes([msg[0], msg[1], msg[2], msg[3]]) as usize,
            msg.len()
        );
        assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), (10 << 8) | 7);
        assert_eq!(msg[16], 2, "NFPROTO_IPV4");
        let text = String::from_utf8_lossy(&msg);
        assert!(text.contains("kube-proxy\0") && text.contains("services\0"));
    }
}
