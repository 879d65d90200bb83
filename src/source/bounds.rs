//! How much one input may make kproxy build, whatever it contains. Without aliases a YAML or
//! JSON input cannot describe more nodes than it has bytes, so the bounds are proportional to
//! the input's size: a large cluster dump still reads, a small alias bomb is refused early.

/// `kind: List` inside `kind: List`: kubectl never nests them (its Lists hold objects), so a
/// few levels are generous; an input nesting them deeper is refused as a whole.
pub const MAX_LIST_DEPTH: usize = 8;

/// What building the documents of one input may cost, in nodes plus scalar bytes, per byte of
/// input. Without aliases a node takes at least two bytes (`1,`) and a scalar's bytes are at
/// most one and a half times its source (the escape `\L` is 3 bytes of UTF-8), so an input
/// costs at most about twice its size; aliases may add as much again.
pub const EXPANSION_PER_INPUT_BYTE: usize = 4;

/// The least expansion any input may have, so that a small file may use aliases freely
/// (some 25 MB of YAML values at most).
pub const MIN_EXPANSION: usize = 1 << 18;

/// The expansion budget of an input of `input_bytes` bytes.
pub fn expansion_limit(input_bytes: usize) -> usize {
    input_bytes
        .saturating_mul(EXPANSION_PER_INPUT_BYTE)
        .max(MIN_EXPANSION)
}

/// How deep YAML collections may nest (serde_yaml's own recursion limit: deeper input fails to
/// deserialize anyway). Checked before parsing, because libyaml's time grows with the square of
/// the flow nesting depth (`a: [[[[…` of 1 MB would take an hour).
pub const MAX_YAML_NESTING: usize = 128;

/// Below this many `[` and `{` in one document, its flow nesting cannot cost more than a few
/// milliseconds, and the depth is not checked ahead of parsing.
pub const UNCHECKED_FLOW_OPENERS: usize = 4096;
