//! Fast text for addresses and numbers. The renderers write hundreds of thousands of
//! addresses per ruleset, and `Display` for `Ipv4Addr`/`SocketAddr` goes through the general
//! formatting machinery; these write the same text straight into a `String`.

use std::net::{IpAddr, SocketAddr};

/// Appends a decimal number.
pub fn push_u32(out: &mut String, mut n: u32) {
    let mut buf = [0u8; 10];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    out.push_str(std::str::from_utf8(&buf[i..]).unwrap_or_default());
}

/// Appends an IP address exactly as `Display` prints it.
pub fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            push_u32(out, a.into());
            out.push('.');
            push_u32(out, b.into());
            out.push('.');
            push_u32(out, c.into());
            out.push('.');
            push_u32(out, d.into());
        }
        IpAddr::V6(v6) => {
            use std::fmt::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

/// Appends `ip:port`, with brackets around IPv6 (Go's `net.JoinHostPort`).
pub fn push_socket(out: &mut String, addr: SocketAddr) {
    if addr.is_ipv6() {
        out.push('[');
        push_ip(out, addr.ip());
        out.push(']');
    } else {
        push_ip(out, addr.ip());
    }
    out.push(':');
    push_u32(out, addr.port().into());
}

/// `ip:port` as a new string.
pub fn socket_string(addr: SocketAddr) -> String {
    let mut out = String::with_capacity(24);
    push_socket(&mut out, addr);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_text_as_display() {
        for addr in [
            "0.0.0.0:0",
            "10.244.1.100:8080",
            "255.255.255.255:65535",
            "[fd00::1]:80",
            "[::ffff:1.2.3.4]:53",
            "[2001:db8::]:1",
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(socket_string(addr), addr.to_string());
            let mut ip = String::new();
            push_ip(&mut ip, addr.ip());
            assert_eq!(ip, addr.ip().to_string());
        }
        let mut n = String::new();
        push_u32(&mut n, 4294967295);
        assert_eq!(n, "4294967295");
    }
}
