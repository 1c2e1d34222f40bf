//! The control plane's admin listener (`[admin] listen`, CONTRACT §5–§7): health, readiness,
//! metrics, the snapshot version, the snapshot subscription proxies poll
//! (docs/snapshot-protocol.md), the proxies in touch, and the quota lease exchange that
//! proxies call (`docs/quota-leases.md`).
//!
//! Owns admin authentication on this listener (`Authorization: Bearer <token>` or
//! `X-Admin-Token`, compared in constant time with every configured admin token; the routes a
//! proxy needs take a proxy or an operator token, the others an operator token: 403 naming
//! the rule for a proxy token) and
//! the decoding of lease bodies with the path of the first bad field. Errors are
//! [`ControlError`]s, so they answer with the APIG error body like the control API. It holds
//! no state of its own: leases are [`ControlPlane::exchange_leases`]'s, published versions
//! and proxies in touch [`Subscriptions`]'.
//!
//! | route | token | answer |
//! |---|---|---|
//! | `GET /healthz` | no | 200 `ok` |
//! | `GET /readyz` | no | 200 `ready` when the store answers, else 503 |
//! | `GET /metrics` | operator, unless `admin.metrics_public` | Prometheus text |
//! | `GET /v1/snapshot/version` | proxy | `{"version":N}` |
//! | `POST /v1/snapshot/subscribe` | proxy | `feed::Poll` → 200 gzip full or delta (`x-snapshot-kind`), 204 after the hold, 409 node id in use |
//! | `GET /v1/proxies` | operator | `{"version":N,"hash":H,"proxies":[{node_id,incarnation,acked_version,content_hash,content,last_seen,silent_secs,lag_versions,lag_secs,last_error,polls,resyncs,calls_held}],"leases":[{node_id,purchases,calls_held}]}` |
//! | `POST /v1/leases` | proxy | `LeaseExchange` → `LeaseReply` (409 node id in use) |
//! | `POST /v1/leases/release` | proxy | `{"node_id"}` → `{"node_id","released"}` |
//! | `POST /v1/throttle/allotments` | proxy | `AllotmentRequest` → `AllotmentReply` (`crate::throttle_allotment`) |

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::rule;
use super::subscriptions::{Answer, Subscriptions};
use super::{ControlError, ControlPlane};
use crate::config::{AdminRefusal, AdminRole};
use crate::feed::{self, Poll};
use crate::lease::{LeaseExchange, LeaseReply};

/// What the admin handlers share.
#[derive(Clone)]
struct Admin {
    cp: ControlPlane,
    subscriptions: Subscriptions,
}

/// The admin routes of `cp`, answering polls and `GET /v1/proxies` from `subscriptions`.
pub fn router(cp: ControlPlane, subscriptions: Subscriptions) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/snapshot/version", get(snapshot_version))
        .merge(ledger_routes())
        .fallback(|| async { ControlError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ControlError::RouteNotFound })
        .with_state(Admin { cp, subscriptions })
}

/// Only the routes that are the control plane's alone (subscription, proxies, leases):
/// `serve` mounts them beside its gateway's admin routes, which answer health, readiness,
/// metrics and version.
pub fn ledger_router(cp: ControlPlane, subscriptions: Subscriptions) -> Router {
    ledger_routes().with_state(Admin { cp, subscriptions })
}

fn ledger_routes() -> Router<Admin> {
    Router::new()
        .route(feed::SUBSCRIBE_PATH, post(subscribe))
        .route("/v1/proxies", get(proxies))
        .route("/v1/leases", post(exchange))
        .route("/v1/leases/release", post(release))
        .route(crate::throttle_allotment::PATH, post(allot))
}

/// `POST /v1/throttle/allotments`: a proxy's throttling allotments (docs/throttling.md).
async fn allot(
    State(admin): State<Admin>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<crate::throttle_allotment::AllotmentReply>, ControlError> {
    authorized(
        &admin.cp,
        &headers,
        AdminRole::Proxy,
        "POST /v1/throttle/allotments",
    )?;
    let request: crate::throttle_allotment::AllotmentRequest = parse(&body)?;
    Ok(Json(admin.cp.allot_throttles(request).await?))
}

/// Refuses a request without an admin token that may do `what` (`needed`: a proxy's routes
/// take a proxy or an operator token, the others an operator's).
fn authorized(
    cp: &ControlPlane,
    headers: &HeaderMap,
    needed: AdminRole,
    what: &'static str,
) -> Result<(), ControlError> {
    match cp.config().admin.check(headers, needed, what) {
        Ok(_) => Ok(()),
        Err(AdminRefusal::Unauthenticated) => Err(ControlError::Unauthenticated(
            "admin token missing or wrong".into(),
        )),
        Err(refusal @ AdminRefusal::NotOperator { .. }) => {
            Err(ControlError::Forbidden(refusal.to_string()))
        }
    }
}

/// Parses a JSON body whatever its Content-Type; a bad one names the field
/// (`wants[0].calls: invalid type …`).
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ControlError> {
    Json::<T>::from_bytes(body)
        .map(|Json(value)| value)
        .map_err(|e| ControlError::BadJson(e.body_text()))
}

async fn readyz(State(admin): State<Admin>) -> impl IntoResponse {
    match admin.cp.ping_store().await {
        Ok(()) => (StatusCode::OK, "ready"),
        Err(error) => {
            tracing::warn!(%error, "not ready: the store does not answer");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: the store does not answer",
            )
        }
    }
}

async fn metrics(
    State(admin): State<Admin>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ControlError> {
    if !admin.cp.config().admin.metrics_public {
        authorized(&admin.cp, &headers, AdminRole::Operator, "GET /metrics")?;
    }
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        admin.cp.metrics_text(),
    ))
}

async fn snapshot_version(
    State(admin): State<Admin>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ControlError> {
    authorized(
        &admin.cp,
        &headers,
        AdminRole::Proxy,
        "GET /v1/snapshot/version",
    )?;
    Ok(Json(json!({ "version": admin.cp.version() })))
}

/// One long-poll of a proxy (docs/snapshot-protocol.md): the full snapshot or a delta as
/// soon as one is newer than what it serves, else 204 after the hold.
async fn subscribe(
    State(admin): State<Admin>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ControlError> {
    authorized(
        &admin.cp,
        &headers,
        AdminRole::Proxy,
        "POST /v1/snapshot/subscribe",
    )?;
    let poll: Poll = parse(&body)?;
    if poll.node_id.is_empty() || poll.incarnation.is_empty() {
        let field = if poll.node_id.is_empty() {
            "node_id"
        } else {
            "incarnation"
        };
        return Err(rule::required(field));
    }
    let answer = admin.subscriptions.poll(&poll).await?;
    let Some(answer) = answer else {
        let mut response = StatusCode::NO_CONTENT.into_response();
        if let Some(published) = admin.subscriptions.published() {
            let headers = response.headers_mut();
            headers.insert(feed::VERSION_HEADER, published.version.into());
            if let Ok(hash) = published.hash.to_string().parse() {
                headers.insert(feed::HASH_HEADER, hash);
            }
        }
        return Ok(response);
    };
    let (kind, published, body) = match answer {
        Answer::Full(p) => ("full", p.clone(), p.full_gzip.clone()),
        Answer::Delta(p) => {
            let body = p
                .delta
                .as_ref()
                .expect("a delta answer has a delta")
                .gzip
                .clone();
            ("delta", p, body)
        }
    };
    Ok((
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (header::CONTENT_ENCODING, "gzip".to_owned()),
            (
                header::HeaderName::from_static(feed::KIND_HEADER),
                kind.to_owned(),
            ),
            (
                header::HeaderName::from_static(feed::VERSION_HEADER),
                published.version.to_string(),
            ),
            (
                header::HeaderName::from_static(feed::HASH_HEADER),
                published.hash.to_string(),
            ),
        ],
        body,
    )
        .into_response())
}

/// The proxies in touch (polled within `control.proxy_expiry_secs`), with the calls each
/// holds in leases; and every node that holds a lease, in touch or not (an in-process proxy,
/// one gone whose lease has not expired yet).
async fn proxies(
    State(admin): State<Admin>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ControlError> {
    authorized(&admin.cp, &headers, AdminRole::Operator, "GET /v1/proxies")?;
    // node -> (purchases with a lease, calls held)
    let mut leases: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (_, ledger) in admin.cp.ledgers().await? {
        for (node, lease) in &ledger.leases {
            let entry = leases.entry(node.clone()).or_default();
            entry.0 += 1;
            entry.1 += lease.held;
        }
    }
    let proxies: Vec<_> = admin
        .subscriptions
        .in_touch()
        .into_iter()
        .map(|proxy| {
            let held = leases.get(&proxy.node_id).map_or(0, |(_, calls)| *calls);
            let mut value = serde_json::to_value(proxy).expect("a status serializes");
            value["calls_held"] = held.into();
            value
        })
        .collect();
    let leases: Vec<_> = leases
        .into_iter()
        .map(|(node, (purchases, calls))| {
            json!({"node_id": node, "purchases": purchases, "calls_held": calls})
        })
        .collect();
    let published = admin.subscriptions.published();
    Ok(Json(json!({
        "version": admin.cp.version(),
        "published_version": published.as_ref().map(|p| p.version),
        "hash": published.as_ref().map(|p| p.hash.to_string()),
        "proxies": proxies,
        "leases": leases,
    })))
}

async fn exchange(
    State(admin): State<Admin>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<LeaseReply>, ControlError> {
    authorized(&admin.cp, &headers, AdminRole::Proxy, "POST /v1/leases")?;
    let exchange: LeaseExchange = parse(&body)?;
    if let Some(incarnation) = &exchange.incarnation {
        // Never two live proxies on one lease: the second incarnation is refused.
        admin
            .subscriptions
            .claim(&exchange.node_id, incarnation)
            .await?;
    }
    let leaving = exchange
        .leaving
        .then(|| exchange.incarnation.clone())
        .flatten();
    let node_id = exchange.node_id.clone();
    let reply = admin.cp.exchange_leases(exchange).await?;
    if let Some(incarnation) = leaving {
        // A clean stop: it leaves the list and frees its node id at once.
        admin.subscriptions.leave(&node_id, &incarnation).await;
    }
    Ok(Json(reply))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Release {
    node_id: String,
}

async fn release(
    State(admin): State<Admin>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<impl IntoResponse, ControlError> {
    authorized(
        &admin.cp,
        &headers,
        AdminRole::Proxy,
        "POST /v1/leases/release",
    )?;
    let Release { node_id } = parse(&body)?;
    if node_id.is_empty() {
        return Err(rule::required("node_id"));
    }
    let released = admin.cp.release_leases(&node_id).await?;
    Ok(Json(json!({ "node_id": node_id, "released": released })))
}
