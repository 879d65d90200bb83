//! What reading reports: [`Note`]s about objects and entries left out, [`SourceError`]s for
//! inputs that cannot be used at all, and [`ObjectRef`]s naming objects in both. Every string
//! that came from the input (names, kinds, file names, parser messages quoting the input) is
//! displayed through [`Escaped`], so an input cannot forge a line of kproxy's own output.

use std::fmt::{self, Write as _};

/// Displays a string from the input with control characters and other non-printable
/// characters escaped as Rust's `escape_debug` does; ordinary names print unchanged.
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            match c {
                // Printable; `escape_debug` escapes them only for Rust literals.
                '"' | '\'' | '\\' => f.write_char(c)?,
                c => write!(f, "{}", c.escape_debug())?,
            }
        }
        Ok(())
    }
}

/// Which object a message is about: `Service default/my-service`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}/{}",
            Escaped(&self.kind),
            Escaped(&self.namespace),
            Escaped(&self.name)
        )
    }
}

/// Something in the input that was left out, with the reason. Printed one per line on stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// `count` well-formed manifests of a kind kproxy does not use, in one input: one note per
    /// (origin, kind), however many objects there are.
    IgnoredKind {
        origin: String,
        kind: String,
        count: usize,
    },
    /// An object that was read but is invalid; it is skipped, everything else goes on.
    Invalid { object: ObjectRef, reason: String },
    /// A part of an object (one endpoint, one address, one frontend) was left out; the rest
    /// of the object is used.
    PartlyInvalid { object: ObjectRef, reason: String },
    /// A directory entry that was not read (a subdirectory, a dangling symbolic link, a FIFO...).
    SkippedEntry { path: String, reason: String },
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Note::IgnoredKind {
                origin,
                kind,
                count: 1,
            } => write!(
                f,
                "note: {}: ignoring object of kind {}",
                Escaped(origin),
                Escaped(kind)
            ),
            Note::IgnoredKind {
                origin,
                kind,
                count,
            } => write!(
                f,
                "note: {}: ignoring {count} objects of kind {}",
                Escaped(origin),
                Escaped(kind)
            ),
            Note::Invalid { object, reason } => {
                write!(f, "skipped {object}: {}", Escaped(reason))
            }
            Note::PartlyInvalid { object, reason } => {
                write!(f, "skipped part of {object}: {}", Escaped(reason))
            }
            Note::SkippedEntry { path, reason } => {
                write!(f, "note: {}: not read: {}", Escaped(path), Escaped(reason))
            }
        }
    }
}

/// An input that cannot be used at all. The caller must not act on a partial read.
///
/// The messages do not repeat their `#[source]`: print the chain (anyhow's `{:#}`, or
/// [`SourceError::with_causes`]) to see the cause.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {}", Escaped(path))]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: malformed YAML/JSON{}: {}", Escaped(origin), line_suffix(*line), Escaped(message))]
    Parse {
        origin: String,
        line: Option<usize>,
        message: String,
    },
    #[error(
        "{}: not UTF-8: invalid byte 0x{byte:02x} at byte offset {offset} (line {line}); \
         save the file as UTF-8",
        Escaped(origin)
    )]
    NotUtf8 {
        origin: String,
        byte: u8,
        offset: usize,
        line: usize,
    },
    /// YAML aliases (`*name`) would expand a small input into a huge one.
    #[error(
        "{}: refused: expanding its YAML aliases (`*name`) gives more than {limit} nodes and \
         scalar bytes from {input_bytes} input bytes (the limit is {} per input byte, at least \
         {}); write the objects out without aliases",
        Escaped(origin),
        crate::source::bounds::EXPANSION_PER_INPUT_BYTE,
        crate::source::bounds::MIN_EXPANSION
    )]
    ExpansionLimit {
        origin: String,
        input_bytes: usize,
        limit: usize,
    },
    /// `kind: List` inside `kind: List` deeper than kproxy accepts.
    #[error(
        "{}: refused: `kind: List` nested more than {limit} levels deep{}; kubectl never \
         nests Lists, flatten the input",
        Escaped(origin),
        line_suffix(*line)
    )]
    ListTooDeep {
        origin: String,
        limit: usize,
        line: Option<usize>,
    },
}

impl SourceError {
    /// The message followed by each cause once: `cannot read x: No such file or directory`.
    pub fn with_causes(&self) -> String {
        let mut text = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(err) = cause {
            text.push_str(": ");
            text.push_str(&err.to_string());
            cause = err.source();
        }
        text
    }
}

fn line_suffix(line: Option<usize>) -> String {
    line.map(|l| format!(" at line {l}")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_control_characters_are_escaped_ordinary_ones_unchanged() {
        let forged = ObjectRef {
            kind: "Service".into(),
            namespace: "ns".into(),
            name: "x\nkproxy: synced ipv4: full sync\u{1b}[2K\0".into(),
        };
        assert_eq!(
            forged.to_string(),
            "Service ns/x\\nkproxy: synced ipv4: full sync\\u{1b}[2K\\0"
        );
        let ordinary = ObjectRef {
            kind: "Service".into(),
            namespace: "kube-system".into(),
            name: "my-svc.v2".into(),
        };
        assert_eq!(ordinary.to_string(), "Service kube-system/my-svc.v2");
        let note = Note::IgnoredKind {
            origin: "dir/it's \"here\"\r.yaml".into(),
            kind: "v1/Config\u{202e}Map".into(),
            count: 1,
        };
        assert_eq!(
            note.to_string(),
            "note: dir/it's \"here\"\\r.yaml: ignoring object of kind v1/Config\\u{202e}Map"
        );
        let invalid = Note::Invalid {
            object: forged,
            reason: "bad\tvalue\n".into(),
        };
        assert!(!invalid.to_string().contains('\n'), "{invalid}");
        assert!(
            invalid.to_string().ends_with(": bad\\tvalue\\n"),
            "{invalid}"
        );
    }

    #[test]
    fn ignored_kind_counts_more_than_one() {
        let note = Note::IgnoredKind {
            origin: "big.yaml".into(),
            kind: "v1/ConfigMap".into(),
            count: 1_000_000,
        };
        assert_eq!(
            note.to_string(),
            "note: big.yaml: ignoring 1000000 objects of kind v1/ConfigMap"
        );
    }

    #[test]
    fn a_read_error_names_its_cause_once() {
        let err = SourceError::Read {
            path: "/nonexistent".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(err.to_string(), "cannot read /nonexistent");
        let full = format!("{:#}", anyhow::Error::new(err));
        assert_eq!(full.matches("not found").count(), 1, "{full}");
    }
}
