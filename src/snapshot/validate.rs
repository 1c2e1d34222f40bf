//! Validation of a wire snapshot: the whole snapshot is accepted or rejected, never a part.
//!
//! Owns the rules a snapshot must satisfy before the data plane compiles it (CONTRACT §5):
//! unique ids and domains, no dangling references, well-formed `req_uri` templates, sane
//! backends, times and quotas. The first problem found is reported with the JSON field path
//! (`groups[3].apis[0].req_uri`) so that the control plane's operator can fix it. This module
//! does not compile, swap or persist anything, and it never looks at quota state.

use hashbrown::{HashMap, HashSet};

use super::wire::{Backend, Snapshot};

/// Longest `req_uri` accepted, in bytes.
pub const MAX_REQ_URI_BYTES: usize = 1024;
/// Most app codes per app (Huawei allows five).
pub const MAX_APP_CODES: usize = 5;
/// Longest app key, app secret or app code accepted, in bytes (Huawei's are 32, 64 and
/// 64–180 characters; the compiled app keeps them in one string indexed by `u16`).
pub const MAX_CREDENTIAL_BYTES: usize = 1024;

/// Why a snapshot was refused: the first bad field, by its JSON path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct ValidationError {
    pub path: String,
    pub reason: String,
}

fn bad(path: impl Into<String>, reason: impl Into<String>) -> ValidationError {
    ValidationError {
        path: path.into(),
        reason: reason.into(),
    }
}

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

const METHODS: &[&str] = &[
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "ANY",
];

fn valid_domain(domain: &str) -> bool {
    !domain.is_empty()
        && domain.len() <= 253
        && domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
}

/// Checks every rule; the first violation is returned with its field path.
pub fn validate<'a>(snapshot: &'a Snapshot) -> Result<(), ValidationError> {
    if snapshot.version == 0 {
        return Err(bad("version", "must be at least 1"));
    }
    let mut group_ids = HashSet::new();
    let mut domains: HashMap<&'a str, String> = HashMap::new();
    let mut api_ids = HashSet::new();
    for (gi, group) in snapshot.groups.iter().enumerate() {
        let gp = format!("groups[{gi}]");
        if group.id.is_empty() {
            return Err(bad(format!("{gp}.id"), "must not be empty"));
        }
        if !group_ids.insert(group.id.as_str()) {
            return Err(bad(
                format!("{gp}.id"),
                format!("duplicate group id '{}'", group.id),
            ));
        }
        let mut claim = |domain: &'a str, field: &str| -> Result<(), ValidationError> {
            let path = format!("{gp}.{field}");
            if !valid_domain(domain) {
                return Err(bad(path, "not a lower-case host name"));
            }
            if let Some(other) = domains.insert(domain, path.clone()) {
                return Err(bad(path, format!("domain '{domain}' is also {other}")));
            }
            Ok(())
        };
        claim(&group.sl_domain, "sl_domain")?;
        if let Some(url_domain) = &group.url_domain {
            claim(url_domain, "url_domain")?;
        }
        let mut routes = HashSet::new();
        for (ai, api) in group.apis.iter().enumerate() {
            let ap = format!("{gp}.apis[{ai}]");
            if api.id.is_empty() {
                return Err(bad(format!("{ap}.id"), "must not be empty"));
            }
            if !api_ids.insert(api.id.as_str()) {
                return Err(bad(
                    format!("{ap}.id"),
                    format!("duplicate api id '{}'", api.id),
                ));
            }
            if api.api_type != 1 && api.api_type != 2 {
                return Err(bad(
                    format!("{ap}.type"),
                    "must be 1 (public) or 2 (private)",
                ));
            }
            if !matches!(api.req_protocol.as_str(), "HTTP" | "HTTPS" | "BOTH") {
                return Err(bad(
                    format!("{ap}.req_protocol"),
                    "must be HTTP, HTTPS or BOTH",
                ));
            }
            if !METHODS.contains(&api.req_method.as_str()) {
                return Err(bad(format!("{ap}.req_method"), "not a known method or ANY"));
            }
            if !matches!(api.match_mode.as_str(), "NORMAL" | "SWA") {
                return Err(bad(format!("{ap}.match_mode"), "must be NORMAL or SWA"));
            }
            if !matches!(
                api.auth_type.as_str(),
                "APP" | "IAM" | "NONE" | "AUTHORIZER"
            ) {
                return Err(bad(
                    format!("{ap}.auth_type"),
                    "must be APP, IAM, NONE or AUTHORIZER",
                ));
            }
            let template = parse_template(&api.req_uri)
                .map_err(|reason| bad(format!("{ap}.req_uri"), reason))?;
            if !routes.insert((
                api.req_method.as_str(),
                &api.req_uri,
                api.match_mode.as_str(),
            )) {
                return Err(bad(
                    format!("{ap}.req_uri"),
                    "same method, req_uri and match_mode as another API of the group",
                ));
            }
            match &api.backend {
                Backend::Http {
                    req_protocol,
                    req_method,
                    req_uri,
                    url_domain,
                    timeout_ms,
                } => {
                    let bp = format!("{ap}.backend");
                    if req_protocol != "HTTP" {
                        return Err(bad(
                            format!("{bp}.req_protocol"),
                            "only HTTP backends are supported",
                        ));
                    }
                    if !METHODS.contains(&req_method.as_str()) {
                        return Err(bad(format!("{bp}.req_method"), "not a known method or ANY"));
                    }
                    let backend_template = parse_template(req_uri)
                        .map_err(|reason| bad(format!("{bp}.req_uri"), reason))?;
                    for segment in &backend_template {
                        if let Segment::Param(name) | Segment::Greedy(name) = segment {
                            let known = template.iter().any(|s| {
                                matches!(s, Segment::Param(n) | Segment::Greedy(n) if n == name)
                            });
                            if !known {
                                return Err(bad(
                                    format!("{bp}.req_uri"),
                                    format!("parameter '{name}' is not in the API's req_uri"),
                                ));
                            }
                        }
                    }
                    if url_domain.parse::<http::uri::Authority>().is_err()
                        || url_domain.contains(['/', '@'])
                    {
                        return Err(bad(format!("{bp}.url_domain"), "not host:port"));
                    }
                    if *timeout_ms == 0 || *timeout_ms > 3_600_000 {
                        return Err(bad(
                            format!("{bp}.timeout_ms"),
                            "must be 1..=3600000 milliseconds",
                        ));
                    }
                }
                Backend::Mock { status, .. } => {
                    if !(100..=599).contains(status) {
                        return Err(bad(format!("{ap}.backend.status"), "not an HTTP status"));
                    }
                }
            }
        }
    }

    // Field paths of the per-buyer lists are built only for the error returned: formatting
    // one for each of a million entries was a third of a 1M-purchase validation.
    let mut app_ids = HashSet::with_capacity(snapshot.apps.len());
    let mut app_keys = HashSet::with_capacity(snapshot.apps.len());
    let mut app_codes = HashSet::with_capacity(snapshot.apps.len());
    for (i, app) in snapshot.apps.iter().enumerate() {
        let at = |field: &str| format!("apps[{i}].{field}");
        if app.id.is_empty() {
            return Err(bad(at("id"), "must not be empty"));
        }
        if !app_ids.insert(app.id.as_str()) {
            return Err(bad(at("id"), format!("duplicate app id '{}'", app.id)));
        }
        if app.app_key.is_empty() || !app_keys.insert(app.app_key.as_str()) {
            return Err(bad(at("app_key"), "empty or duplicate app_key"));
        }
        if app.app_key.len() > MAX_CREDENTIAL_BYTES {
            return Err(bad(at("app_key"), "longer than 1024 bytes"));
        }
        if app.app_secret.is_empty() {
            return Err(bad(at("app_secret"), "must not be empty"));
        }
        if app.app_secret.len() > MAX_CREDENTIAL_BYTES {
            return Err(bad(at("app_secret"), "longer than 1024 bytes"));
        }
        if app.app_codes.len() > MAX_APP_CODES {
            return Err(bad(at("app_codes"), "at most 5 app codes"));
        }
        for (ci, code) in app.app_codes.iter().enumerate() {
            if code.is_empty() || !app_codes.insert(code.as_str()) {
                return Err(bad(
                    at(&format!("app_codes[{ci}]")),
                    "empty or duplicate app code",
                ));
            }
            if code.len() > MAX_CREDENTIAL_BYTES {
                return Err(bad(
                    at(&format!("app_codes[{ci}]")),
                    "longer than 1024 bytes",
                ));
            }
        }
        if !matches!(app.creator.as_str(), "USER" | "MARKET") {
            return Err(bad(at("creator"), "must be USER or MARKET"));
        }
    }

    let mut purchase_ids = HashSet::with_capacity(snapshot.purchases.len());
    let mut purchase_apps = HashSet::with_capacity(snapshot.purchases.len());
    for (i, purchase) in snapshot.purchases.iter().enumerate() {
        let at = |field: &str| format!("purchases[{i}].{field}");
        if purchase.id.is_empty() || !purchase_ids.insert(purchase.id.as_str()) {
            return Err(bad(at("id"), "empty or duplicate purchase id"));
        }
        if !group_ids.contains(purchase.group_id.as_str()) {
            return Err(bad(
                at("group_id"),
                format!("no group '{}' in the snapshot", purchase.group_id),
            ));
        }
        if !app_ids.contains(purchase.app_id.as_str()) {
            return Err(bad(
                at("app_id"),
                format!("no app '{}' in the snapshot", purchase.app_id),
            ));
        }
        if !purchase_apps.insert(purchase.app_id.as_str()) {
            return Err(bad(at("app_id"), "app already used by another purchase"));
        }
        if purchase.expire_time < purchase.start_time {
            return Err(bad(at("expire_time"), "before start_time"));
        }
        if let Some(limit) = purchase.quota_limit {
            if limit > i64::MAX as u64 {
                return Err(bad(at("quota_limit"), "out of range"));
            }
        }
    }

    for (i, auth) in snapshot.app_auths.iter().enumerate() {
        let at = |field: &str| format!("app_auths[{i}].{field}");
        if !app_ids.contains(auth.app_id.as_str()) {
            return Err(bad(at("app_id"), "no such app in the snapshot"));
        }
        if !api_ids.contains(auth.api_id.as_str()) {
            return Err(bad(at("api_id"), "no such api in the snapshot"));
        }
    }

    let mut cert_domains = HashSet::new();
    for (i, cert) in snapshot.certificates.iter().enumerate() {
        let at = |field: &str| format!("certificates[{i}].{field}");
        if cert.domains.is_empty() {
            return Err(bad(at("domains"), "must name at least one domain"));
        }
        for (di, domain) in cert.domains.iter().enumerate() {
            if !valid_domain(domain) || !cert_domains.insert(domain.as_str()) {
                return Err(bad(
                    at(&format!("domains[{di}]")),
                    "bad or duplicate domain",
                ));
            }
        }
        if super::compile::certified_key(cert).is_err() {
            return Err(bad(at("cert_pem"), "certificate or key does not parse"));
        }
    }
    Ok(())
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

    #[test]
    fn credentials_longer_than_the_compiled_form_holds_are_refused_by_path() {
        let app = |key: String, secret: String, codes: Vec<String>| super::super::wire::App {
            id: "a1".into(),
            app_key: key,
            app_secret: secret,
            app_codes: codes,
            creator: "USER".into(),
        };
        let long = "x".repeat(MAX_CREDENTIAL_BYTES + 1);
        let fits = "x".repeat(MAX_CREDENTIAL_BYTES);
        let cases = [
            (app(long.clone(), "s".into(), vec![]), "apps[0].app_key"),
            (app("k".into(), long.clone(), vec![]), "apps[0].app_secret"),
            (
                app("k".into(), "s".into(), vec!["c".into(), long.clone()]),
                "apps[0].app_codes[1]",
            ),
        ];
        for (app, path) in cases {
            let snapshot = Snapshot {
                version: 1,
                apps: vec![app],
                ..Snapshot::default()
            };
            let error = validate(&snapshot).unwrap_err();
            assert_eq!(
                (error.path.as_str(), error.reason.as_str()),
                (path, "longer than 1024 bytes")
            );
        }
        let codes = vec![fits.clone(); 5]
            .into_iter()
            .enumerate()
            .map(|(i, code)| format!("{i}{}", &code[1..]))
            .collect();
        let snapshot = Snapshot {
            version: 1,
            apps: vec![app(fits.clone(), fits, codes)],
            ..Snapshot::default()
        };
        validate(&snapshot).unwrap();
    }
}
