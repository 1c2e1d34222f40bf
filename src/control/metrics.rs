//! The control plane's Prometheus metrics (CONTRACT §9, `deploy/metrics.txt`), in a registry
//! of its own per [`super::ControlPlane`] (tests open many; `serve` exposes it beside the
//! proxy's).
//!
//! Owns `marketgate_control_snapshot_version`, the pushers' metrics ([`PushMetrics`]:
//! `marketgate_proxy_acked_version{proxy}`, `marketgate_control_snapshot_pushes_total{result}`)
//! and `marketgate_quota_calls_left{purchase}`, which is computed from the state when scraped.
//! It never changes the state.

use std::sync::{Arc, Weak};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntGauge, IntGaugeVec, Opts, Registry};
use tokio::sync::Mutex;

use super::push::PushMetrics;
use super::state::State;
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
    pub push: PushMetrics,
}

impl ControlMetrics {
    /// Registers every control metric in a fresh registry; `calls_left` reads `state` at
    /// scrape time (a weak handle: the registry must not keep the state alive).
    pub fn new(state: &Arc<Mutex<State>>) -> ControlMetrics {
        let registry = Registry::new();
        let snapshot_version = IntGauge::new(
            "marketgate_control_snapshot_version",
            "The latest snapshot version the control plane has built",
        )
        .expect("valid metric");
        registry
            .register(Box::new(snapshot_version.clone()))
            .expect("metric names are unique");
        let push = PushMetrics::register(&registry).expect("metric names are unique");
        registry
            .register(Box::new(CallsLeft::new(Arc::downgrade(state))))
            .expect("metric names are unique");
        ControlMetrics {
            registry,
            snapshot_version,
            push,
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
pub const LABELLED_FAMILIES: [Family; 2] = [
    (PushMetrics::ACKED_NAME, PushMetrics::ACKED_HELP, "gauge"),
    (CALLS_LEFT_NAME, CALLS_LEFT_HELP, "gauge"),
];

const CALLS_LEFT_NAME: &str = "marketgate_quota_calls_left";
const CALLS_LEFT_HELP: &str =
    "Calls left in the ledger (bought minus used) of the 50 purchases with the most used calls";

/// `marketgate_quota_calls_left{purchase}`, computed from the state at each scrape.
struct CallsLeft {
    state: Weak<Mutex<State>>,
    /// The last values computed; served again when a write holds the state lock at scrape
    /// time (collecting cannot wait: it is synchronous).
    gauge: IntGaugeVec,
}

impl CallsLeft {
    fn new(state: Weak<Mutex<State>>) -> CallsLeft {
        let gauge = IntGaugeVec::new(Opts::new(CALLS_LEFT_NAME, CALLS_LEFT_HELP), &["purchase"])
            .expect("valid metric");
        CallsLeft { state, gauge }
    }

    fn refresh(&self) {
        let Some(state) = self.state.upgrade() else {
            return;
        };
        let Ok(state) = state.try_lock() else {
            return;
        };
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
