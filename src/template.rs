//! The `req_uri` template grammar (`/a/{b}/{c+}`), shared by snapshot validation, the
//! router that matches buyers' paths and the backend path it fills: one parser, one
//! [`Segment`] type. A leaf: it depends on nothing in the crate.
//!
//! A template is `/` then segments separated by `/` (one trailing `/` allowed): a literal
//! (no `{`, `}`, `?`, `#`, space or control byte), `{name}` for one segment, or `{name+}` for
//! the rest of the path, last only. Names are `[A-Za-z0-9_-]+` and appear once.

use hashbrown::HashSet;

/// Longest `req_uri` accepted, in bytes.
pub const MAX_REQ_URI_BYTES: usize = 1024;
/// One segment of a parsed `req_uri` template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    /// `{name}`: exactly one segment.
    Param(String),
    /// `{name+}`: the rest of the path (last segment only).
    Greedy(String),
}

/// Parses a `req_uri` template (`/a/{b}/{c+}`); `Err` says what is wrong.
pub fn parse_template(uri: &str) -> Result<Vec<Segment>, &'static str> {
    if uri.len() > MAX_REQ_URI_BYTES {
        return Err("longer than 1024 bytes");
    }
    let Some(rest) = uri.strip_prefix('/') else {
        return Err("must start with '/'");
    };
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let mut segments = Vec::new();
    let mut names = HashSet::new();
    let parts: Vec<&str> = rest.split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() {
            return Err("has an empty segment ('//')");
        }
        if let Some(inner) = part.strip_prefix('{') {
            let inner = inner.strip_suffix('}').ok_or("has an unclosed '{'")?;
            let (name, greedy) = match inner.strip_suffix('+') {
                Some(name) => (name, true),
                None => (inner, false),
            };
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err("has a parameter name that is not [A-Za-z0-9_-]+");
            }
            if !names.insert(name) {
                return Err("names a parameter twice");
            }
            if greedy {
                if i + 1 != parts.len() {
                    return Err("has a {name+} parameter that is not the last segment");
                }
                segments.push(Segment::Greedy(name.to_owned()));
            } else {
                segments.push(Segment::Param(name.to_owned()));
            }
        } else {
            if part.contains(['{', '}', '?', '#']) || part.bytes().any(|b| b <= b' ') {
                return Err("has a literal segment with '{', '}', '?', '#' or a space");
            }
            segments.push(Segment::Literal((*part).to_owned()));
        }
    }
    Ok(segments)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_parse_and_refuse() {
        assert_eq!(parse_template("/").unwrap(), vec![]);
        assert_eq!(
            parse_template("/a/{b}/{c+}").unwrap(),
            vec![
                Segment::Literal("a".into()),
                Segment::Param("b".into()),
                Segment::Greedy("c".into())
            ]
        );
        for bad in ["a", "/a//b", "/{b+}/c", "/{b", "/{}", "/{a}/{a}", "/a b"] {
            assert!(parse_template(bad).is_err(), "{bad}");
        }
    }
}
