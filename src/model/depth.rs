//! A bracket scan that bounds the nesting of a JSON text before a parser
//! recurses into it: linear, allocation-free, and blind to brackets inside
//! strings.

/// The byte offset of the first bracket that opens level `max + 1`, if any.
/// Assumes nothing about validity: a malformed text is left to the parser.
pub fn json_depth_exceeds(text: &str, max: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (at, byte) in text.bytes().enumerate() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Some(at);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_brackets_outside_strings_only() {
        assert_eq!(json_depth_exceeds("[[]]", 2), None);
        assert_eq!(json_depth_exceeds("[[[]]]", 2), Some(2));
        assert_eq!(json_depth_exceeds(r#"{"a":"[[[[\"[[["}"#, 1), None);
        assert_eq!(json_depth_exceeds(r#"{"a":{"b":[1]}}"#, 2), Some(10));
        // Closing brackets never go below zero.
        assert_eq!(json_depth_exceeds("]]]][[", 1), Some(5));
    }
}
