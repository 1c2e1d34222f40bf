//! The snapshot source: builds the data plane's wire snapshot (`crate::snapshot::Snapshot`)
//! from the in-memory state at its committed version. Sending it to proxies is not here
//! (`subscriptions` publishes each version once).
//!
//! What goes in: every group (with `sl_domain`, `url_domain`, `market_state`) with the RELEASE
//! definitions of its published APIs as frozen at publish time (never drafts); MARKET apps of
//! purchases and USER apps that hold app authorizations; purchases that have an app (a
//! reserved purchase has none yet); app authorizations of published APIs; sellers' bound
//! domains with their TLS rules, and each certificate attached to one of them with the
//! domains it serves (a certificate attached to nothing is not sent: its key stays in the
//! store). Must not read the store or change state.
//!
//! Also the part of a snapshot one write touches ([`neighbourhood`]): the control plane
//! validates it with the proxies' own validator before the write commits, so that a record
//! the proxies would refuse is refused at the API and never stored (a stored one would make
//! every push fail). Both are built from the same per-record conversions.

use std::collections::BTreeSet;

use crate::snapshot::{self, Snapshot};

use super::state::{now_rfc3339, AppRec, CertRec, Change, DomainRec, GroupRec, PurchaseRec, State};

/// The snapshot of `state` at `state.version`.
pub fn build(state: &State) -> Snapshot {
    let groups = state.groups.values().map(|g| group(state, g)).collect();
    let purchases: Vec<snapshot::Purchase> = state
        .purchases
        .values()
        .filter_map(|p| purchase(state, p))
        .collect();
    let app_auths: Vec<snapshot::AppAuth> = state
        .auths
        .values()
        .filter(|a| auth_is_served(state, &a.app_id, &a.api_id))
        .map(|a| snapshot::AppAuth {
            app_id: a.app_id.clone(),
            api_id: a.api_id.clone(),
        })
        .collect();
    let wanted: BTreeSet<&str> = purchases
        .iter()
        .map(|p| p.app_id.as_str())
        .chain(app_auths.iter().map(|a| a.app_id.as_str()))
        .collect();
    let apps: Vec<snapshot::App> = state
        .apps
        .values()
        .filter(|a| wanted.contains(a.id.as_str()))
        .map(app)
        .collect();
    let domains: Vec<snapshot::Domain> = state
        .domains
        .values()
        .filter(|d| state.groups.contains_key(&d.group_id))
        .map(domain)
        .collect();
    let certificates = state
        .certificates
        .values()
        .filter_map(|c| certificate(state, c))
        .collect();
    let throttling = super::throttles::snapshot_section(state, &apps);
    Snapshot {
        version: state.version,
        generated_at: Some(now_rfc3339()),
        groups,
        apps,
        purchases,
        app_auths,
        certificates,
        domains,
        throttling,
    }
}

/// The part of the snapshot of `after` (a view with `changes` applied) that `changes`
/// touch, with what those records refer to, for the proxies' validator: each changed group
/// (or the group of a changed API, bound domain or purchase) with its RELEASE APIs, a
/// changed group's bound domains and their certificates, changed apps, purchases and app
/// authorizations with the apps and groups they name. Its size is that of the records
/// touched, never the market's. What it cannot see, the write's handler checks: uniqueness
/// across the market (claims), deletions (the full build drops what they leave dangling) and
/// throttling (its handlers check the section's rules).
pub fn neighbourhood(after: &State, changes: &[Change]) -> Snapshot {
    let mut groups: BTreeSet<&str> = BTreeSet::new();
    let mut with_domains: BTreeSet<&str> = BTreeSet::new();
    let mut apps: BTreeSet<&str> = BTreeSet::new();
    let mut purchases: BTreeSet<&str> = BTreeSet::new();
    let mut auths: BTreeSet<&str> = BTreeSet::new();
    for change in changes {
        match change {
            Change::Group(g) => {
                groups.insert(&g.id);
                with_domains.insert(&g.id);
            }
            Change::Api(a) => {
                groups.insert(&a.group_id);
            }
            Change::Domain(d) => {
                groups.insert(&d.group_id);
                with_domains.insert(&d.group_id);
            }
            Change::Certificate(c) => {
                for d in after.domains.values() {
                    if d.certificate_id.as_deref() == Some(c.id.as_str()) {
                        groups.insert(&d.group_id);
                        with_domains.insert(&d.group_id);
                    }
                }
            }
            Change::App(a) => {
                apps.insert(&a.id);
            }
            Change::Purchase(p) => {
                if let Some(p) = after.purchases.get(&p.purchase_id) {
                    purchases.insert(&p.purchase_id);
                    groups.insert(&p.group_id);
                    apps.extend(p.app_id.as_deref());
                }
            }
            Change::Auth(a) => {
                if let Some(a) = after.auths.get(&a.id) {
                    if auth_is_served(after, &a.app_id, &a.api_id) {
                        auths.insert(&a.id);
                        apps.insert(&a.app_id);
                        groups.extend(after.apis.get(&a.api_id).map(|api| api.group_id.as_str()));
                    }
                }
            }
            Change::DeleteGroup(_)
            | Change::DeleteApi(_)
            | Change::DeleteApp(_)
            | Change::DeleteAuth(_)
            | Change::DeletePurchase(_)
            | Change::DeleteDomain(_)
            | Change::DeleteCertificate(_)
            | Change::Throttle(_)
            | Change::DeleteThrottle(_)
            | Change::ThrottleBinding(_)
            | Change::DeleteThrottleBinding(_)
            | Change::ThrottleSpecial(_)
            | Change::DeleteThrottleSpecial(_) => {}
        }
    }
    let domains: Vec<&DomainRec> = with_domains
        .iter()
        .flat_map(|g| after.group_domains(g))
        .collect();
    let certificates: BTreeSet<&str> = domains
        .iter()
        .filter_map(|d| d.certificate_id.as_deref())
        .collect();
    Snapshot {
        version: after.version.max(1),
        generated_at: None,
        groups: groups
            .iter()
            .filter_map(|id| after.groups.get(*id))
            .map(|g| group(after, g))
            .collect(),
        apps: apps
            .iter()
            .filter_map(|id| after.apps.get(*id))
            .map(app)
            .collect(),
        purchases: purchases
            .iter()
            .filter_map(|id| purchase(after, after.purchases.get(*id)?))
            .collect(),
        app_auths: auths
            .iter()
            .filter_map(|id| after.auths.get(*id))
            .map(|a| snapshot::AppAuth {
                app_id: a.app_id.clone(),
                api_id: a.api_id.clone(),
            })
            .collect(),
        certificates: certificates
            .iter()
            .filter_map(|id| certificate(after, after.certificates.get(*id)?))
            .collect(),
        domains: domains.into_iter().map(domain).collect(),
        throttling: snapshot::Throttling::default(),
    }
}

/// A validator's refusal of a [`neighbourhood`] with its first field named by the record's
/// id rather than its place in that partial snapshot (`group 3f…: url_domain`,
/// `group 3f…, API 9c…: req_uri`).
pub fn name_records(
    part: &Snapshot,
    error: snapshot::validate::ValidationError,
) -> snapshot::validate::ValidationError {
    let indexed = |text: &str, list: &str| -> Option<(usize, String)> {
        let rest = text.strip_prefix(list)?.strip_prefix('[')?;
        let (index, rest) = rest.split_once(']')?;
        Some((index.parse().ok()?, rest.trim_start_matches('.').to_owned()))
    };
    let path = &error.path;
    let named = if let Some((g, rest)) = indexed(path, "groups") {
        part.groups
            .get(g)
            .map(|group| match indexed(&rest, "apis") {
                Some((a, field)) => format!(
                    "group {}, API {}: {field}",
                    group.id,
                    group.apis.get(a).map_or("?", |api| api.id.as_str())
                ),
                None => format!("group {}: {rest}", group.id),
            })
    } else if let Some((i, rest)) = indexed(path, "apps") {
        part.apps.get(i).map(|a| format!("app {}: {rest}", a.id))
    } else if let Some((i, rest)) = indexed(path, "purchases") {
        part.purchases
            .get(i)
            .map(|p| format!("purchase {}: {rest}", p.id))
    } else if let Some((i, rest)) = indexed(path, "domains") {
        part.domains
            .get(i)
            .map(|d| format!("bound domain {}: {rest}", d.domain))
    } else if let Some((i, rest)) = indexed(path, "app_auths") {
        part.app_auths.get(i).map(|a| {
            format!(
                "authorization of app {} for API {}: {rest}",
                a.app_id, a.api_id
            )
        })
    } else if let Some((i, rest)) = indexed(path, "certificates") {
        part.certificates
            .get(i)
            .map(|c| format!("certificate of {}: {rest}", c.domains.join(", ")))
    } else {
        None
    };
    snapshot::validate::ValidationError {
        path: named.unwrap_or_else(|| error.path.clone()),
        reason: error.reason,
    }
}

/// A group with the RELEASE definitions of its published APIs (never drafts).
fn group(state: &State, g: &GroupRec) -> snapshot::Group {
    snapshot::Group {
        id: g.id.clone(),
        name: g.name.clone(),
        sl_domain: g.sl_domain.clone(),
        url_domain: g.url_domain.clone(),
        market_state: g.market_state,
        apis: state
            .group_apis(&g.id)
            .filter_map(|a| a.release.as_ref().map(|p| p.frozen.clone()))
            .collect(),
    }
}

/// A purchase that has an app and a group to refer to (a reserved purchase has no app yet;
/// a delisted group may later be deleted by its owner, its purchases staying in the store
/// with nothing to refer to in a snapshot).
fn purchase(state: &State, p: &PurchaseRec) -> Option<snapshot::Purchase> {
    if !state.groups.contains_key(&p.group_id) {
        return None;
    }
    Some(snapshot::Purchase {
        id: p.purchase_id.clone(),
        group_id: p.group_id.clone(),
        app_id: p.app_id.clone()?,
        state: p.state,
        start_time: p.start_time,
        expire_time: p.expire_time,
        quota_limit: p.quota_limit,
        quota_used: p.quota_used,
    })
}

/// An app authorization is served when its app exists and its API is published.
fn auth_is_served(state: &State, app_id: &str, api_id: &str) -> bool {
    state.apps.contains_key(app_id)
        && state
            .apis
            .get(api_id)
            .is_some_and(|api| api.release.is_some())
}

fn app(a: &AppRec) -> snapshot::App {
    snapshot::App {
        id: a.id.clone(),
        app_key: a.app_key.clone(),
        app_secret: a.app_secret.clone(),
        app_codes: a.codes.iter().map(|c| c.app_code.clone()).collect(),
        creator: a.creator.clone(),
    }
}

fn domain(d: &DomainRec) -> snapshot::Domain {
    snapshot::Domain {
        domain: d.url_domain.clone(),
        group_id: d.group_id.clone(),
        // Stored values are checked at the API (`domains::SSL_VERSIONS`).
        min_tls_version: snapshot::MinTlsVersion::from_name(&d.min_ssl_version).unwrap_or_default(),
        https_redirect: d.is_http_redirect_to_https,
    }
}

/// A certificate with the domains it serves; `None` when attached to none (its key stays in
/// the store).
fn certificate(state: &State, c: &CertRec) -> Option<snapshot::Certificate> {
    let served: Vec<String> = state
        .domains
        .values()
        .filter(|d| {
            d.certificate_id.as_deref() == Some(c.id.as_str())
                && state.groups.contains_key(&d.group_id)
        })
        .map(|d| d.url_domain.clone())
        .collect();
    (!served.is_empty()).then(|| snapshot::Certificate {
        domains: served,
        cert_pem: c.cert_content.clone(),
        key_pem: c.private_key.clone(),
    })
}
