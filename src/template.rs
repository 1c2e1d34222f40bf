//! The `req_uri` template grammar (`/a/{b}/{c+}`), the one parser of it: the management
//! API checks an API's `req_uri` (and its backend's) with it, snapshot validation refuses a
//! snapshot with it, and the router matches buyers' paths and fills backend paths from the
//! [`Segment`]s it yields. A leaf: it depends on nothing in the crate.
//!
//! A template is `/` then segments separated by `/` (one trailing `/` allowed), at most
//! [`MAX_REQ_URI_BYTES`]: a literal of letters, digits and `-_.~*%`, `{name}` for one
//! segment, or `{name+}` for the rest of the path, last only. Names are 1 to 32 letters,
//! digits, `-` and `_`, start with a letter and appear once. (Huawei also allows `.` in
//! names; the data plane does not.) Where the management API and the snapshot validator
//! once had a parser each, this keeps the stricter rule of each: the management API's 512
//! bytes (not 1,024), its literal characters (not "anything but `{}?#`, space and control
//! bytes") and its names (a letter first, 32 at most).

use hashbrown::HashSet;

/// Longest `req_uri` accepted, in bytes (every allowed character is one byte).
pub const MAX_REQ_URI_BYTES: usize = 512;
/// Longest parameter name, in characters.
pub const MAX_PARAM_NAME_CHARS: usize = 32;

/// The grammar, for a person (the management API's refusals state it).
pub const REQ_URI_RULE: &str = "must start with / and be at most 512 characters; each segment \
    is letters, digits and - _ . ~ * %, or a parameter {name} (or {name+} as the last segment) \
    whose name is 1 to 32 letters, digits, - and _ starting with a letter, each name once";

/// One segment of a parsed `req_uri` template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    /// `{name}`: exactly one segment.
    Param(String),
    /// `{name+}`: the rest of the path (last segment only).
    Greedy(String),
}

fn literal_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_.~*%".contains(c)
}

fn valid_param_name(name: &str) -> bool {
    name.len() <= MAX_PARAM_NAME_CHARS
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Parses a `req_uri` template (`/a/{b}/{c+}`); `Err` says what is wrong.
pub fn parse_template(uri: &str) -> Result<Vec<Segment>, &'static str> {
    if uri.len() > MAX_REQ_URI_BYTES {
        return Err("longer than 512 bytes");
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
            if !valid_param_name(name) {
                return Err(
                    "has a parameter name that is not 1 to 32 letters, digits, - and _ \
                     starting with a letter",
                );
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
            if !part.chars().all(literal_char) {
                return Err(
                    "has a literal segment with a character other than letters, \
                     digits and - _ . ~ * %",
                );
            }
            segments.push(Segment::Literal((*part).to_owned()));
        }
    }
    Ok(segments)
}

/// The parameter names of a parsed template, in order.
pub fn param_names(segments: &[Segment]) -> impl Iterator<Item = &str> {
    segments.iter().filter_map(|s| match s {
        Segment::Param(n) | Segment::Greedy(n) => Some(n.as_str()),
        Segment::Literal(_) => None,
    })
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
        assert_eq!(
            parse_template("/a/").unwrap(),
            vec![Segment::Literal("a".into())]
        );
        for bad in [
            "a", "/a//b", "/a//", "/{b+}/c", "/{b", "/{}", "/{a}/{a}", "/a b", "/a@b", "/a/{1x}",
            "/a/{x.y}",
        ] {
            assert!(parse_template(bad).is_err(), "{bad}");
        }
        let name = "n".repeat(MAX_PARAM_NAME_CHARS);
        assert!(parse_template(&format!("/{{{name}}}")).is_ok());
        assert!(parse_template(&format!("/{{{name}x}}")).is_err());
        let longest = format!("/{}", "a".repeat(MAX_REQ_URI_BYTES - 1));
        assert!(parse_template(&longest).is_ok());
        assert!(parse_template(&format!("{longest}a")).is_err());
    }
}
