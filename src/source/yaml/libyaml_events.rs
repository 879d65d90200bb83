//! libyaml's event stream, read only to measure how deep a document's collections nest, so
//! that a too-deep document is refused before serde_yaml parses it in full. libyaml comes
//! with serde_yaml (as the `unsafe-libyaml` translation); this is its C-style API.

use std::mem::MaybeUninit;

use unsafe_libyaml as unsafe_yaml;

/// The 1-based line of the first collection nested more than `limit` deep, or `None` when
/// there is none — or when the document is malformed, which the real parse then reports.
pub(super) fn first_line_deeper_than(document: &str, limit: usize) -> Option<usize> {
    let mut parser = MaybeUninit::<unsafe_yaml::yaml_parser_t>::uninit();
    let mut event = MaybeUninit::<unsafe_yaml::yaml_event_t>::uninit();
    // SAFETY: the parser is initialised before use and deleted once; it reads `document`,
    // which outlives it; each event is deleted after it has been looked at, and only its
    // type and start mark (plain values) are read.
    unsafe {
        if !unsafe_yaml::yaml_parser_initialize(parser.as_mut_ptr()).ok {
            return None;
        }
        let parser = parser.as_mut_ptr();
        unsafe_yaml::yaml_parser_set_input_string(parser, document.as_ptr(), document.len() as _);
        let mut depth = 0usize;
        let mut found = None;
        while unsafe_yaml::yaml_parser_parse(parser, event.as_mut_ptr()).ok {
            let (kind, line) = {
                let event = &*event.as_ptr();
                (event.type_, event.start_mark.line)
            };
            unsafe_yaml::yaml_event_delete(event.as_mut_ptr());
            match kind {
                unsafe_yaml::YAML_SEQUENCE_START_EVENT | unsafe_yaml::YAML_MAPPING_START_EVENT => {
                    depth += 1;
                    if depth > limit {
                        found = Some(line as usize + 1);
                        break;
                    }
                }
                unsafe_yaml::YAML_SEQUENCE_END_EVENT | unsafe_yaml::YAML_MAPPING_END_EVENT => {
                    depth = depth.saturating_sub(1);
                }
                unsafe_yaml::YAML_STREAM_END_EVENT => break,
                _ => {}
            }
        }
        unsafe_yaml::yaml_parser_delete(parser);
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_line_past_the_limit() {
        let deep = format!("a: 1\nb:\n  {}\n", "[".repeat(10));
        assert_eq!(first_line_deeper_than(&deep, 5), Some(3));
        assert_eq!(first_line_deeper_than(&deep, 11), None);
        let block = "a:\n  b:\n    c:\n      d: 1\n";
        // A block mapping starts where its first key is: `d` opens the fourth level.
        assert_eq!(first_line_deeper_than(block, 3), Some(4));
        assert_eq!(first_line_deeper_than(block, 4), None);
        assert_eq!(
            first_line_deeper_than("a: [", 10),
            None,
            "malformed: left to the parse"
        );
    }
}
