//! Pushing snapshots from the control plane to every proxy in `[[control.proxies]]`.
//!
//! One task per proxy follows the control plane's version channel. After a change it waits
//! `control.push_debounce` so that a burst of changes becomes one push, then sends a delta
//! (`PATCH /v1/snapshot`) when the proxy is known to hold the previous version, else the full
//! snapshot (`PUT /v1/snapshot`, gzip). A 409 on a delta falls back to a full push; a failure
//! retries with exponential backoff. Every [`RESYNC_INTERVAL`] the task also asks the proxy
//! for its version, so a proxy that restarted empty or was restored from an old disk copy is
//! brought up to date without waiting for the next change.
//!
//! It owns the per-proxy status shown at `GET /v1/proxies` and the push metrics
//! (`marketgate_control_snapshot_pushes_total{result}`, `marketgate_proxy_acked_version{proxy}`;
//! the proxy counts what it receives in `marketgate_snapshot_push_total`). It does not build
//! snapshots ([`SnapshotSource`] does) and never changes the store.

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use serde::Serialize;
use tokio::sync::watch;

use crate::config::ProxyTarget;
use crate::shutdown::Shutdown;
use crate::snapshot::delta;
use crate::snapshot::Snapshot;

/// How often a pusher checks a quiet proxy's version, in seconds.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(5);
/// First retry delay after a failed push; doubles up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A push that takes longer than this fails (and is retried).
pub const PUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// A delta carrying more than this share of the snapshot's entities is sent full instead.
const DELTA_MAX_SHARE: f64 = 0.5;

/// Where pushers get snapshots from: the control plane.
#[async_trait::async_trait]
pub trait SnapshotSource: Send + Sync + 'static {
    /// Fires with the new version after every change that affects the data plane.
    fn subscribe(&self) -> watch::Receiver<u64>;
    /// The current full snapshot.
    async fn snapshot(&self) -> Arc<Snapshot>;
    /// A proxy holds `seen`, a version this source did not make (its store was restored from
    /// an older backup, or someone pushed to the proxy directly): move the version past it so
    /// that the next snapshot replaces it. Returns the new version.
    async fn move_version_past(&self, seen: u64) -> Result<u64, super::ControlError>;
}

/// What the control plane knows about one proxy (`GET /v1/proxies`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProxyStatus {
    pub admin_url: String,
    /// The proxy's `[proxy] node_id`, once one of its answers named it.
    pub node_id: Option<String>,
    /// The last version the proxy acknowledged.
    pub acked_version: Option<u64>,
    /// RFC 3339 UTC.
    pub acked_at: Option<String>,
    pub last_error: Option<String>,
    pub pushes_ok: u64,
    pub pushes_failed: u64,
}

/// The shared view of every proxy's status.
#[derive(Debug, Clone, Default)]
pub struct PushStatus(Arc<Mutex<Vec<ProxyStatus>>>);

impl PushStatus {
    /// No proxies (`serve`, where the data plane is in the same process).
    pub fn none() -> PushStatus {
        PushStatus::default()
    }

    pub fn all(&self) -> Vec<ProxyStatus> {
        self.0.lock().expect("push status lock").clone()
    }

    fn update(&self, index: usize, change: impl FnOnce(&mut ProxyStatus)) {
        if let Some(status) = self.0.lock().expect("push status lock").get_mut(index) {
            change(status);
        }
    }
}

/// Push metrics, registered once per control plane.
#[derive(Debug, Clone)]
pub struct PushMetrics {
    pushes: IntCounterVec,
    acked: IntGaugeVec,
}

impl PushMetrics {
    pub const PUSHES_NAME: &'static str = "marketgate_control_snapshot_pushes_total";
    pub const ACKED_NAME: &'static str = "marketgate_proxy_acked_version";
    pub const ACKED_HELP: &'static str =
        "Snapshot version each proxy last acknowledged (proxy = node id, else admin_url)";
    /// Values of the `result` label: a full push acked, a delta acked, a delta refused
    /// with 409 (a full push follows), a push refused as invalid (400), any other failure
    /// (unreachable, timeout, 401, 5xx).
    pub const RESULTS: [&'static str; 5] = ["ok", "delta_ok", "conflict", "rejected", "failed"];

    pub fn register(registry: &Registry) -> prometheus::Result<PushMetrics> {
        let pushes = IntCounterVec::new(
            Opts::new(
                Self::PUSHES_NAME,
                "Snapshot pushes to proxies by result (ok, delta_ok, conflict, rejected, failed)",
            ),
            &["result"],
        )?;
        // Every result is exported from the start, at 0, so that rates and alerts see it.
        for result in Self::RESULTS {
            pushes.with_label_values(&[result]);
        }
        let acked = IntGaugeVec::new(Opts::new(Self::ACKED_NAME, Self::ACKED_HELP), &["proxy"])?;
        registry.register(Box::new(pushes.clone()))?;
        registry.register(Box::new(acked.clone()))?;
        Ok(PushMetrics { pushes, acked })
    }

    /// A push's result, one of [`PushMetrics::RESULTS`].
    pub fn pushes(&self, result: &str) -> u64 {
        self.pushes.with_label_values(&[result]).get()
    }
}

/// Starts one pusher per target; they stop when `shutdown` fires.
pub fn spawn_pushers(
    source: Arc<dyn SnapshotSource>,
    targets: &[ProxyTarget],
    admin_token: String,
    debounce: Duration,
    metrics: PushMetrics,
    shutdown: Shutdown,
) -> PushStatus {
    let status = PushStatus(Arc::new(Mutex::new(
        targets
            .iter()
            .map(|t| ProxyStatus {
                admin_url: t.admin_url.clone(),
                ..ProxyStatus::default()
            })
            .collect(),
    )));
    let client = Client::builder(TokioExecutor::new()).build_http();
    for (index, target) in targets.iter().enumerate() {
        let pusher = Pusher {
            index,
            admin_url: target.admin_url.trim_end_matches('/').to_owned(),
            token: admin_token.clone(),
            client: client.clone(),
            status: status.clone(),
            metrics: metrics.clone(),
            acked: None,
            label: target.admin_url.clone(),
        };
        let source = source.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = pusher.run(source, debounce) => {}
                _ = shutdown.wait() => {}
            }
        });
    }
    status
}

/// Why one push attempt failed.
#[derive(Debug, thiserror::Error)]
enum PushError {
    #[error("proxy unreachable: {0}")]
    Unreachable(#[source] hyper_util::client::legacy::Error),
    #[error("reading the proxy's answer: {0}")]
    Body(#[source] hyper::Error),
    #[error("proxy refused the snapshot ({status}): {body}")]
    Refused { status: StatusCode, body: String },
    #[error("proxy holds another base version")]
    Conflict,
    #[error("push timed out after {0:?}")]
    Timeout(Duration),
}

struct Pusher {
    index: usize,
    admin_url: String,
    token: String,
    client: Client<HttpConnector, Full<Bytes>>,
    status: PushStatus,
    metrics: PushMetrics,
    /// The snapshot the proxy acknowledged last, the base for the next delta.
    acked: Option<Arc<Snapshot>>,
    /// The `proxy` label of `marketgate_proxy_acked_version`: the admin URL until the proxy
    /// names its node id.
    label: String,
}

/// What a proxy answers to a push or a version query.
#[derive(Debug, Default, serde::Deserialize)]
struct ProxyAnswer {
    version: Option<u64>,
    node_id: Option<String>,
}

impl Pusher {
    async fn run(mut self, source: Arc<dyn SnapshotSource>, debounce: Duration) {
        let mut versions = source.subscribe();
        let mut backoff = FIRST_BACKOFF;
        loop {
            let current = *versions.borrow_and_update();
            let up_to_date = self.acked.as_ref().map(|s| s.version) == Some(current);
            if !up_to_date {
                tokio::time::sleep(debounce).await;
                let snapshot = source.snapshot().await;
                match self.push(&snapshot, source.as_ref()).await {
                    Ok(()) => {
                        backoff = FIRST_BACKOFF;
                        continue;
                    }
                    Err(error) => {
                        tracing::warn!(proxy = %self.admin_url, %error, "snapshot push failed");
                        let result = match &error {
                            PushError::Refused { status, .. }
                                if *status == StatusCode::BAD_REQUEST =>
                            {
                                "rejected"
                            }
                            _ => "failed",
                        };
                        self.metrics.pushes.with_label_values(&[result]).inc();
                        self.status.update(self.index, |s| {
                            s.last_error = Some(error.to_string());
                            s.pushes_failed += 1;
                        });
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = versions.changed() => {}
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                }
            }
            tokio::select! {
                changed = versions.changed() => {
                    if changed.is_err() {
                        return; // the control plane is gone
                    }
                }
                _ = tokio::time::sleep(RESYNC_INTERVAL) => {
                    let held = self.proxy_version().await;
                    if held != self.acked.as_ref().map(|s| s.version) {
                        // Restarted empty or restored from an old disk copy: the next push
                        // is full (the loop sees that the proxy is not up to date).
                        tracing::info!(proxy = %self.admin_url, ?held, "proxy lost its snapshot: resyncing");
                        self.acked = None;
                    }
                }
            }
        }
    }

    /// Sends `snapshot`, as a delta when that is possible and worth it.
    async fn push(
        &mut self,
        snapshot: &Arc<Snapshot>,
        source: &dyn SnapshotSource,
    ) -> Result<(), PushError> {
        if let Some(base) = self.acked.clone() {
            let delta = delta::diff(&base, snapshot);
            let entities =
                snapshot.groups.len() + snapshot.apps.len() + snapshot.purchases.len() + 1;
            if (delta.len() as f64) <= DELTA_MAX_SHARE * entities as f64 {
                let body = serde_json::to_vec(&delta).expect("a delta serializes");
                match self.send(Method::PATCH, body).await {
                    Ok(answer) => {
                        self.acknowledged(snapshot.clone(), answer, "delta_ok");
                        return Ok(());
                    }
                    Err(PushError::Conflict) => {
                        self.metrics.pushes.with_label_values(&["conflict"]).inc();
                    }
                    Err(other) => return Err(other),
                }
            }
        }
        let body = serde_json::to_vec(snapshot.as_ref()).expect("a snapshot serializes");
        match self.send(Method::PUT, body).await {
            Ok(answer) => {
                self.acknowledged(snapshot.clone(), answer, "ok");
                Ok(())
            }
            // The proxy already holds this version or a newer one (pushed by an earlier
            // control plane process): treat as acknowledged if it says so.
            Err(PushError::Conflict) => match self.proxy_answer().await {
                Some(answer) if answer.version == Some(snapshot.version) => {
                    self.acknowledged(snapshot.clone(), answer, "ok");
                    Ok(())
                }
                // Ahead of every version this control plane made: the proxy serves a
                // snapshot that is not the market's. Never leave it there: move the version
                // past it; the next push (a new version) replaces it.
                Some(ProxyAnswer {
                    version: Some(held),
                    ..
                }) if held > snapshot.version => {
                    match source.move_version_past(held).await {
                        Ok(version) => tracing::error!(
                            proxy = %self.admin_url,
                            held,
                            control = snapshot.version,
                            now = version,
                            "the proxy holds a version this control plane did not make: moving the version past it"
                        ),
                        Err(error) => tracing::error!(
                            proxy = %self.admin_url,
                            held,
                            %error,
                            "the proxy holds a version this control plane did not make, and the version could not be moved past it"
                        ),
                    }
                    Err(PushError::Conflict)
                }
                _ => Err(PushError::Conflict),
            },
            Err(other) => Err(other),
        }
    }

    fn acknowledged(&mut self, snapshot: Arc<Snapshot>, answer: ProxyAnswer, result: &str) {
        let version = snapshot.version;
        self.acked = Some(snapshot);
        self.metrics.pushes.with_label_values(&[result]).inc();
        if let Some(node) = answer.node_id.as_deref().filter(|n| !n.is_empty()) {
            if node != self.label {
                // One series per proxy: the admin-URL one goes when the node id is known.
                let _ = self.metrics.acked.remove_label_values(&[&self.label]);
                self.label = node.to_owned();
            }
        }
        self.metrics
            .acked
            .with_label_values(&[&self.label])
            .set(version as i64);
        let node_id = answer.node_id;
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        self.status.update(self.index, |s| {
            if node_id.is_some() {
                s.node_id = node_id;
            }
            s.acked_version = Some(version);
            s.acked_at = Some(now);
            s.last_error = None;
            s.pushes_ok += 1;
        });
    }

    async fn send(&self, method: Method, json: Vec<u8>) -> Result<ProxyAnswer, PushError> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(&json).expect("writing to memory");
        let body = encoder.finish().expect("writing to memory");
        let request = Request::builder()
            .method(method)
            .uri(format!("{}/v1/snapshot", self.admin_url))
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::CONTENT_ENCODING, "gzip")
            .body(Full::new(Bytes::from(body)))
            .expect("a valid request");
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(PushError::Unreachable)?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(PushError::Body)?
                .to_bytes();
            match status {
                // An answer without a body (an older proxy) is still an ack.
                s if s.is_success() => Ok(serde_json::from_slice(&body).unwrap_or_default()),
                StatusCode::CONFLICT => Err(PushError::Conflict),
                status => {
                    let body = String::from_utf8_lossy(&body).into_owned();
                    Err(PushError::Refused { status, body })
                }
            }
        };
        tokio::time::timeout(PUSH_TIMEOUT, exchange)
            .await
            .map_err(|_| PushError::Timeout(PUSH_TIMEOUT))?
    }

    /// The proxy's current version, `None` when it has none or cannot be asked.
    async fn proxy_version(&self) -> Option<u64> {
        self.proxy_answer().await.and_then(|a| a.version)
    }

    /// `GET /v1/snapshot/version` on the proxy, `None` when it cannot be asked.
    async fn proxy_answer(&self) -> Option<ProxyAnswer> {
        let request = Request::builder()
            .uri(format!("{}/v1/snapshot/version", self.admin_url))
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .body(Full::new(Bytes::new()))
            .ok()?;
        let response = tokio::time::timeout(PUSH_TIMEOUT, self.client.request(request))
            .await
            .ok()?
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        let body = response.into_body().collect().await.ok()?.to_bytes();
        serde_json::from_slice(&body).ok()
    }
}
