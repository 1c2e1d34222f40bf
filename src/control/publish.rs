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

use std::collections::BTreeSet;

use crate::snapshot::{self, Snapshot};

use super::state::{now_rfc3339, State};

/// The snapshot of `state` at `state.version`.
pub fn build(state: &State) -> Snapshot {
    let groups = state
        .groups
        .values()
        .map(|g| snapshot::Group {
            id: g.id.clone(),
            name: g.name.clone(),
            sl_domain: g.sl_domain.clone(),
            url_domain: g.url_domain.clone(),
            market_state: g.market_state,
            apis: state
                .group_apis(&g.id)
                .filter_map(|a| a.release.as_ref().map(|p| p.frozen.clone()))
                .collect(),
        })
        .collect();
    let purchases: Vec<snapshot::Purchase> = state
        .purchases
        .values()
        // A delisted group may later be deleted by its owner; its purchases stay in the
        // store but have nothing to refer to in a snapshot.
        .filter(|p| state.groups.contains_key(&p.group_id))
        .filter_map(|p| {
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
        })
        .collect();
    let app_auths: Vec<snapshot::AppAuth> = state
        .auths
        .values()
        .filter(|a| {
            state.apps.contains_key(&a.app_id)
                && state
                    .apis
                    .get(&a.api_id)
                    .is_some_and(|api| api.release.is_some())
        })
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
        .map(|a| snapshot::App {
            id: a.id.clone(),
            app_key: a.app_key.clone(),
            app_secret: a.app_secret.clone(),
            app_codes: a.codes.iter().map(|c| c.app_code.clone()).collect(),
            creator: a.creator.clone(),
        })
        .collect();
    let domains: Vec<snapshot::Domain> = state
        .domains
        .values()
        .filter(|d| state.groups.contains_key(&d.group_id))
        .map(|d| snapshot::Domain {
            domain: d.url_domain.clone(),
            group_id: d.group_id.clone(),
            // Stored values are checked at the API (`domains::SSL_VERSIONS`).
            min_tls_version: snapshot::MinTlsVersion::from_name(&d.min_ssl_version)
                .unwrap_or_default(),
            https_redirect: d.is_http_redirect_to_https,
        })
        .collect();
    let certificates = state
        .certificates
        .values()
        .filter_map(|c| {
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
        })
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
