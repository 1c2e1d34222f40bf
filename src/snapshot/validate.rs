//! Validation of a wire snapshot: the whole snapshot is accepted or rejected, never a part.
//!
//! Owns the rules a snapshot must satisfy before the data plane compiles it (CONTRACT §5):
//! unique ids and domains, no dangling references, well-formed `req_uri` templates, sane
//! backends, times and quotas. The first problem found is reported with the JSON field path
//! (`groups[3].apis[0].req_uri`) so that the control plane's operator can fix it.
//!
//! What it parses it keeps: a valid snapshot comes back as [`Validated`], which holds every
//! field in the typed form compile consumes (routes, methods, backends, certificates, the
//! index of every referenced entity), so compile parses nothing again and has nothing left to
//! fail on (ripgrep's low-level → high-level arguments). This module does not compile, swap
//! or persist anything, and it never looks at quota state.

use std::sync::Arc;

use hashbrown::{HashMap, HashSet};
use rustls::sign::CertifiedKey;

use super::wire::{AppAuth, Backend, Certificate, Domain, Group, Snapshot, Throttling};
use crate::template::{parse_template, Segment};

pub use crate::template::MAX_REQ_URI_BYTES;
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

/// Most apps (and so purchases, one app each) in a snapshot: the compiled form indexes
/// them with `u32`.
pub const MAX_APPS: usize = u32::MAX as usize;

/// How an API authenticates its callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKind {
    App,
    None,
    /// IAM or AUTHORIZER: not served by this gateway.
    Unsupported,
}

/// A piece of a backend path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPiece {
    Literal(Box<str>),
    /// Index into the route's captured parameters.
    Param(usize),
}

/// Where an admitted call goes, parsed.
#[derive(Debug, Clone)]
pub enum CompiledBackend {
    Http {
        /// `host:port`.
        authority: http::uri::Authority,
        /// `None` passes the buyer's method through (`ANY`).
        method: Option<http::Method>,
        path: Vec<PathPiece>,
        /// The template ended with `/` (kept when filling it).
        trailing_slash: bool,
        timeout: std::time::Duration,
    },
    Mock {
        status: http::StatusCode,
        body: bytes::Bytes,
    },
}

/// One API's fields as validation parsed them.
#[derive(Debug, Clone)]
pub struct ParsedApi {
    /// The front-end `req_uri`.
    pub route: Vec<Segment>,
    /// `None` is `ANY`.
    pub method: Option<http::Method>,
    /// `SWA` (segment prefix) rather than `NORMAL` (exact).
    pub prefix_match: bool,
    pub auth: AuthKind,
    pub https_only: bool,
    pub http_only: bool,
    pub backend: CompiledBackend,
}

/// A certificate parsed into what rustls serves, with its notAfter (unix seconds) when the
/// DER says.
#[derive(Debug, Clone)]
pub struct ParsedCertificate {
    pub key: Arc<CertifiedKey>,
    pub not_after: Option<i64>,
}

/// A snapshot that passed every rule, with what validation parsed out of it: what compile
/// consumes. Built only by [`validate`].
#[derive(Debug)]
pub struct Validated<'a> {
    pub snapshot: &'a Snapshot,
    /// `apis[g][a]`: API `a` of group `g`, parsed.
    pub apis: Vec<Vec<ParsedApi>>,
    /// `certificates[i]`: the snapshot's certificate `i`, parsed.
    pub certificates: Vec<ParsedCertificate>,
    /// Each purchase's (app index, group index), in the snapshot's order.
    pub purchase_refs: Vec<(u32, u32)>,
    /// Each app authorization's (group, API, app) indices.
    pub auth_refs: Vec<(usize, usize, u32)>,
    /// `domain_groups[i]`: the group index of bound domain `i`.
    pub domain_groups: Vec<usize>,
    /// The throttling policies' references, resolved.
    pub throttling: ThrottleRefs<'a>,
}

/// What the throttling section refers to, by index (compile resolves counters from it).
#[derive(Debug, Default)]
pub struct ThrottleRefs<'a> {
    /// `policies[p]`: the (group, API) of each API policy `p` is bound to.
    pub policies: Vec<Vec<(usize, usize)>>,
    /// `specials[p]`: policy `p`'s exceptions: an app's (by index) or a tenant's own limit.
    pub specials: Vec<Vec<SpecialRef<'a>>>,
    /// The tenant each app calls as, by app index.
    pub app_users: Vec<(u32, &'a str)>,
}

/// One exception to a policy, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecialRef<'a> {
    App { app: u32, limit: u64 },
    User { user: &'a str, limit: u64 },
}

/// The largest throttling limit or interval (Huawei's: 2,147,483,647); counters hold it in
/// 32 bits.
pub const MAX_THROTTLE_VALUE: u64 = i32::MAX as u64;

const METHODS: &[&str] = &[
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "ANY",
];

/// A method name or `ANY` (`Some(None)`); `None` if it is neither.
fn method(name: &str) -> Option<Option<http::Method>> {
    if !METHODS.contains(&name) {
        return None;
    }
    if name == "ANY" {
        return Some(None);
    }
    name.parse().ok().map(Some)
}

fn valid_domain(domain: &str) -> bool {
    !domain.is_empty()
        && domain.len() <= 253
        && domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
}

/// The names groups and bound domains claim, each unique: group ids and host names (a
/// group's `sl_domain` and `url_domain`, a bound domain). One claim per name in the market;
/// a delta claims every group's names again (a few thousand strings) to check its changes.
#[derive(Debug, Default)]
pub(super) struct Names<'a> {
    /// Group id → its index.
    pub group_ids: HashMap<&'a str, usize>,
    /// Host name → the field path that claimed it.
    domains: HashMap<&'a str, String>,
}

impl<'a> Names<'a> {
    /// Claims group `gi`'s id and domains: a non-empty unique id, lower-case host names
    /// that no other group or bound domain has.
    pub fn claim_group(&mut self, gi: usize, group: &'a Group) -> Result<(), ValidationError> {
        let gp = format!("groups[{gi}]");
        if group.id.is_empty() {
            return Err(bad(format!("{gp}.id"), "must not be empty"));
        }
        if self.group_ids.insert(group.id.as_str(), gi).is_some() {
            return Err(bad(
                format!("{gp}.id"),
                format!("duplicate group id '{}'", group.id),
            ));
        }
        self.claim_domain(&group.sl_domain, format!("{gp}.sl_domain"))?;
        if let Some(url_domain) = &group.url_domain {
            self.claim_domain(url_domain, format!("{gp}.url_domain"))?;
        }
        Ok(())
    }

    fn claim_domain(&mut self, domain: &'a str, path: String) -> Result<(), ValidationError> {
        if !valid_domain(domain) {
            return Err(bad(path, "not a lower-case host name"));
        }
        if let Some(other) = self.domains.insert(domain, path.clone()) {
            return Err(bad(path, format!("domain '{domain}' is also {other}")));
        }
        Ok(())
    }

    /// Bound domains: one more name of their group's market domain, each unique among every
    /// group's names; the group index of each (claim the groups first).
    pub fn claim_bound_domains(
        &mut self,
        bound_domains: &'a [Domain],
    ) -> Result<Vec<usize>, ValidationError> {
        let mut domain_groups = Vec::with_capacity(bound_domains.len());
        for (i, bound) in bound_domains.iter().enumerate() {
            let path = format!("domains[{i}].domain");
            if !valid_domain(&bound.domain) {
                return Err(bad(path, "not a lower-case host name"));
            }
            if let Some(other) = self.domains.insert(bound.domain.as_str(), path.clone()) {
                return Err(bad(
                    path,
                    format!("domain '{}' is also {other}", bound.domain),
                ));
            }
            let Some(&group) = self.group_ids.get(bound.group_id.as_str()) else {
                return Err(bad(
                    format!("domains[{i}].group_id"),
                    format!("no group '{}' in the snapshot", bound.group_id),
                ));
            };
            domain_groups.push(group);
        }
        Ok(domain_groups)
    }
}

/// Checks every rule; the first violation is returned with its field path, else the
/// snapshot with what was parsed out of it.
pub fn validate<'a>(snapshot: &'a Snapshot) -> Result<Validated<'a>, ValidationError> {
    if snapshot.version == 0 {
        return Err(bad("version", "must be at least 1"));
    }
    let mut names = Names::default();
    let mut api_ids = HashMap::new();
    let mut parsed_apis = Vec::with_capacity(snapshot.groups.len());
    for (gi, group) in snapshot.groups.iter().enumerate() {
        names.claim_group(gi, group)?;
        parsed_apis.push(validate_apis(gi, group, &mut api_ids)?);
    }
    let domain_groups = names.claim_bound_domains(&snapshot.domains)?;
    let group_ids = names.group_ids;

    // Field paths of the per-buyer lists are built only for the error returned: formatting
    // one for each of a million entries was a third of a 1M-purchase validation.
    if snapshot.apps.len() > MAX_APPS {
        return Err(bad("apps", "more than 2^32 - 1 apps"));
    }
    let mut app_ids = HashMap::with_capacity(snapshot.apps.len());
    let mut app_keys = HashSet::with_capacity(snapshot.apps.len());
    let mut app_codes = HashSet::with_capacity(snapshot.apps.len());
    for (i, app) in snapshot.apps.iter().enumerate() {
        let at = |field: &str| format!("apps[{i}].{field}");
        if app.id.is_empty() {
            return Err(bad(at("id"), "must not be empty"));
        }
        if app_ids.insert(app.id.as_str(), i as u32).is_some() {
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
    let mut purchase_refs = Vec::with_capacity(snapshot.purchases.len());
    for (i, purchase) in snapshot.purchases.iter().enumerate() {
        let at = |field: &str| format!("purchases[{i}].{field}");
        if purchase.id.is_empty() || !purchase_ids.insert(purchase.id.as_str()) {
            return Err(bad(at("id"), "empty or duplicate purchase id"));
        }
        let Some(&group) = group_ids.get(purchase.group_id.as_str()) else {
            return Err(bad(
                at("group_id"),
                format!("no group '{}' in the snapshot", purchase.group_id),
            ));
        };
        let Some(&app) = app_ids.get(purchase.app_id.as_str()) else {
            return Err(bad(
                at("app_id"),
                format!("no app '{}' in the snapshot", purchase.app_id),
            ));
        };
        if !purchase_apps.insert(app) {
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
        // Fewer groups than apps can be told apart by u32 only if there are fewer than 2^32;
        // more groups than that do not fit in memory.
        purchase_refs.push((app, u32::try_from(group).unwrap_or(u32::MAX)));
    }

    let auth_refs = resolve_app_auths(
        &snapshot.app_auths,
        |id| app_ids.get(id).copied(),
        |id| api_ids.get(id).copied(),
    )?;

    let throttling = validate_throttling(
        &snapshot.throttling,
        |id| app_ids.get(id).copied(),
        |id| api_ids.get(id).copied(),
    )?;

    let certificates = validate_certificates(&snapshot.certificates)?;
    Ok(Validated {
        snapshot,
        apis: parsed_apis,
        certificates,
        purchase_refs,
        auth_refs,
        domain_groups,
        throttling,
    })
}

/// Group `gi`'s APIs, each checked and parsed: ids non-empty and unique in the market
/// (`api_ids` holds those of the groups checked before, this group's are added), known
/// types, protocols, methods and modes, well-formed templates, a route per method once,
/// sane backends. The rules of one group; what refers to its APIs is checked by the caller.
pub(super) fn validate_apis<'a>(
    gi: usize,
    group: &'a Group,
    api_ids: &mut HashMap<&'a str, (usize, usize)>,
) -> Result<Vec<ParsedApi>, ValidationError> {
    let gp = format!("groups[{gi}]");
    let mut routes = HashSet::new();
    let mut parsed_group = Vec::with_capacity(group.apis.len());
    for (ai, api) in group.apis.iter().enumerate() {
        let ap = format!("{gp}.apis[{ai}]");
        if api.id.is_empty() {
            return Err(bad(format!("{ap}.id"), "must not be empty"));
        }
        if api_ids.insert(api.id.as_str(), (gi, ai)).is_some() {
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
        let Some(api_method) = method(&api.req_method) else {
            return Err(bad(format!("{ap}.req_method"), "not a known method or ANY"));
        };
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
        let template =
            parse_template(&api.req_uri).map_err(|reason| bad(format!("{ap}.req_uri"), reason))?;
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
        let backend = match &api.backend {
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
                let Some(backend_method) = method(req_method) else {
                    return Err(bad(format!("{bp}.req_method"), "not a known method or ANY"));
                };
                let backend_template = parse_template(req_uri)
                    .map_err(|reason| bad(format!("{bp}.req_uri"), reason))?;
                let path = backend_path(&backend_template, &template).map_err(|name| {
                    bad(
                        format!("{bp}.req_uri"),
                        format!("parameter '{name}' is not in the API's req_uri"),
                    )
                })?;
                let authority = match url_domain.parse::<http::uri::Authority>() {
                    Ok(authority) if !url_domain.contains(['/', '@']) => authority,
                    _ => return Err(bad(format!("{bp}.url_domain"), "not host:port")),
                };
                if *timeout_ms == 0 || *timeout_ms > 3_600_000 {
                    return Err(bad(
                        format!("{bp}.timeout_ms"),
                        "must be 1..=3600000 milliseconds",
                    ));
                }
                CompiledBackend::Http {
                    authority,
                    method: backend_method,
                    path,
                    trailing_slash: req_uri.len() > 1 && req_uri.ends_with('/'),
                    timeout: std::time::Duration::from_millis(*timeout_ms),
                }
            }
            Backend::Mock { status, body } => {
                let status = match http::StatusCode::from_u16(*status) {
                    Ok(code) if (100..=599).contains(status) => code,
                    _ => return Err(bad(format!("{ap}.backend.status"), "not an HTTP status")),
                };
                CompiledBackend::Mock {
                    status,
                    body: bytes::Bytes::from(body.clone()),
                }
            }
        };
        parsed_group.push(ParsedApi {
            route: template,
            method: api_method,
            prefix_match: api.match_mode == "SWA",
            auth: match api.auth_type.as_str() {
                "APP" => AuthKind::App,
                "NONE" => AuthKind::None,
                _ => AuthKind::Unsupported,
            },
            https_only: api.req_protocol == "HTTPS",
            http_only: api.req_protocol == "HTTP",
            backend,
        });
    }
    Ok(parsed_group)
}

/// Each app authorization's (group, API, app) indices, the app and API found by `app` and
/// `api` (the market's tables: a full snapshot's or a compiled one's).
pub(super) fn resolve_app_auths(
    app_auths: &[AppAuth],
    app: impl Fn(&str) -> Option<u32>,
    api: impl Fn(&str) -> Option<(usize, usize)>,
) -> Result<Vec<(usize, usize, u32)>, ValidationError> {
    let mut auth_refs = Vec::with_capacity(app_auths.len());
    for (i, auth) in app_auths.iter().enumerate() {
        let at = |field: &str| format!("app_auths[{i}].{field}");
        let Some(app) = app(auth.app_id.as_str()) else {
            return Err(bad(at("app_id"), "no such app in the snapshot"));
        };
        let Some((group, api)) = api(auth.api_id.as_str()) else {
            return Err(bad(at("api_id"), "no such api in the snapshot"));
        };
        auth_refs.push((group, api, app));
    }
    Ok(auth_refs)
}

/// The certificates, parsed: each names at least one domain, no domain twice in the list,
/// and its certificate and key parse. They refer to nothing else in the market.
pub(super) fn validate_certificates(
    certificates: &[Certificate],
) -> Result<Vec<ParsedCertificate>, ValidationError> {
    let mut cert_domains = HashSet::new();
    let mut parsed = Vec::with_capacity(certificates.len());
    for (i, cert) in certificates.iter().enumerate() {
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
        let Ok(key) = crate::certificate::certified_key_pem(
            cert.cert_pem.as_bytes(),
            cert.key_pem.as_bytes(),
        ) else {
            return Err(bad(at("cert_pem"), "certificate or key does not parse"));
        };
        let not_after = key
            .cert
            .first()
            .and_then(|der| crate::certificate::not_after(der));
        parsed.push(ParsedCertificate {
            key: Arc::new(key),
            not_after,
        });
    }
    Ok(parsed)
}

/// The rules `validate` holds one app to, alone (its id, key, secret, codes and creator),
/// without those that need the rest of the market (unique ids, keys and codes): what a
/// delta's app must pass before `compile::apply_delta` checks it against the market.
pub(super) fn app_is_well_formed(app: &super::wire::App) -> bool {
    let credential = |text: &str| !text.is_empty() && text.len() <= MAX_CREDENTIAL_BYTES;
    !app.id.is_empty()
        && credential(&app.app_key)
        && credential(&app.app_secret)
        && app.app_codes.len() <= MAX_APP_CODES
        && app.app_codes.iter().all(|code| credential(code))
        && matches!(app.creator.as_str(), "USER" | "MARKET")
}

/// Likewise for one purchase: its id, times and quota.
pub(super) fn purchase_is_well_formed(purchase: &super::wire::Purchase) -> bool {
    !purchase.id.is_empty()
        && purchase.expire_time >= purchase.start_time
        && purchase
            .quota_limit
            .is_none_or(|limit| limit <= i64::MAX as u64)
}

/// The throttling section: limits in range and ordered as Huawei orders them (user ≤ api,
/// app ≤ user (or api), ip ≤ api), bound APIs and excepted apps present, an API bound to one
/// policy at most, one exception per object.
///
/// The one implementation of these rules: a full snapshot's validation finds APIs and apps
/// in its own tables; a delta that replaces this section (`compile::apply_delta`) finds them
/// in the compiled snapshot's (`app` gives an app's index or slot by id, `api` an API's
/// (group, API) index by id).
pub(super) fn validate_throttling<'a>(
    throttling: &'a Throttling,
    app: impl Fn(&str) -> Option<u32>,
    api: impl Fn(&str) -> Option<(usize, usize)>,
) -> Result<ThrottleRefs<'a>, ValidationError> {
    let mut refs = ThrottleRefs::default();
    let mut policy_ids = HashSet::new();
    let mut bound: HashMap<&str, usize> = HashMap::new();
    let in_range = |v: u64| (1..=MAX_THROTTLE_VALUE).contains(&v);
    for (pi, policy) in throttling.policies.iter().enumerate() {
        let at = |field: &str| format!("throttling.policies[{pi}].{field}");
        if policy.id.is_empty() || !policy_ids.insert(policy.id.as_str()) {
            return Err(bad(at("id"), "empty or duplicate policy id"));
        }
        if !in_range(policy.api_call_limits) {
            return Err(bad(at("api_call_limits"), "must be 1 to 2147483647"));
        }
        if !in_range(policy.time_interval) {
            return Err(bad(at("time_interval"), "must be 1 to 2147483647"));
        }
        let limits = [
            (
                "user_call_limits",
                policy.user_call_limits,
                policy.api_call_limits,
            ),
            (
                "app_call_limits",
                policy.app_call_limits,
                policy.user_call_limits.unwrap_or(policy.api_call_limits),
            ),
            (
                "ip_call_limits",
                policy.ip_call_limits,
                policy.api_call_limits,
            ),
        ];
        for (field, limit, most) in limits {
            if let Some(limit) = limit {
                if !in_range(limit) || limit > most {
                    return Err(bad(at(field), format!("must be 1 to {most}")));
                }
            }
        }
        let mut apis = Vec::with_capacity(policy.api_ids.len());
        for (i, api_id) in policy.api_ids.iter().enumerate() {
            let Some(found) = api(api_id) else {
                return Err(bad(
                    at(&format!("api_ids[{i}]")),
                    "no such api in the snapshot",
                ));
            };
            if let Some(other) = bound.insert(api_id.as_str(), pi) {
                return Err(bad(
                    at(&format!("api_ids[{i}]")),
                    format!("the API is also bound to throttling.policies[{other}]"),
                ));
            }
            apis.push(found);
        }
        refs.policies.push(apis);
        let mut objects = HashSet::new();
        let mut specials = Vec::with_capacity(policy.specials.len());
        for (i, special) in policy.specials.iter().enumerate() {
            let at = |field: &str| at(&format!("specials[{i}].{field}"));
            if !in_range(special.call_limits) {
                return Err(bad(at("call_limits"), "must be 1 to 2147483647"));
            }
            if !objects.insert((special.object_type, special.object_id.as_str())) {
                return Err(bad(at("object_id"), "a second exception for this object"));
            }
            specials.push(match special.object_type {
                super::wire::SpecialKind::App => {
                    let Some(app) = app(&special.object_id) else {
                        return Err(bad(at("object_id"), "no such app in the snapshot"));
                    };
                    SpecialRef::App {
                        app,
                        limit: special.call_limits,
                    }
                }
                super::wire::SpecialKind::User => {
                    if special.object_id.is_empty() {
                        return Err(bad(at("object_id"), "must not be empty"));
                    }
                    SpecialRef::User {
                        user: special.object_id.as_str(),
                        limit: special.call_limits,
                    }
                }
            });
        }
        refs.specials.push(specials);
    }
    let mut users = HashSet::new();
    for (i, entry) in throttling.app_users.iter().enumerate() {
        let at = |field: &str| format!("throttling.app_users[{i}].{field}");
        let Some(app) = app(&entry.app_id) else {
            return Err(bad(at("app_id"), "no such app in the snapshot"));
        };
        if !users.insert(app) {
            return Err(bad(at("app_id"), "a second user for this app"));
        }
        if entry.user.is_empty() {
            return Err(bad(at("user"), "must not be empty"));
        }
        refs.app_users.push((app, entry.user.as_str()));
    }
    Ok(refs)
}

/// The backend path of `template` with each parameter replaced by its position among the
/// route's parameters; `Err` names a parameter the route does not capture.
fn backend_path<'t>(template: &'t [Segment], route: &[Segment]) -> Result<Vec<PathPiece>, &'t str> {
    let params: Vec<&str> = route
        .iter()
        .filter_map(|s| match s {
            Segment::Param(n) | Segment::Greedy(n) => Some(n.as_str()),
            Segment::Literal(_) => None,
        })
        .collect();
    let mut pieces = Vec::new();
    for segment in template {
        match segment {
            Segment::Literal(l) => pieces.push(PathPiece::Literal(format!("/{l}").into())),
            Segment::Param(n) | Segment::Greedy(n) => {
                let index = params.iter().position(|p| p == n).ok_or(n.as_str())?;
                pieces.push(PathPiece::Literal("/".into()));
                pieces.push(PathPiece::Param(index));
            }
        }
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

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
