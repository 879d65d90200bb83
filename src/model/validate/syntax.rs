//! The API server's string and number formats (api-validation.md §3), and the small pieces
//! every message needs: field paths and values cut to a readable length.

use std::fmt;

use crate::model::Protocol;

/// A check that fails with the reason, naming the field.
pub type Check<T> = Result<T, String>;

/// A list element's field path (`spec.ports[2]`), printed only when a message needs it: most
/// objects are valid, and a large cluster has a great many ports and endpoints.
#[derive(Clone, Copy)]
pub struct Indexed(pub &'static str, pub usize);

impl fmt::Display for Indexed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.0, self.1)
    }
}

/// Keeps messages one line long and readable whatever the input holds.
pub fn shorten(text: &str) -> String {
    const MAX: usize = 64;
    if text.chars().count() <= MAX {
        text.to_string()
    } else {
        let cut: String = text.chars().take(MAX).collect();
        format!("{cut}...")
    }
}

/// `TCP`, `UDP` or `SCTP`; absent means TCP (the API server's default, §2).
pub fn protocol(value: Option<&str>, field: impl fmt::Display) -> Check<Protocol> {
    match value {
        None | Some("") => Ok(Protocol::Tcp),
        Some(text) => Protocol::from_api(text).ok_or_else(|| {
            format!(
                "{field}.protocol {:?} is unknown (want TCP, UDP or SCTP)",
                shorten(text)
            )
        }),
    }
}

/// A port number, 1–65535.
pub fn port_number(value: i32, field: impl fmt::Display) -> Check<u16> {
    match u16::try_from(value) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(format!("{field} {value} is outside 1..65535")),
    }
}

/// A port where 0 or absent means "none".
pub fn optional_port(value: Option<i32>, field: impl fmt::Display) -> Check<Option<u16>> {
    match value {
        None | Some(0) => Ok(None),
        Some(n) => port_number(n, field).map(Some),
    }
}

fn is_label_body(text: &str) -> bool {
    let bytes = text.as_bytes();
    !bytes.is_empty()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// RFC 1123 label: namespaces, port names.
pub fn is_dns1123_label(text: &str) -> bool {
    text.len() <= 63 && is_label_body(text)
}

/// RFC 1035 label: Service names (must start with a letter).
pub fn is_dns1035_label(text: &str) -> bool {
    is_dns1123_label(text) && text.as_bytes()[0].is_ascii_lowercase()
}

/// RFC 1123 subdomain: most object names.
pub fn is_dns1123_subdomain(text: &str) -> bool {
    text.len() <= 253 && text.split('.').all(is_label_body)
}

/// IANA service name: named target ports.
pub fn is_iana_svc_name(text: &str) -> bool {
    text.len() <= 15
        && is_label_body(text)
        && !text.contains("--")
        && text.bytes().any(|b| b.is_ascii_lowercase())
}

/// A label value (§3): empty, or at most 63 bytes, alphanumeric at both ends with `-`, `_`,
/// `.` inside.
pub fn is_label_value(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.is_empty()
        || (bytes.len() <= 63
            && bytes[0].is_ascii_alphanumeric()
            && bytes[bytes.len() - 1].is_ascii_alphanumeric()
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_syntax() {
        assert!(is_dns1123_label("ns-1"));
        assert!(!is_dns1123_label("Ns"));
        assert!(!is_dns1123_label("-a"));
        assert!(!is_dns1123_label(&"a".repeat(64)));
        assert!(is_dns1035_label("svc1"));
        assert!(!is_dns1035_label("1svc"));
        assert!(is_dns1123_subdomain("svc1-abc.x"));
        assert!(!is_dns1123_subdomain("svc1..x"));
        assert!(is_iana_svc_name("http"));
        assert!(!is_iana_svc_name("8080"));
        assert!(!is_iana_svc_name("a--b"));
        assert!(is_label_value(""));
        assert!(is_label_value("zone-A_1.b"));
        assert!(!is_label_value("-a"));
        assert!(!is_label_value(&"a".repeat(64)));
    }
}
