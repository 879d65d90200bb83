//! The words of one line of rule text: blanks separate them, except inside double quotes
//! (comments). Shared by the readers of rendered rules (`iptables::parse`, `nftables::parse`)
//! and the syncer's reading of what `iptables-save` printed.

/// The words of a line kproxy wrote, quotes removed. kproxy never quotes a quote, so an
/// unterminated quote, or one inside an unquoted word, is an error.
pub fn words(text: &str) -> Result<Vec<&str>, String> {
    let mut words = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        if let Some(quoted) = rest.strip_prefix('"') {
            let end = quoted.find('"').ok_or("an unterminated quote")?;
            words.push(&quoted[..end]);
            rest = quoted[end + 1..].trim_start();
        } else {
            let end = rest.find(' ').unwrap_or(rest.len());
            if rest[..end].contains('"') {
                return Err("a quote inside a word".into());
            }
            words.push(&rest[..end]);
            rest = rest[end..].trim_start();
        }
    }
    Ok(words)
}

/// The arguments of a saved rule, as `iptables-save` printed it (anyone's rule, not only
/// kproxy's): never an error, and a quoted argument keeps its quotes.
pub fn arguments(line: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = None;
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => {
                quoted = !quoted;
                start.get_or_insert(i);
            }
            c if c.is_whitespace() && !quoted => {
                if let Some(s) = start.take() {
                    out.push(&line[s..i]);
                }
            }
            _ => {
                start.get_or_insert(i);
            }
        }
    }
    if let Some(s) = start {
        out.push(&line[s..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_arguments_stay_whole() {
        assert_eq!(
            arguments("-A X -m comment --comment \"a -j B\" -j C"),
            vec![
                "-A",
                "X",
                "-m",
                "comment",
                "--comment",
                "\"a -j B\"",
                "-j",
                "C"
            ]
        );
    }

    #[test]
    fn words_drop_quotes_and_refuse_stray_ones() {
        assert_eq!(
            words("-A X -m comment --comment \"a b\" -j C"),
            Ok(vec![
                "-A",
                "X",
                "-m",
                "comment",
                "--comment",
                "a b",
                "-j",
                "C"
            ])
        );
        assert!(words("comment \"open").is_err());
        assert!(words("comment a\"b").is_err());
    }
}
