//! The proxy's admin listener (CONTRACT §5–§6): snapshot push, version, usage, metrics,
//! health and readiness.
//!
//! `PATCH /v1/snapshot` takes a [`Delta`] against the version served (409 otherwise).
//!
//! Owns admin authentication (`Authorization: Bearer <token>` or `X-Admin-Token`, compared
//! in constant time with every configured admin token; pushes, usage and metrics need an
//! operator token, and a proxy token is refused 403 naming the rule), decoding of pushed snapshots (JSON, optionally gzip or zstd,
//! bounded after decompression) with the field path of the first bad field, and the mapping
//! of [`AdminError`] to status and `{"error_code","error_msg"}` in one exhaustive match. It
//! does not validate or apply snapshots itself (that is [`super::Gateway::apply_snapshot`]).

use std::io::Read;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde_json::json;

use super::{Gateway, SnapshotRejection};
use crate::apig;
use crate::config::{AdminRefusal, AdminRole};
use crate::snapshot::delta::Delta;
use crate::snapshot::Snapshot;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("missing or wrong admin token")]
    Unauthorized,
    /// A known token whose role may not do this (a proxy's on a snapshot push).
    #[error(transparent)]
    Forbidden(AdminRefusal),
    #[error("Content-Encoding {0:?} is not identity, gzip or zstd")]
    Encoding(String),
    #[error("the body does not decompress")]
    Decompress(#[source] std::io::Error),
    #[error(
        "the body is larger than proxy.max_snapshot_bytes ({limit} bytes) after decompression"
    )]
    TooLarge { limit: usize },
    /// A compressed body inflating past what any real snapshot compresses to (a
    /// decompression bomb), stopped while it decompressed.
    #[error(
        "the {compressed}-byte body decompresses to more than {bound} bytes \
         ({MAX_DECOMPRESSION_RATIO}x its size, at least {DECOMPRESSION_FLOOR_BYTES})"
    )]
    Inflated { compressed: usize, bound: usize },
    #[error("the body could not be read")]
    Body(#[source] BytesRejection),
    #[error("{path}: {message}")]
    Decode { path: String, message: String },
    #[error(transparent)]
    Rejected(#[from] SnapshotRejection),
    #[error("applying the snapshot stopped unfinished")]
    Task(#[source] tokio::task::JoinError),
}

impl AdminError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            AdminError::Unauthorized => (StatusCode::UNAUTHORIZED, apig::AUTH_FAILED),
            AdminError::Forbidden(_) => (StatusCode::FORBIDDEN, apig::NO_PERMISSION),
            AdminError::Encoding(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, apig::PARAMETER_ERROR),
            AdminError::Decompress(_) | AdminError::Decode { .. } => {
                (StatusCode::BAD_REQUEST, apig::PARAMETER_ERROR)
            }
            AdminError::TooLarge { .. } | AdminError::Inflated { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, apig::PARAMETER_ERROR)
            }
            AdminError::Body(_) => (StatusCode::BAD_REQUEST, apig::PARAMETER_ERROR),
            AdminError::Rejected(SnapshotRejection::Invalid(_)) => {
                (StatusCode::BAD_REQUEST, apig::PARAMETER_ERROR)
            }
            AdminError::Rejected(SnapshotRejection::NotNewer { .. }) => {
                (StatusCode::CONFLICT, apig::PARAMETER_ERROR)
            }
            AdminError::Rejected(SnapshotRejection::WrongBase { .. }) => {
                (StatusCode::CONFLICT, apig::PARAMETER_ERROR)
            }
            AdminError::Rejected(SnapshotRejection::Followed) => {
                (StatusCode::CONFLICT, apig::PARAMETER_ERROR)
            }
            AdminError::Rejected(SnapshotRejection::Persist(_)) | AdminError::Task(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, apig::SYSTEM_ERROR)
            }
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = match &self {
            AdminError::Decompress(e) => format!("{self}: {e}"),
            AdminError::Body(e) => format!("{self}: {e}"),
            _ => self.to_string(),
        };
        (
            status,
            Json(json!({"error_code": code, "error_msg": message})),
        )
            .into_response()
    }
}

/// Refuses a request without an admin token that may do `what` (`needed`).
fn authorized(
    gateway: &Gateway,
    headers: &HeaderMap,
    needed: AdminRole,
    what: &'static str,
) -> Result<(), AdminError> {
    match gateway.inner.config.admin.check(headers, needed, what) {
        Ok(_) => Ok(()),
        Err(AdminRefusal::Unauthenticated) => Err(AdminError::Unauthorized),
        Err(refusal) => Err(AdminError::Forbidden(refusal)),
    }
}

/// A compressed push may inflate to at most this many times its size (JSON snapshots
/// compress about 5-20x), or [`DECOMPRESSION_FLOOR_BYTES`], whichever is more, and never past
/// `proxy.max_snapshot_bytes`: checked while decompressing, so a bomb costs at most that.
pub const MAX_DECOMPRESSION_RATIO: usize = 256;
/// What any compressed push may inflate to, whatever its ratio, in bytes.
pub const DECOMPRESSION_FLOOR_BYTES: usize = 64 << 20;

/// Refuses a snapshot push without an operator token before anything reads its body.
async fn require_token(
    State(gateway): State<Gateway>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let what = match *request.method() {
        http::Method::PATCH => "PATCH /v1/snapshot",
        _ => "PUT /v1/snapshot",
    };
    match authorized(&gateway, request.headers(), AdminRole::Operator, what) {
        Ok(()) => next.run(request).await,
        Err(error) => error.into_response(),
    }
}

/// The admin routes of one gateway.
pub fn router(gateway: Gateway) -> Router {
    let max_snapshot_bytes = gateway.inner.config.proxy.max_snapshot_bytes;
    Router::new()
        .route(
            "/v1/snapshot",
            put(put_snapshot).patch(patch_snapshot).route_layer(
                axum::middleware::from_fn_with_state(gateway.clone(), require_token),
            ),
        )
        .route("/v1/snapshot/version", get(snapshot_version))
        .route("/v1/usage", get(usage))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(max_snapshot_bytes))
        .layer(axum::middleware::map_response(with_request_id))
        .with_state(gateway)
}

/// Every admin answer carries an `X-Request-Id`, as every buyer answer does (CONTRACT §9), so
/// an operator's report of a refused push names the answer it got.
async fn with_request_id(mut response: Response) -> Response {
    response
        .headers_mut()
        .entry(http::header::HeaderName::from_static("x-request-id"))
        .or_insert_with(super::handler::new_request_id);
    response
}

/// Decompresses (to at most `limit` bytes) and parses a pushed snapshot.
pub fn decode_snapshot(
    headers: &HeaderMap,
    body: &[u8],
    limit: usize,
) -> Result<Snapshot, AdminError> {
    decode_json(headers, body, limit)
}

/// Decompresses (to at most `limit` bytes) and parses a pushed delta (`PATCH /v1/snapshot`).
pub fn decode_delta(headers: &HeaderMap, body: &[u8], limit: usize) -> Result<Delta, AdminError> {
    decode_json(headers, body, limit)
}

/// Decompresses `body` as `Content-Encoding` says, to at most `limit` bytes
/// (`proxy.max_snapshot_bytes`), and parses it, naming the first bad element on failure.
fn decode_json<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: &[u8],
    limit: usize,
) -> Result<T, AdminError> {
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity")
        .trim()
        .to_ascii_lowercase();
    let mut plain = Vec::new();
    // Decompression stops one byte past the bound: a bomb never costs more than the bound.
    let bound = limit.min(
        body.len()
            .saturating_mul(MAX_DECOMPRESSION_RATIO)
            .max(DECOMPRESSION_FLOOR_BYTES),
    );
    let bytes: &[u8] = match encoding.as_str() {
        "identity" | "" => body,
        "gzip" => {
            flate2::read::GzDecoder::new(body)
                .take(bound as u64 + 1)
                .read_to_end(&mut plain)
                .map_err(AdminError::Decompress)?;
            &plain
        }
        "zstd" => {
            zstd::stream::read::Decoder::new(body)
                .map_err(AdminError::Decompress)?
                .take(bound as u64 + 1)
                .read_to_end(&mut plain)
                .map_err(AdminError::Decompress)?;
            &plain
        }
        other => return Err(AdminError::Encoding(other.to_owned())),
    };
    if bytes.len() > limit {
        return Err(AdminError::TooLarge { limit });
    }
    if bytes.len() > bound {
        return Err(AdminError::Inflated {
            compressed: body.len(),
            bound,
        });
    }
    // The common case parses once; only a bad snapshot pays for the search of its path.
    if let Ok(parsed) = serde_json::from_slice::<T>(bytes) {
        return Ok(parsed);
    }
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| AdminError::Decode {
            path: "$".into(),
            message: format!("not JSON: {e}"),
        })?;
    serde_json::from_value::<T>(value.clone()).map_err(|e| AdminError::Decode {
        path: locate_decode_error(&value),
        message: e.to_string(),
    })
}

/// Finds the deepest element whose own deserialization fails, for the error's field path.
/// Deltas carry the same arrays (`groups`, `apps`, `purchases`, …), so this serves both.
fn locate_decode_error(value: &serde_json::Value) -> String {
    use crate::snapshot::wire::{Api, App, AppAuth, Certificate, Domain, Group, Purchase};
    fn first_bad<T: serde::de::DeserializeOwned>(items: &[serde_json::Value]) -> Option<usize> {
        items
            .iter()
            .position(|item| serde_json::from_value::<T>(item.clone()).is_err())
    }
    fn bad_field(item: &serde_json::Value, fields: &[&str]) -> Option<String> {
        let object = item.as_object()?;
        fields
            .iter()
            .find(|f| {
                object
                    .get(**f)
                    .and_then(|v| v.as_i64())
                    .is_some_and(|n| n < 0)
            })
            .map(|f| (*f).to_owned())
    }
    let Some(object) = value.as_object() else {
        return "$".into();
    };
    let array = |key: &str| {
        object
            .get(key)
            .and_then(|v| v.as_array())
            .cloned()
            .unwrap_or_default()
    };
    let groups = array("groups");
    if let Some(gi) = first_bad::<Group>(&groups) {
        let apis = groups[gi]
            .get("apis")
            .and_then(|v| v.as_array())
            .cloned()
            .unwrap_or_default();
        return match first_bad::<Api>(&apis) {
            Some(ai) => format!("groups[{gi}].apis[{ai}]"),
            None => format!("groups[{gi}]"),
        };
    }
    let purchases = array("purchases");
    if let Some(i) = first_bad::<Purchase>(&purchases) {
        return match bad_field(&purchases[i], &["quota_limit", "quota_used", "start_time"]) {
            Some(field) => format!("purchases[{i}].{field}"),
            None => format!("purchases[{i}]"),
        };
    }
    if let Some(i) = first_bad::<App>(&array("apps")) {
        return format!("apps[{i}]");
    }
    if let Some(i) = first_bad::<AppAuth>(&array("app_auths")) {
        return format!("app_auths[{i}]");
    }
    if let Some(i) = first_bad::<Certificate>(&array("certificates")) {
        return format!("certificates[{i}]");
    }
    if let Some(i) = first_bad::<Domain>(&array("domains")) {
        return format!("domains[{i}]");
    }
    if object.get("version").is_some_and(|v| !v.is_u64()) {
        return "version".into();
    }
    "$".into()
}

async fn put_snapshot(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, AdminError> {
    authorized(&gateway, &headers, AdminRole::Operator, "PUT /v1/snapshot")?;
    let body = pushed_body(&gateway, body)?;
    // Decoding and compiling a large snapshot takes seconds of CPU (BENCHMARKS.md): off the
    // runtime threads, so that buyers' requests keep being served while it runs.
    let node_id = gateway.node_id().to_owned();
    let version = tokio::task::spawn_blocking(move || {
        let limit = gateway.inner.config.proxy.max_snapshot_bytes;
        let snapshot =
            decode_snapshot(&headers, &body, limit).inspect_err(|_| count_undecodable(&gateway))?;
        Ok::<_, AdminError>(gateway.apply_snapshot(snapshot)?)
    })
    .await
    .map_err(AdminError::Task)??;
    Ok(Json(json!({ "version": version, "node_id": node_id })))
}

/// `PATCH /v1/snapshot`: a delta from the version served (409 from any other, so that the
/// control plane sends the full snapshot instead).
async fn patch_snapshot(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, AdminError> {
    authorized(
        &gateway,
        &headers,
        AdminRole::Operator,
        "PATCH /v1/snapshot",
    )?;
    let body = pushed_body(&gateway, body)?;
    let node_id = gateway.node_id().to_owned();
    let version = tokio::task::spawn_blocking(move || {
        let limit = gateway.inner.config.proxy.max_snapshot_bytes;
        let delta =
            decode_delta(&headers, &body, limit).inspect_err(|_| count_undecodable(&gateway))?;
        Ok::<_, AdminError>(gateway.apply_delta(delta)?)
    })
    .await
    .map_err(AdminError::Task)??;
    Ok(Json(json!({ "version": version, "node_id": node_id })))
}

/// The pushed body, or why it could not be read: over `proxy.max_snapshot_bytes` as sent
/// (before decompression) is a 413 like one that decompresses to more.
fn pushed_body(
    gateway: &Gateway,
    body: Result<Bytes, BytesRejection>,
) -> Result<Bytes, AdminError> {
    body.map_err(|rejection| {
        count_undecodable(gateway);
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            AdminError::TooLarge {
                limit: gateway.inner.config.proxy.max_snapshot_bytes,
            }
        } else {
            AdminError::Body(rejection)
        }
    })
}

/// A push whose body does not even parse is a rejected push.
fn count_undecodable(gateway: &Gateway) {
    gateway
        .inner
        .metrics
        .snapshot_push
        .with_label_values(&["rejected"])
        .inc();
}

async fn snapshot_version(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, AdminError> {
    authorized(
        &gateway,
        &headers,
        AdminRole::Proxy,
        "GET /v1/snapshot/version",
    )?;
    Ok(Json(
        json!({ "version": gateway.snapshot_version(), "node_id": gateway.node_id() }),
    ))
}

async fn usage(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, AdminError> {
    authorized(&gateway, &headers, AdminRole::Operator, "GET /v1/usage")?;
    let mut purchases: Vec<_> = gateway
        .quota()
        .cells()
        .into_iter()
        .map(|cell| {
            json!({
                "purchase_id": cell.purchase_id(),
                "used": cell.used(),
                "left": cell.purchase_left(),
                "lease_left": cell.lease_left(),
                "leased": cell.is_leased(),
            })
        })
        .collect();
    purchases.sort_by(|a, b| a["purchase_id"].as_str().cmp(&b["purchase_id"].as_str()));
    Ok(Json(json!({ "purchases": purchases })))
}

async fn metrics(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, AdminError> {
    if !gateway.inner.config.admin.metrics_public {
        authorized(&gateway, &headers, AdminRole::Operator, "GET /metrics")?;
    }
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        gateway.metrics().render(),
    ))
}

async fn readyz(State(gateway): State<Gateway>) -> impl IntoResponse {
    if gateway.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_admin_error_has_a_status() {
        let table: Vec<(AdminError, u16)> = vec![
            (AdminError::Unauthorized, 401),
            (AdminError::Encoding("br".into()), 415),
            (AdminError::TooLarge { limit: 1024 }, 413),
            (
                AdminError::Inflated {
                    compressed: 1,
                    bound: 2,
                },
                413,
            ),
            (
                AdminError::Decode {
                    path: "$".into(),
                    message: "x".into(),
                },
                400,
            ),
            (
                AdminError::Rejected(SnapshotRejection::NotNewer {
                    current: 2,
                    offered: 1,
                }),
                409,
            ),
            (
                AdminError::Rejected(SnapshotRejection::WrongBase {
                    current: Some(3),
                    from_version: 2,
                }),
                409,
            ),
        ];
        for (error, status) in table {
            assert_eq!(error.status_and_code().0.as_u16(), status, "{error:?}");
        }
    }

    /// A zstd bomb (a few KB inflating to 256 MiB of spaces) is stopped at the floor while it
    /// decompresses: 413, having held at most that much.
    #[test]
    fn a_decompression_bomb_is_stopped_while_it_inflates() {
        use std::io::Write;
        let mut encoder = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
        let chunk = vec![b' '; 1 << 20];
        for _ in 0..256 {
            encoder.write_all(&chunk).unwrap();
        }
        let bomb = encoder.finish().unwrap();
        assert!(bomb.len() < 100 * 1024, "{}", bomb.len());
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_ENCODING, "zstd".parse().unwrap());
        match decode_snapshot(&headers, &bomb, 1 << 30) {
            Err(AdminError::Inflated { bound, .. }) => assert_eq!(bound, DECOMPRESSION_FLOOR_BYTES),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_negative_quota_is_named() {
        let body = br#"{"version":2,"purchases":[{"id":"p","group_id":"g","app_id":"a","state":"active","start_time":0,"expire_time":1,"quota_limit":-1}]}"#;
        match decode_snapshot(&HeaderMap::new(), body, 1 << 20) {
            Err(AdminError::Decode { path, .. }) => assert_eq!(path, "purchases[0].quota_limit"),
            other => panic!("{other:?}"),
        }
    }
}
