//! Where the items of a block-style `kind: List` document are, found from its lines alone:
//! `items:` at the start of a line, then entries `- …` at the start of a line, each running up
//! to the next line that starts in column 0. Everything inside an item is indented (YAML block
//! structure), so an item's text read alone is a one-entry sequence. What this cannot be sure
//! of, the item parse finds out (an unterminated scalar, an alias to another item), and the
//! document is then read whole.

use std::ops::Range;

/// A List document cut into its items, and the rest (`apiVersion`, `kind`, `metadata` and an
/// empty `items:`), as byte ranges of the document.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Split {
    pub header: Vec<Range<usize>>,
    pub items: Vec<Range<usize>>,
}

/// The items of `text`, or `None` when it has no block sequence under a top-level `items:`.
pub(super) fn split(text: &str) -> Option<Split> {
    let mut offset = 0;
    let mut items_key_end = None;
    let mut items: Vec<Range<usize>> = Vec::new();
    let mut sequence_end = text.len();
    for line in text.split_inclusive('\n') {
        let start = offset;
        offset += line.len();
        let Some(key_end) = items_key_end else {
            if line.trim_end() == "items:" {
                items_key_end = Some(offset);
            }
            continue;
        };
        let continues = line.starts_with([' ', '\t', '#', '\n', '\r']);
        if line.starts_with("- ") || line.trim_end() == "-" {
            if let Some(last) = items.last_mut() {
                last.end = start;
            }
            items.push(start..offset);
        } else if continues {
            if let Some(last) = items.last_mut() {
                last.end = offset;
            }
        } else if items.is_empty() && start == key_end {
            return None; // `items:` followed by something else: not a block sequence
        } else {
            sequence_end = start;
            break;
        }
    }
    let key_end = items_key_end?;
    if items.is_empty() {
        return None;
    }
    Some(Split {
        header: vec![0..key_end, sequence_end..text.len()],
        items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_a_kubectl_list_into_items_and_header() {
        let text = "apiVersion: v1\nitems:\n- kind: Service\n  metadata:\n    name: a\n\n  # c\n- kind: Service\n  spec: {a: 1}\nkind: List\nmetadata: {}\n";
        let split = split(text).expect("a List");
        let pieces: Vec<&str> = split.items.iter().map(|r| &text[r.clone()]).collect();
        assert_eq!(
            pieces,
            [
                "- kind: Service\n  metadata:\n    name: a\n\n  # c\n",
                "- kind: Service\n  spec: {a: 1}\n"
            ]
        );
        let header: String = split.header.iter().map(|r| &text[r.clone()]).collect();
        assert_eq!(header, "apiVersion: v1\nitems:\nkind: List\nmetadata: {}\n");
    }

    #[test]
    fn no_block_sequence_no_split() {
        assert_eq!(split("apiVersion: v1\nkind: List\nitems: []\n"), None);
        assert_eq!(split("items:\nkind: List\n"), None);
        assert_eq!(split("kind: Service\n"), None);
    }
}
