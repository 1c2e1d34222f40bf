//! The data plane's Prometheus metrics (CONTRACT §9), one registry per [`super::Gateway`].
//!
//! Owns metric definitions and the per-group handles a compiled snapshot holds. Label values
//! come from the snapshot (group ids) or from fixed sets ([`Outcome`]), never from request
//! input; handles are resolved when a snapshot is compiled, never per request.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// How a request ended, the `outcome` label of `marketgate_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    NoRoute,
    AuthFailed,
    NotAuthorized,
    Delisted,
    QuotaExhausted,
    Frozen,
    BackendError,
    BackendTimeout,
    BadRequest,
    NotReady,
    Internal,
}

impl Outcome {
    pub const ALL: [Outcome; 12] = [
        Outcome::Ok,
        Outcome::NoRoute,
        Outcome::AuthFailed,
        Outcome::NotAuthorized,
        Outcome::Delisted,
        Outcome::QuotaExhausted,
        Outcome::Frozen,
        Outcome::BackendError,
        Outcome::BackendTimeout,
        Outcome::BadRequest,
        Outcome::NotReady,
        Outcome::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::NoRoute => "no_route",
            Outcome::AuthFailed => "auth_failed",
            Outcome::NotAuthorized => "not_authorized",
            Outcome::Delisted => "delisted",
            Outcome::QuotaExhausted => "quota_exhausted",
            Outcome::Frozen => "frozen",
            Outcome::BackendError => "backend_error",
            Outcome::BackendTimeout => "backend_timeout",
            Outcome::BadRequest => "bad_request",
            Outcome::NotReady => "not_ready",
            Outcome::Internal => "internal",
        }
    }

    fn index(self) -> usize {
        Outcome::ALL
            .iter()
            .position(|o| *o == self)
            .expect("ALL lists every outcome")
    }
}

/// Counters of one group, one per outcome, resolved at compile time.
#[derive(Debug, Clone)]
pub struct GroupCounters {
    by_outcome: Vec<IntCounter>,
}

impl GroupCounters {
    pub fn count(&self, outcome: Outcome) {
        self.by_outcome[outcome.index()].inc();
    }
}

/// Every metric of one gateway.
#[derive(Debug, Clone)]
pub struct GatewayMetrics {
    registry: Registry,
    requests: IntCounterVec,
    pub request_duration: Histogram,
    pub upstream_duration: Histogram,
    pub snapshot_version: IntGauge,
    pub snapshot_applied: IntGauge,
    pub snapshot_push: IntCounterVec,
    pub quota_lease_requests: IntCounterVec,
    /// Calls this proxy holds in leases, per purchase (only purchases with a live lease).
    pub lease_calls_held: IntGaugeVec,
    pub quota_journal_errors: IntCounter,
    pub connections_active: IntGauge,
    /// Requests that resolved to no group (label `group=""`).
    pub no_group: GroupCounters,
}

impl GatewayMetrics {
    pub fn new() -> GatewayMetrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "marketgate_requests_total",
                "Buyer requests by group and outcome",
            ),
            &["group", "outcome"],
        )
        .expect("valid metric");
        let request_duration = Histogram::with_opts(HistogramOpts::new(
            "marketgate_request_duration_seconds",
            "Time from request head to response head",
        ))
        .expect("valid metric");
        let upstream_duration = Histogram::with_opts(HistogramOpts::new(
            "marketgate_upstream_duration_seconds",
            "Time the backend took to answer",
        ))
        .expect("valid metric");
        let snapshot_version = IntGauge::new(
            "marketgate_snapshot_version",
            "Version of the snapshot served",
        )
        .expect("valid metric");
        let snapshot_applied = IntGauge::new(
            "marketgate_snapshot_applied_timestamp_seconds",
            "When the served snapshot was applied",
        )
        .expect("valid metric");
        let snapshot_push = IntCounterVec::new(
            Opts::new(
                "marketgate_snapshot_push_total",
                "Snapshot pushes by result",
            ),
            &["result"],
        )
        .expect("valid metric");
        let quota_lease_requests = IntCounterVec::new(
            Opts::new(
                "marketgate_quota_lease_requests_total",
                "Quota lease requests by result",
            ),
            &["result"],
        )
        .expect("valid metric");
        let lease_calls_held = IntGaugeVec::new(
            Opts::new(
                "marketgate_quota_lease_calls_held",
                "Unspent calls this proxy holds in leases, per purchase",
            ),
            &["purchase"],
        )
        .expect("valid metric");
        let quota_journal_errors = IntCounter::new(
            "marketgate_quota_journal_errors_total",
            "Failed writes or fsyncs of the quota journal or lease state",
        )
        .expect("valid metric");
        let connections_active =
            IntGauge::new("marketgate_connections_active", "Open buyer connections")
                .expect("valid metric");
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_duration.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(snapshot_version.clone()),
            Box::new(snapshot_applied.clone()),
            Box::new(snapshot_push.clone()),
            Box::new(quota_lease_requests.clone()),
            Box::new(lease_calls_held.clone()),
            Box::new(quota_journal_errors.clone()),
            Box::new(connections_active.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        // Every push result is exported from the start, at 0 (labels as in deploy/metrics.txt).
        for result in ["applied", "rejected", "stale", "error"] {
            snapshot_push.with_label_values(&[result]);
        }
        let no_group = Self::counters_for(&requests, "");
        GatewayMetrics {
            registry,
            requests,
            request_duration,
            upstream_duration,
            snapshot_version,
            snapshot_applied,
            snapshot_push,
            quota_lease_requests,
            lease_calls_held,
            quota_journal_errors,
            connections_active,
            no_group,
        }
    }

    fn counters_for(requests: &IntCounterVec, group: &str) -> GroupCounters {
        GroupCounters {
            by_outcome: Outcome::ALL
                .iter()
                .map(|o| requests.with_label_values(&[group, o.as_str()]))
                .collect(),
        }
    }

    /// Handles of a group (compile time).
    pub fn group(&self, group_id: &str) -> GroupCounters {
        Self::counters_for(&self.requests, group_id)
    }

    /// The Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("text format is UTF-8")
    }
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self::new()
    }
}
