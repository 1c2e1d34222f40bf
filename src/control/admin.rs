//! The control plane's admin listener (`[admin] listen`, CONTRACT §5–§7): health, readiness,
//! metrics, the snapshot version, the per-proxy push status, and the quota lease exchange
//! that proxies call (`docs/quota-leases.md`).
//!
//! Owns admin authentication on this listener (`Authorization: Bearer <admin.token>` or
//! `X-Admin-Token`, compared in constant time; an empty configured token admits no one) and
//! the decoding of lease bodies with the path of the first bad field. Errors are
//! [`ControlError`]s, so they answer with the APIG error body like the control API. It holds
//! no state of its own: leases are [`ControlPlane::exchange_leases`]'s, push status the
//! pushers'.
//!
//! | route | token | answer |
//! |---|---|---|
//! | `GET /healthz` | no | 200 `ok` |
//! | `GET /readyz` | no | 200 `ready` when the store answers, else 503 |
//! | `GET /metrics` | unless `admin.metrics_public` | Prometheus text |
//! | `GET /v1/snapshot/version` | yes | `{"version":N}` |
//! | `GET /v1/proxies` | yes | `{"version":N,"proxies":[{admin_url,node_id,acked_version,acked_at,last_error,pushes_ok,pushes_failed,calls_held}],"leases":[{node_id,purchases,calls_held}]}` |
//! | `POST /v1/leases` | yes | `LeaseExchange` → `LeaseReply` |
//! | `POST /v1/leases/release` | yes | `{"node_id"}` → `{"node_id","released"}` |

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::push::PushStatus;
use super::{ControlError, ControlPlane};
use crate::lease::{LeaseExchange, LeaseReply};

/// What the admin handlers share.
#[derive(Clone)]
struct Admin {
    cp: ControlPlane,
    push: PushStatus,
}

/// The admin routes of `cp`, with `push` the status of its pushers (`PushStatus::none()`
/// where there are none).
pub fn router(cp: ControlPlane, push: PushStatus) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/snapshot/version", get(snapshot_version))
        .merge(ledger_routes())
        .fallback(|| async { ControlError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ControlError::RouteNotFound })
        .with_state(Admin { cp, push })
}

/// Only the routes that are the control plane's alone (proxies, leases): `serve` mounts them
/// beside its gateway's admin routes, which answer health, readiness, metrics and version.
pub fn ledger_router(cp: ControlPlane, push: PushStatus) -> Router {
    ledger_routes().with_state(Admin { cp, push })
}

fn ledger_routes() -> Router<Admin> {
    Router::new()
        .route("/v1/proxies", get(proxies))
        .route("/v1/leases", post(exchange))
        .route("/v1/leases/release", post(release))
}

fn authorized(cp: &ControlPlane, headers: &HeaderMap) -> Result<(), ControlError> {
    if cp.config().admin.admits(headers) {
        Ok(())
    } else {
        Err(ControlError::Unauthenticated(
            "admin token missing or wrong".into(),
        ))
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
        authorized(&admin.cp, &headers)?;
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
    authorized(&admin.cp, &headers)?;
    Ok(Json(json!({ "version": admin.cp.version() })))
}

/// Push status per configured proxy, with the calls it holds in leases; and every node that
/// holds a lease, configured or not (an in-process proxy, one removed from the config).
async fn proxies(
    State(admin): State<Admin>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ControlError> {
    authorized(&admin.cp, &headers)?;
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
        .push
        .all()
        .into_iter()
        .map(|status| {
            let held = status
                .node_id
                .as_ref()
                .and_then(|node| leases.get(node))
                .map_or(0, |(_, calls)| *calls);
            let mut value = serde_json::to_value(status).expect("a status serializes");
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
    Ok(Json(json!({
        "version": admin.cp.version(),
        "proxies": proxies,
        "leases": leases,
    })))
}

async fn exchange(
    State(admin): State<Admin>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<LeaseReply>, ControlError> {
    authorized(&admin.cp, &headers)?;
    let exchange: LeaseExchange = parse(&body)?;
    Ok(Json(admin.cp.exchange_leases(exchange).await?))
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
    authorized(&admin.cp, &headers)?;
    let Release { node_id } = parse(&body)?;
    if node_id.is_empty() {
        return Err(ControlError::InvalidParameter("node_id".into()));
    }
    let released = admin.cp.release_leases(&node_id).await?;
    Ok(Json(json!({ "node_id": node_id, "released": released })))
}
