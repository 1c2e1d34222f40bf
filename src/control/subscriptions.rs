//! Proxies subscribe to the control plane (docs/snapshot-protocol.md, `crate::feed`): each
//! version is published once, and every proxy in touch is listed.
//!
//! - **Built once.** One publisher task follows the version channel. After a change it waits
//!   `control.push_debounce` (a burst of changes becomes one version to send), takes a view
//!   of the state (no lock is held: the view is a clone of persistent maps), and then, off
//!   the async threads, builds the snapshot once from it (`publish::build`), diffs it against
//!   the previous one, hashes it and gzips both the full snapshot and the delta. The result, a [`Published`], is shared
//!   by every subscriber as an `Arc` with its bytes: a thousand proxies cost one build per
//!   version, and market writes and lease exchanges never wait on serialization or gzip.
//! - **Subscriptions.** A poll ([`crate::feed::Poll`]) is answered at once when something is
//!   newer than what the proxy serves, else held until there is (or a while, then 204). A
//!   delta is sent only to a proxy that serves exactly its base, version and content hash;
//!   any other proxy gets the full snapshot.
//! - **Proxies in touch.** Every poll is an ack: node id, incarnation, version and content
//!   hash, when. A proxy silent for `control.proxy_expiry_secs` leaves the list, and its
//!   node id is free again; until then another incarnation claiming it is refused
//!   ([`ControlError::NodeIdInUse`]) here and on the lease exchange.
//!
//! Metrics: `marketgate_proxy_acked_version{proxy}` per proxy in touch (removed when it
//! leaves), `marketgate_control_snapshots_sent_total{kind}`,
//! `marketgate_control_content_mismatches_total`, `marketgate_control_proxies`. It never
//! changes the store.

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use serde::Serialize;
use tokio::sync::watch;

use super::state::now_rfc3339;
use super::store::nodes::NodeClaim;
use super::{ControlError, ControlPlane};
use crate::feed::{ContentHash, Poll};
use crate::shutdown::Shutdown;
use crate::snapshot::delta;
use crate::snapshot::Snapshot;

/// The longest a poll is held with nothing to send; shorter when `control.proxy_expiry_secs`
/// is short (a third of it), so that a healthy proxy never looks silent.
pub const POLL_HOLD: Duration = Duration::from_secs(20);
/// A node id's claim confirmed by the store is asked again after this share of
/// `control.proxy_expiry_secs` (a busy proxy costs the store one small write per interval,
/// not one per lease exchange).
const CLAIM_REFRESH: f64 = 0.25;
/// A delta carrying more than this share of the snapshot's entities is not built: the full
/// snapshot is sent instead.
const DELTA_MAX_SHARE: f64 = 0.5;

/// One version, built once and shared by every subscriber.
#[derive(Debug)]
pub struct Published {
    pub version: u64,
    pub snapshot: Arc<Snapshot>,
    pub hash: ContentHash,
    /// The full snapshot's JSON, gzip'd.
    pub full_gzip: Bytes,
    /// The delta from the version published before this one, when it was worth building.
    pub delta: Option<PublishedDelta>,
    /// When this version was published (for a proxy's lag).
    pub at: Instant,
}

#[derive(Debug)]
pub struct PublishedDelta {
    pub from_version: u64,
    pub from_hash: ContentHash,
    /// The delta's JSON, gzip'd.
    pub gzip: Bytes,
}

/// What a poll is answered with.
#[derive(Debug, Clone)]
pub enum Answer {
    Full(Arc<Published>),
    Delta(Arc<Published>),
}

/// One proxy in touch, as `GET /v1/proxies` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyInTouch {
    pub node_id: String,
    pub incarnation: String,
    /// The version it said it serves in its last poll (its ack).
    pub acked_version: Option<u64>,
    pub content_hash: Option<String>,
    /// `match` (the control plane's hash for that version), `mismatch` (it was resynced), or
    /// `unknown` (a version this control plane no longer holds the hash of).
    pub content: &'static str,
    /// RFC 3339 UTC of its last poll.
    pub last_seen: String,
    /// Seconds since its last poll.
    pub silent_secs: f64,
    /// Versions it is behind the control plane.
    pub lag_versions: u64,
    /// Seconds since the control plane published a version this proxy does not serve yet.
    pub lag_secs: f64,
    pub last_error: Option<String>,
    pub polls: u64,
    pub resyncs: u64,
}

#[derive(Debug)]
struct Entry {
    view: ProxyInTouch,
    seen: Instant,
}

/// The metrics of subscriptions, registered once per control plane.
#[derive(Debug, Clone)]
pub struct SubscriptionMetrics {
    acked: IntGaugeVec,
    sent: IntCounterVec,
    mismatches: IntCounter,
    in_touch: IntGauge,
}

impl SubscriptionMetrics {
    pub const ACKED_NAME: &'static str = "marketgate_proxy_acked_version";
    pub const ACKED_HELP: &'static str =
        "Snapshot version each proxy in touch last acknowledged (proxy = its node id)";
    /// Values of the `kind` label of `marketgate_control_snapshots_sent_total`.
    pub const KINDS: [&'static str; 2] = ["full", "delta"];

    pub fn register(registry: &Registry) -> prometheus::Result<SubscriptionMetrics> {
        let acked = IntGaugeVec::new(Opts::new(Self::ACKED_NAME, Self::ACKED_HELP), &["proxy"])?;
        let sent = IntCounterVec::new(
            Opts::new(
                "marketgate_control_snapshots_sent_total",
                "Snapshots sent to subscribed proxies, by kind (full, delta)",
            ),
            &["kind"],
        )?;
        for kind in Self::KINDS {
            sent.with_label_values(&[kind]);
        }
        let mismatches = IntCounter::new(
            "marketgate_control_content_mismatches_total",
            "Polls whose content hash differed from the control plane's for that version \
             (the proxy was resynced with a full snapshot)",
        )?;
        let in_touch = IntGauge::new(
            "marketgate_control_proxies",
            "Proxies in touch (polled within control.proxy_expiry_secs)",
        )?;
        registry.register(Box::new(acked.clone()))?;
        registry.register(Box::new(sent.clone()))?;
        registry.register(Box::new(mismatches.clone()))?;
        registry.register(Box::new(in_touch.clone()))?;
        Ok(SubscriptionMetrics {
            acked,
            sent,
            mismatches,
            in_touch,
        })
    }

    /// Snapshots sent of `kind` (`full` or `delta`).
    pub fn sent(&self, kind: &str) -> u64 {
        self.sent.with_label_values(&[kind]).get()
    }

    pub fn mismatches(&self) -> u64 {
        self.mismatches.get()
    }
}

/// The control plane's side of the feed: the published versions and the proxies in touch.
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct Subscriptions {
    inner: Arc<SubscriptionsInner>,
}

#[derive(Debug)]
struct SubscriptionsInner {
    published: watch::Sender<Option<Arc<Published>>>,
    /// The version published before the current one, with its hash: a poll at that version
    /// can still be checked for content.
    previous: Mutex<Option<(u64, ContentHash)>>,
    proxies: Mutex<HashMap<String, Entry>>,
    /// Node ids whose claim the store confirmed for an incarnation, and when: asked again
    /// only after [`CLAIM_REFRESH`] of the expiry.
    confirmed: Mutex<HashMap<String, (String, Instant)>>,
    /// The highest version a proxy held past this control plane's, already moved past.
    moved_past: Mutex<u64>,
    cp: ControlPlane,
    expiry: Duration,
    hold: Duration,
    metrics: SubscriptionMetrics,
    shutdown: Shutdown,
}

impl Subscriptions {
    /// Starts the publisher for `cp` (the first version is published at once); it stops when
    /// `shutdown` fires.
    pub fn start(cp: &ControlPlane, shutdown: Shutdown) -> Subscriptions {
        let expiry = cp.config().control.proxy_expiry;
        let subscriptions = Subscriptions {
            inner: Arc::new(SubscriptionsInner {
                published: watch::channel(None).0,
                previous: Mutex::new(None),
                proxies: Mutex::new(HashMap::new()),
                confirmed: Mutex::new(HashMap::new()),
                moved_past: Mutex::new(0),
                cp: cp.clone(),
                expiry,
                hold: POLL_HOLD.min(expiry / 3),
                metrics: cp.subscription_metrics(),
                shutdown: shutdown.clone(),
            }),
        };
        let publisher = subscriptions.clone();
        let cp = cp.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = publisher.publish_each_version(cp) => {}
                _ = shutdown.wait() => {}
            }
        });
        subscriptions
    }

    /// The version published last, if any yet.
    pub fn published(&self) -> Option<Arc<Published>> {
        self.inner.published.borrow().clone()
    }

    async fn publish_each_version(&self, cp: ControlPlane) {
        let mut versions = cp.subscribe();
        let debounce = cp.config().control.push_debounce;
        let mut first = true;
        loop {
            if !first {
                if versions.changed().await.is_err() {
                    return;
                }
                tokio::time::sleep(debounce).await;
            }
            first = false;
            versions.borrow_and_update();
            // Built once per version whatever the number of proxies, from a view of the
            // state (no lock held while it builds), on a blocking-pool thread: a large
            // market's build takes long enough to stall the runtime's other work.
            if let Err(error) = cp.catch_up().await {
                tracing::warn!(%error, "snapshot built without catching up with the store");
            }
            let view = cp.cached();
            let previous = self.published();
            if previous.as_ref().map(|p| p.version) >= Some(view.version) {
                continue;
            }
            let built = tokio::task::spawn_blocking(move || {
                let snapshot = Arc::new(super::publish::build(&view));
                prepare(snapshot, previous)
            })
            .await;
            match built {
                Ok(published) => {
                    let published = Arc::new(published);
                    tracing::debug!(
                        version = published.version,
                        hash = %published.hash,
                        full_bytes = published.full_gzip.len(),
                        delta = published.delta.is_some(),
                        "snapshot published"
                    );
                    let before = self.inner.published.send_replace(Some(published));
                    *self.inner.previous.lock().expect("previous lock") =
                        before.map(|p| (p.version, p.hash));
                }
                Err(error) => tracing::error!(%error, "building the snapshot panicked"),
            }
        }
    }

    /// Records `poll` (an ack), refusing a node id held by another live incarnation, then
    /// waits until there is something to send it, or [`POLL_HOLD`] passes (`None`: 204), or
    /// the control plane shuts down.
    pub async fn poll(&self, poll: &Poll) -> Result<Option<Answer>, ControlError> {
        self.claim(&poll.node_id, &poll.incarnation).await?;
        let mut published = self.inner.published.subscribe();
        let current = published.borrow_and_update().clone();
        self.record(poll, current.as_deref())?;
        if let (Some(held), Some(p)) = (poll.version, current.as_deref()) {
            if held > p.version {
                self.bring_back(&poll.node_id, held).await;
            }
        }
        let deadline = tokio::time::Instant::now() + self.inner.hold;
        let mut current = current;
        loop {
            if let Some(answer) = current.and_then(|p| self.answer(poll, p)) {
                let kind = match &answer {
                    Answer::Full(_) => "full",
                    Answer::Delta(_) => "delta",
                };
                self.inner.metrics.sent.with_label_values(&[kind]).inc();
                return Ok(Some(answer));
            }
            tokio::select! {
                changed = published.changed() => {
                    if changed.is_err() {
                        return Ok(None);
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return Ok(None),
                _ = self.inner.shutdown.clone().wait() => return Ok(None),
            }
            current = published.borrow_and_update().clone();
        }
    }

    /// A proxy serves `held`, past this control plane's published version. If the store has
    /// not made it either (a proxy restored from another store's disk, or pushed to by
    /// hand), the version is moved past it so that the next snapshot replaces what it
    /// serves; a replica merely behind the store catches up instead. Once per version seen.
    async fn bring_back(&self, node_id: &str, held: u64) {
        {
            let mut moved = self.inner.moved_past.lock().expect("moved lock");
            if held <= *moved {
                return;
            }
            *moved = held;
        }
        let store_version = match self.inner.cp.state().await {
            Ok(state) => state.version,
            Err(error) => {
                tracing::warn!(%error, "cannot read the store's version");
                return;
            }
        };
        if held <= store_version {
            return; // this replica was behind the store: its publisher follows
        }
        match self.inner.cp.move_version_past(held).await {
            Ok(version) => tracing::error!(
                node = node_id,
                held,
                store = store_version,
                now = version,
                "a proxy holds a version this control plane did not make: moved the version past it"
            ),
            Err(error) => tracing::error!(
                node = node_id,
                held,
                %error,
                "a proxy holds a version this control plane did not make, and the version could not be moved past it"
            ),
        }
    }

    /// What to send a proxy that serves what `poll` says, when `published` is current.
    fn answer(&self, poll: &Poll, published: Arc<Published>) -> Option<Answer> {
        let hash = poll
            .content_hash
            .as_deref()
            .and_then(|h| h.parse::<ContentHash>().ok());
        match poll.version {
            Some(version) if version > published.version => None, // ahead of this replica
            Some(version) if version == published.version => {
                // Same version, other content: resync.
                (hash != Some(published.hash)).then_some(Answer::Full(published))
            }
            Some(version) => {
                let on_base = published
                    .delta
                    .as_ref()
                    .is_some_and(|d| d.from_version == version && Some(d.from_hash) == hash);
                Some(if on_base {
                    Answer::Delta(published)
                } else {
                    Answer::Full(published)
                })
            }
            None => Some(Answer::Full(published)),
        }
    }

    /// Records `poll` as the proxy's ack (its claim already made).
    fn record(&self, poll: &Poll, published: Option<&Published>) -> Result<(), ControlError> {
        let now = Instant::now();
        let previous = *self.inner.previous.lock().expect("previous lock");
        let hash = poll
            .content_hash
            .as_deref()
            .and_then(|h| h.parse::<ContentHash>().ok());
        let known = published
            .map(|p| (p.version, p.hash))
            .into_iter()
            .chain(previous)
            .find(|(version, _)| Some(*version) == poll.version);
        let content = match (known, hash) {
            (Some((_, expected)), Some(hash)) if expected == hash => "match",
            (Some(_), _) => "mismatch",
            (None, _) => "unknown",
        };
        let current = published.map_or(0, |p| p.version);
        let lag_versions = current.saturating_sub(poll.version.unwrap_or(0));
        let lag_secs = match published {
            Some(p) if lag_versions > 0 => now.duration_since(p.at).as_secs_f64(),
            _ => 0.0,
        };
        let mut proxies = self.inner.proxies.lock().expect("proxies lock");
        let entry = proxies.entry(poll.node_id.clone()).or_insert_with(|| {
            tracing::info!(node = %poll.node_id, incarnation = %poll.incarnation, "proxy in touch");
            Entry {
                view: ProxyInTouch {
                    node_id: poll.node_id.clone(),
                    incarnation: poll.incarnation.clone(),
                    acked_version: None,
                    content_hash: None,
                    content: "unknown",
                    last_seen: String::new(),
                    silent_secs: 0.0,
                    lag_versions: 0,
                    lag_secs: 0.0,
                    last_error: None,
                    polls: 0,
                    resyncs: 0,
                },
                seen: now,
            }
        });
        if content == "mismatch" && entry.view.content != "mismatch" {
            tracing::warn!(
                node = %poll.node_id,
                version = ?poll.version,
                hash = ?poll.content_hash,
                "proxy serves other content than this version's: resyncing it with the full snapshot"
            );
        }
        if content == "mismatch" {
            self.inner.metrics.mismatches.inc();
            entry.view.resyncs += 1;
        }
        entry.seen = now;
        entry.view.incarnation = poll.incarnation.clone();
        entry.view.acked_version = poll.version;
        entry.view.content_hash = poll.content_hash.clone();
        entry.view.content = content;
        entry.view.last_seen = now_rfc3339();
        entry.view.lag_versions = lag_versions;
        entry.view.lag_secs = lag_secs;
        entry.view.last_error = poll.last_error.clone();
        entry.view.polls += 1;
        if let Some(version) = poll.version {
            self.inner
                .metrics
                .acked
                .with_label_values(&[&poll.node_id])
                .set(version as i64);
        }
        Ok(())
    }

    /// Takes or renews `node_id` for `incarnation` in the store, so that it holds across
    /// control replicas: refused while another incarnation seen within
    /// `control.proxy_expiry_secs` holds it. The lease exchange asks this too. With the
    /// store unreachable, this replica's own view decides.
    pub async fn claim(&self, node_id: &str, incarnation: &str) -> Result<(), ControlError> {
        let refresh = self.inner.expiry.mul_f64(CLAIM_REFRESH);
        {
            let confirmed = self.inner.confirmed.lock().expect("confirmed lock");
            if let Some((held_by, at)) = confirmed.get(node_id) {
                if held_by == incarnation && at.elapsed() < refresh {
                    return Ok(());
                }
            }
        }
        let now_ms = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
        let expiry_ms = self.inner.expiry.as_millis() as i64;
        let claimed = self
            .inner
            .cp
            .inner
            .store
            .claim_node(node_id, incarnation, now_ms as i64, expiry_ms)
            .await;
        match claimed {
            Ok(NodeClaim::Held) => {
                self.inner
                    .confirmed
                    .lock()
                    .expect("confirmed lock")
                    .insert(node_id.to_owned(), (incarnation.to_owned(), Instant::now()));
                self.claim_locally(node_id, incarnation)
            }
            Ok(NodeClaim::HeldBy(held_by)) => {
                let error = ControlError::NodeIdInUse {
                    node_id: node_id.to_owned(),
                    held_by,
                    claimed_by: incarnation.to_owned(),
                };
                tracing::warn!(%error, "a second proxy claims a node id in use: refused");
                Err(error)
            }
            Err(error) => {
                tracing::warn!(%error, node = node_id, "the store cannot confirm a node id claim; this replica's view decides");
                self.claim_locally(node_id, incarnation)
            }
        }
    }

    /// This replica's own view of who holds `node_id`: refused while another incarnation
    /// that polled here within the expiry holds it.
    fn claim_locally(&self, node_id: &str, incarnation: &str) -> Result<(), ControlError> {
        let now = Instant::now();
        let mut proxies = self.inner.proxies.lock().expect("proxies lock");
        if let Some(entry) = proxies.get(node_id) {
            let live = now.duration_since(entry.seen) < self.inner.expiry;
            if live && entry.view.incarnation != incarnation {
                // The store gave the node id to `incarnation` (the holder went silent there
                // first) or cannot be asked: only refuse on a holder live here too.
                let error = ControlError::NodeIdInUse {
                    node_id: node_id.to_owned(),
                    held_by: entry.view.incarnation.clone(),
                    claimed_by: incarnation.to_owned(),
                };
                tracing::warn!(%error, "a second proxy claims a node id in use: refused");
                return Err(error);
            }
            if !live {
                proxies.remove(node_id);
            }
        }
        Ok(())
    }

    /// `node_id` of `incarnation` stopped cleanly (its last lease exchange gave everything
    /// back): it leaves the list now, and its node id is free for a replacement at once.
    pub async fn leave(&self, node_id: &str, incarnation: &str) {
        self.inner
            .confirmed
            .lock()
            .expect("confirmed lock")
            .remove(node_id);
        if let Err(error) = self
            .inner
            .cp
            .inner
            .store
            .release_node(node_id, incarnation)
            .await
        {
            tracing::warn!(%error, node = node_id, "could not give the node id up in the store; it frees at expiry");
        }
        let mut proxies = self.inner.proxies.lock().expect("proxies lock");
        if proxies
            .get(node_id)
            .is_some_and(|entry| entry.view.incarnation == incarnation)
        {
            proxies.remove(node_id);
            let _ = self.inner.metrics.acked.remove_label_values(&[node_id]);
            tracing::info!(node = %node_id, "proxy stopped: no longer in touch");
        }
    }

    /// The proxies in touch, by node id; those silent past the expiry leave first.
    pub fn in_touch(&self) -> Vec<ProxyInTouch> {
        self.expire();
        let now = Instant::now();
        let proxies = self.inner.proxies.lock().expect("proxies lock");
        let mut list: Vec<ProxyInTouch> = proxies
            .values()
            .map(|entry| {
                let mut view = entry.view.clone();
                view.silent_secs = now.duration_since(entry.seen).as_secs_f64();
                view
            })
            .collect();
        list.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        list
    }

    /// Drops the proxies silent for longer than the expiry (and their metric series).
    pub fn expire(&self) {
        let now = Instant::now();
        let mut proxies = self.inner.proxies.lock().expect("proxies lock");
        proxies.retain(|node, entry| {
            let live = now.duration_since(entry.seen) < self.inner.expiry;
            if !live {
                tracing::info!(node = %node, "proxy silent past control.proxy_expiry_secs: no longer in touch");
                let _ = self.inner.metrics.acked.remove_label_values(&[node]);
            }
            live
        });
        self.inner.metrics.in_touch.set(proxies.len() as i64);
    }
}

/// Diffs, hashes and gzips `snapshot` against the version published before it.
fn prepare(snapshot: Arc<Snapshot>, previous: Option<Arc<Published>>) -> Published {
    let mut hash = None;
    let delta = previous.as_ref().and_then(|before| {
        let delta = delta::diff(&before.snapshot, &snapshot);
        let entities = snapshot.groups.len() + snapshot.apps.len() + snapshot.purchases.len() + 1;
        if delta.len() as f64 > DELTA_MAX_SHARE * entities as f64 {
            return None;
        }
        // The hash follows from the previous one at the cost of what changed.
        hash = Some(before.hash.after_delta(&before.snapshot, &delta));
        let json = serde_json::to_vec(&delta).expect("a delta serializes");
        Some(PublishedDelta {
            from_version: before.version,
            from_hash: before.hash,
            gzip: gzip(&json),
        })
    });
    let json = serde_json::to_vec(snapshot.as_ref()).expect("a snapshot serializes");
    Published {
        version: snapshot.version,
        hash: hash.unwrap_or_else(|| ContentHash::of(&snapshot)),
        full_gzip: gzip(&json),
        delta,
        snapshot,
        at: Instant::now(),
    }
}

fn gzip(bytes: &[u8]) -> Bytes {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).expect("writing to memory");
    Bytes::from(encoder.finish().expect("writing to memory"))
}
