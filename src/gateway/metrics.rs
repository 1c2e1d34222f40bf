//! The data plane's Prometheus metrics (CONTRACT §9), one registry per [`super::Gateway`].
//!
//! Owns metric definitions and the per-group handles a compiled snapshot holds. Label values
//! come from the snapshot (group ids, certificate domains) or from fixed sets ([`Outcome`]),
//! never from request input; handles are resolved when a snapshot is compiled, never per
//! request.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::metrics_text::Family;

const REQUESTS: Family = (
    "marketgate_requests_total",
    "Buyer requests by group and outcome",
    "counter",
);
const REQUEST_DURATION: Family = (
    "marketgate_request_duration_seconds",
    "Time from request head to response head, by group",
    "histogram",
);
const UPSTREAM_DURATION: Family = (
    "marketgate_upstream_duration_seconds",
    "Time the backend took to answer, by group",
    "histogram",
);
const SNAPSHOT_PUSH: Family = (
    "marketgate_snapshot_push_total",
    "Snapshot pushes by result",
    "counter",
);
const QUOTA_LEASE_REQUESTS: Family = (
    "marketgate_quota_lease_requests_total",
    "Quota lease requests by result",
    "counter",
);
const LEASE_CALLS_HELD: Family = (
    "marketgate_quota_lease_calls_held",
    "Unspent calls this proxy holds in leases, per purchase",
    "gauge",
);
const CONNECTIONS_ACCEPTED: Family = (
    "marketgate_connections_accepted_total",
    "Buyer connections accepted, by worker thread (gateway.workers)",
    "counter",
);
const TLS_CERTIFICATE_EXPIRY: Family = (
    "marketgate_tls_certificate_expiry_timestamp_seconds",
    "notAfter (unix time) of each certificate served, by domain (\"default\" for the configured one)",
    "gauge",
);

const THROTTLED: Family = (
    "marketgate_throttled_total",
    "Buyer calls refused by a request throttling policy (429 APIG.0308), by group and policy",
    "counter",
);

const GROUP_INFO: Family = (
    "marketgate_group_info",
    "1 for each group the served snapshot holds, by id (group) and name: join on group to name any per-group series",
    "gauge",
);

/// The labelled families, which the text format would omit while they have no series.
pub const LABELLED_FAMILIES: [Family; 10] = [
    GROUP_INFO,
    REQUESTS,
    THROTTLED,
    CONNECTIONS_ACCEPTED,
    REQUEST_DURATION,
    UPSTREAM_DURATION,
    SNAPSHOT_PUSH,
    QUOTA_LEASE_REQUESTS,
    LEASE_CALLS_HELD,
    TLS_CERTIFICATE_EXPIRY,
];

/// The `domain` label of the configured default certificate.
pub const DEFAULT_CERTIFICATE_DOMAIN: &str = "default";

/// How a request ended, the `outcome` label of `marketgate_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    NoRoute,
    AuthFailed,
    NotAuthorized,
    Delisted,
    Throttled,
    QuotaExhausted,
    Frozen,
    BackendError,
    BackendTimeout,
    BadRequest,
    NotReady,
    Internal,
}

impl Outcome {
    pub const ALL: [Outcome; 13] = [
        Outcome::Ok,
        Outcome::NoRoute,
        Outcome::AuthFailed,
        Outcome::NotAuthorized,
        Outcome::Delisted,
        Outcome::Throttled,
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
            Outcome::Throttled => "throttled",
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

/// Metric handles of one group (a counter per outcome, the two latency histograms),
/// resolved at compile time.
#[derive(Debug, Clone)]
pub struct GroupCounters {
    by_outcome: Vec<IntCounter>,
    request_duration: Histogram,
    upstream_duration: Histogram,
}

impl GroupCounters {
    pub fn count(&self, outcome: Outcome) {
        self.by_outcome[outcome.index()].inc();
    }

    /// The whole request, as the buyer saw it.
    pub fn observe_request(&self, seconds: f64) {
        self.request_duration.observe(seconds);
    }

    /// The backend's part.
    pub fn observe_upstream(&self, seconds: f64) {
        self.upstream_duration.observe(seconds);
    }
}

/// A registry rendered beside the gateway's, with the families it announces while empty.
type AlsoRendered = (Registry, Vec<Family>);

/// Every metric of one gateway.
#[derive(Debug, Clone)]
pub struct GatewayMetrics {
    registry: Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    upstream_duration: HistogramVec,
    pub snapshot_version: IntGauge,
    pub snapshot_applied: IntGauge,
    pub snapshot_push: IntCounterVec,
    pub quota_lease_requests: IntCounterVec,
    /// Calls this proxy holds in leases, per purchase (only purchases with a live lease).
    pub lease_calls_held: IntGaugeVec,
    pub quota_journal_errors: IntCounter,
    pub connections_active: IntGauge,
    /// Connections accepted, by worker (resolved once per worker: [`Self::worker_accepted`]).
    connections_accepted: IntCounterVec,
    /// The accept loop's counters of every listener this process serves through the gateway.
    pub accept: crate::accept::AcceptMetrics,
    /// notAfter of each certificate served, by domain.
    tls_certificate_expiry: IntGaugeVec,
    /// notAfter of the configured default certificate (0: none), kept across snapshots.
    default_certificate_expiry: Arc<AtomicI64>,
    /// Calls refused by a request throttling policy, by group and policy.
    throttled: IntCounterVec,
    /// 1 per group served, labelled with its id and name (the info-metric pattern, so every
    /// other per-group series keeps one `group` label and joins on it for the name).
    group_info: IntGaugeVec,
    /// Requests that resolved to no group (label `group=""`).
    pub no_group: GroupCounters,
    /// Other registries rendered on this gateway's `/metrics` (`serve`: the control plane's).
    also: Arc<RwLock<Vec<AlsoRendered>>>,
}

impl GatewayMetrics {
    pub fn new() -> GatewayMetrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(Opts::new(REQUESTS.0, REQUESTS.1), &["group", "outcome"])
            .expect("valid metric");
        let request_duration = HistogramVec::new(
            HistogramOpts::new(REQUEST_DURATION.0, REQUEST_DURATION.1),
            &["group"],
        )
        .expect("valid metric");
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(UPSTREAM_DURATION.0, UPSTREAM_DURATION.1),
            &["group"],
        )
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
        let snapshot_push =
            IntCounterVec::new(Opts::new(SNAPSHOT_PUSH.0, SNAPSHOT_PUSH.1), &["result"])
                .expect("valid metric");
        let quota_lease_requests = IntCounterVec::new(
            Opts::new(QUOTA_LEASE_REQUESTS.0, QUOTA_LEASE_REQUESTS.1),
            &["result"],
        )
        .expect("valid metric");
        let lease_calls_held = IntGaugeVec::new(
            Opts::new(LEASE_CALLS_HELD.0, LEASE_CALLS_HELD.1),
            &["purchase"],
        )
        .expect("valid metric");
        let tls_certificate_expiry = IntGaugeVec::new(
            Opts::new(TLS_CERTIFICATE_EXPIRY.0, TLS_CERTIFICATE_EXPIRY.1),
            &["domain"],
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
        let connections_accepted = IntCounterVec::new(
            Opts::new(CONNECTIONS_ACCEPTED.0, CONNECTIONS_ACCEPTED.1),
            &["worker"],
        )
        .expect("valid metric");
        let throttled =
            IntCounterVec::new(Opts::new(THROTTLED.0, THROTTLED.1), &["group", "policy"])
                .expect("valid metric");
        let group_info =
            IntGaugeVec::new(Opts::new(GROUP_INFO.0, GROUP_INFO.1), &["group", "name"])
                .expect("valid metric");
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(group_info.clone()),
            Box::new(throttled.clone()),
            Box::new(request_duration.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(snapshot_version.clone()),
            Box::new(snapshot_applied.clone()),
            Box::new(snapshot_push.clone()),
            Box::new(quota_lease_requests.clone()),
            Box::new(lease_calls_held.clone()),
            Box::new(quota_journal_errors.clone()),
            Box::new(connections_active.clone()),
            Box::new(connections_accepted.clone()),
            Box::new(tls_certificate_expiry.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        let accept = crate::accept::AcceptMetrics::new();
        accept.register(&registry).expect("metric names are unique");
        // Every push result is exported from the start, at 0 (labels as in deploy/metrics.txt).
        for result in ["applied", "rejected", "stale", "error"] {
            snapshot_push.with_label_values(&[result]);
        }
        let no_group = Self::counters_for(&requests, &request_duration, &upstream_duration, "");
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
            connections_accepted,
            accept,
            tls_certificate_expiry,
            group_info,
            default_certificate_expiry: Arc::new(AtomicI64::new(0)),
            throttled,
            no_group,
            also: Arc::default(),
        }
    }

    fn counters_for(
        requests: &IntCounterVec,
        request_duration: &HistogramVec,
        upstream_duration: &HistogramVec,
        group: &str,
    ) -> GroupCounters {
        GroupCounters {
            by_outcome: Outcome::ALL
                .iter()
                .map(|o| requests.with_label_values(&[group, o.as_str()]))
                .collect(),
            request_duration: request_duration.with_label_values(&[group]),
            upstream_duration: upstream_duration.with_label_values(&[group]),
        }
    }

    /// `marketgate_throttled_total{group, policy}`: resolved at snapshot compile.
    pub fn throttled(&self, group: &str, policy: &str) -> IntCounter {
        self.throttled.with_label_values(&[group, policy])
    }

    /// The accepted-connections counter of worker `index` (resolved when the worker starts).
    pub fn worker_accepted(&self, index: usize) -> IntCounter {
        self.connections_accepted
            .with_label_values(&[&index.to_string()])
    }

    /// Handles of a group (compile time).
    pub fn group(&self, group_id: &str) -> GroupCounters {
        Self::counters_for(
            &self.requests,
            &self.request_duration,
            &self.upstream_duration,
            group_id,
        )
    }

    /// Records the configured default certificate's notAfter (unix seconds); it is exported
    /// as `domain="default"` now and after every snapshot.
    pub fn set_default_certificate_expiry(&self, not_after: i64) {
        self.default_certificate_expiry
            .store(not_after, Ordering::Relaxed);
        self.tls_certificate_expiry
            .with_label_values(&[DEFAULT_CERTIFICATE_DOMAIN])
            .set(not_after);
    }

    /// Replaces the per-domain certificate expiries with those of a snapshot being compiled
    /// (a domain whose certificate left the snapshot disappears), keeping the default one.
    pub fn set_certificate_expiries<'a>(&self, expiries: impl IntoIterator<Item = (&'a str, i64)>) {
        self.tls_certificate_expiry.reset();
        let default = self.default_certificate_expiry.load(Ordering::Relaxed);
        if default != 0 {
            self.tls_certificate_expiry
                .with_label_values(&[DEFAULT_CERTIFICATE_DOMAIN])
                .set(default);
        }
        for (domain, not_after) in expiries {
            self.tls_certificate_expiry
                .with_label_values(&[domain])
                .set(not_after);
        }
    }

    /// Replaces the group names with those of the snapshot being bound (a group that left the
    /// snapshot, or was renamed, loses its old series).
    pub fn set_group_names<'a>(&self, groups: impl IntoIterator<Item = (&'a str, &'a str)>) {
        self.group_info.reset();
        for (id, name) in groups {
            self.group_info.with_label_values(&[id, name]).set(1);
        }
    }

    /// This gateway's registry, for a process that renders several (`serve`).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Renders `registry` too on this gateway's `/metrics`, with `families` announced while
    /// empty: `serve` exports the control plane's metrics beside the proxy's on one listener.
    /// A family name must not be in both registries.
    pub fn also_render(&self, registry: Registry, families: &[Family]) {
        self.also
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push((registry, families.to_vec()));
    }

    /// The Prometheus text format, every family present even before its first series.
    pub fn render(&self) -> String {
        let also = self.also.read().unwrap_or_else(|e| e.into_inner());
        let mut registries = vec![&self.registry];
        let mut families = LABELLED_FAMILIES.to_vec();
        for (registry, declared) in also.iter() {
            registries.push(registry);
            families.extend_from_slice(declared);
        }
        crate::metrics_text::render(&registries, &families)
    }
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_gateway_announces_every_labelled_family() {
        let text = GatewayMetrics::new().render();
        for (name, _, kind) in LABELLED_FAMILIES {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name} missing from:\n{text}"
            );
        }
    }

    #[test]
    fn other_registries_render_beside_the_gateway() {
        let metrics = GatewayMetrics::new();
        let control = Registry::new();
        let acked = IntGaugeVec::new(Opts::new("c_acked", "acked"), &["proxy"]).unwrap();
        control.register(Box::new(acked)).unwrap();
        metrics.also_render(control, &[("c_acked", "acked", "gauge")]);
        let text = metrics.render();
        assert!(text.contains("# TYPE c_acked gauge\n"));
        assert!(text.contains("# TYPE marketgate_requests_total counter\n"));
    }

    #[test]
    fn latency_is_observed_per_group_through_compiled_handles() {
        let metrics = GatewayMetrics::new();
        let group = metrics.group("g1");
        group.observe_request(0.25);
        group.observe_upstream(0.2);
        let text = metrics.render();
        assert!(text.contains("marketgate_request_duration_seconds_count{group=\"g1\"} 1"));
        assert!(text.contains("marketgate_upstream_duration_seconds_count{group=\"g1\"} 1"));
    }

    #[test]
    fn group_names_follow_the_snapshot() {
        let metrics = GatewayMetrics::new();
        metrics.set_group_names([("g1", "weather"), ("g2", "maps")]);
        metrics.set_group_names([("g2", "maps-v2")]);
        let text = metrics.render();
        let name = GROUP_INFO.0;
        assert!(text.contains(&format!("{name}{{group=\"g2\",name=\"maps-v2\"}} 1\n")));
        assert!(!text.contains("weather"), "a group that left the snapshot");
        assert!(
            !text.contains("name=\"maps\""),
            "a renamed group's old name"
        );
    }

    #[test]
    fn certificate_expiries_follow_the_snapshot_and_keep_the_default() {
        let metrics = GatewayMetrics::new();
        metrics.set_default_certificate_expiry(100);
        metrics.set_certificate_expiries([("a.example", 200), ("b.example", 300)]);
        metrics.set_certificate_expiries([("b.example", 301)]);
        let text = metrics.render();
        let name = TLS_CERTIFICATE_EXPIRY.0;
        assert!(text.contains(&format!("{name}{{domain=\"default\"}} 100\n")));
        assert!(text.contains(&format!("{name}{{domain=\"b.example\"}} 301\n")));
        assert!(
            !text.contains("a.example"),
            "a certificate that left the snapshot"
        );
    }
}
