//! The control plane's Prometheus metrics (CONTRACT §9, `deploy/metrics.txt`), in a registry
//! of its own per [`super::ControlPlane`] (tests open many; `serve` exposes it beside the
//! proxy's).
//!
//! Owns `marketgate_control_snapshot_version`, the subscriptions' metrics
//! ([`SubscriptionMetrics`]: `marketgate_proxy_acked_version{proxy}`,
//! `marketgate_control_snapshots_sent_total{kind}`, …)
//! and `marketgate_quota_calls_left{purchase}`, which is computed from the state when scraped.
//! It never changes the state.
//!
//! It also owns the control plane's request metrics and access log ([`observe`], a layer on
//! the market and management router): one `control_access` line and one count and duration
//! per request (method, route template, status), auth failures and unknown routes included.

use std::sync::{Arc, Weak};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State as AxState};
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use std::sync::Mutex;

use super::subscriptions::SubscriptionMetrics;
use super::Cache;
use crate::metrics_text::Family;

/// `marketgate_quota_calls_left` covers only this many purchases: those with the most used
/// calls (the busy ones an operator watches), so a large market does not make a series per
/// purchase. `GET /v1/usage`-style detail belongs to the store, not to Prometheus.
pub const CALLS_LEFT_TOP: usize = 50;

/// Every metric of one control plane.
#[derive(Debug, Clone)]
pub struct ControlMetrics {
    registry: Registry,
    pub snapshot_version: IntGauge,
    pub subscriptions: SubscriptionMetrics,
    pub requests: RequestMetrics,
    /// The control and admin listeners' accept-loop counters (`crate::accept`).
    pub accept: crate::accept::AcceptMetrics,
}

impl ControlMetrics {
    /// Registers every control metric in a fresh registry; `calls_left` reads the `cache` at
    /// scrape time (a weak handle: the registry must not keep the cache alive).
    pub fn new(cache: &Arc<Mutex<Cache>>) -> ControlMetrics {
        let registry = Registry::new();
        let snapshot_version = IntGauge::new(
            "marketgate_control_snapshot_version",
            "The latest snapshot version the control plane has built",
        )
        .expect("valid metric");
        registry
            .register(Box::new(snapshot_version.clone()))
            .expect("metric names are unique");
        let subscriptions =
            SubscriptionMetrics::register(&registry).expect("metric names are unique");
        let requests = RequestMetrics::register(&registry).expect("metric names are unique");
        registry
            .register(Box::new(CallsLeft::new(Arc::downgrade(cache))))
            .expect("metric names are unique");
        let accept = crate::accept::AcceptMetrics::new();
        accept.register(&registry).expect("metric names are unique");
        ControlMetrics {
            registry,
            snapshot_version,
            subscriptions,
            requests,
            accept,
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text format. A labelled family with no series yet (no proxy acked, no
    /// purchase with a quota) is still announced by its `# HELP` and `# TYPE` lines, which
    /// `Registry::gather` would drop: dashboards and `deploy/check-metrics.sh` look for them.
    pub fn render(&self) -> String {
        crate::metrics_text::render(&[&self.registry], &LABELLED_FAMILIES)
    }
}

/// The control plane's labelled families, announced even before their first series.
pub const LABELLED_FAMILIES: [Family; 4] = [
    (
        SubscriptionMetrics::ACKED_NAME,
        SubscriptionMetrics::ACKED_HELP,
        "gauge",
    ),
    (CALLS_LEFT_NAME, CALLS_LEFT_HELP, "gauge"),
    (REQUESTS_NAME, REQUESTS_HELP, "counter"),
    (DURATION_NAME, DURATION_HELP, "histogram"),
];

const REQUESTS_NAME: &str = "marketgate_control_requests_total";
const REQUESTS_HELP: &str =
    "Market and management API requests by method, route template and HTTP status";
const DURATION_NAME: &str = "marketgate_control_request_duration_seconds";
const DURATION_HELP: &str =
    "Market and management API request latency by method and route template";
/// Upper bounds of the request duration buckets, in seconds: a read answers in
/// milliseconds, a durable write waits for a commit (an fsync or a PostgreSQL round trip).
const DURATION_BUCKETS_SECS: [f64; 10] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];
/// The route label of a request that matched no route (answered 404 APIG.0101).
const UNMATCHED_ROUTE: &str = "unmatched";

/// `marketgate_control_requests_total{method,route,status}` and
/// `marketgate_control_request_duration_seconds{method,route}`. Label values come from the
/// code (route templates, known methods, statuses), never from raw request input.
#[derive(Debug, Clone)]
pub struct RequestMetrics {
    total: IntCounterVec,
    duration: HistogramVec,
}

impl RequestMetrics {
    fn register(registry: &Registry) -> prometheus::Result<RequestMetrics> {
        let total = IntCounterVec::new(
            Opts::new(REQUESTS_NAME, REQUESTS_HELP),
            &["method", "route", "status"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(DURATION_NAME, DURATION_HELP)
                .buckets(DURATION_BUCKETS_SECS.to_vec()),
            &["method", "route"],
        )?;
        registry.register(Box::new(total.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        Ok(RequestMetrics { total, duration })
    }

    fn record(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let status = status.to_string();
        self.total
            .with_label_values(&[method, route, &status])
            .inc();
        self.duration
            .with_label_values(&[method, route])
            .observe(seconds);
    }
}

/// The APIG error code and message of an error answer, left on the response by
/// [`super::error::ControlError`] for [`observe`] to log.
#[derive(Debug, Clone)]
pub struct AnsweredError {
    pub code: &'static str,
    pub message: String,
}

/// The method as a label: the ones the API has, else `other` (a label never holds raw input).
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// The layer around the market and management router: one `control_access` log line and one
/// count and duration per request. It reads no body and no credential header; the path is
/// logged (ids only), the query string is not.
pub async fn observe(
    AxState(metrics): AxState<ControlMetrics>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    let elapsed = started.elapsed();
    let route = route.as_deref().unwrap_or(UNMATCHED_ROUTE);
    let status = response.status().as_u16();
    metrics
        .requests
        .record(method, route, status, elapsed.as_secs_f64());
    let error = response.extensions().get::<AnsweredError>();
    tracing::info!(
        target: "control_access",
        request_id = response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or(""),
        method,
        route,
        path = path.as_str(),
        status,
        error_code = error.map(|e| e.code),
        error = error.map(|e| e.message.as_str()),
        duration_ms = elapsed.as_secs_f64() * 1000.0,
    );
    response
}

const CALLS_LEFT_NAME: &str = "marketgate_quota_calls_left";
const CALLS_LEFT_HELP: &str =
    "Calls left in the ledger (bought minus used) of the 50 purchases with the most used calls";

/// `marketgate_quota_calls_left{purchase}`, computed from the state at each scrape.
struct CallsLeft {
    cache: Weak<Mutex<Cache>>,
    gauge: IntGaugeVec,
}

impl CallsLeft {
    fn new(cache: Weak<Mutex<Cache>>) -> CallsLeft {
        let gauge = IntGaugeVec::new(Opts::new(CALLS_LEFT_NAME, CALLS_LEFT_HELP), &["purchase"])
            .expect("valid metric");
        CallsLeft { cache, gauge }
    }

    fn refresh(&self) {
        let Some(cache) = self.cache.upgrade() else {
            return;
        };
        // A view: the cache's lock is held for a clone, not for the computation.
        let state = cache.lock().expect("cache lock").view();
        let mut limited: Vec<_> = state
            .purchases
            .values()
            .filter_map(|p| Some((p.quota_used, p.purchase_id.as_str(), p.calls_left()?)))
            .collect();
        // Most used first; ties by id so the set is stable between scrapes.
        limited.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
        self.gauge.reset();
        for (_, id, left) in limited.into_iter().take(CALLS_LEFT_TOP) {
            self.gauge
                .with_label_values(&[id])
                .set(i64::try_from(left).unwrap_or(i64::MAX));
        }
    }
}

impl Collector for CallsLeft {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.refresh();
        self.gauge.collect()
    }
}
