//! The data plane (`marketgate proxy`): enforces purchases on buyers' calls and forwards them.
//!
//! Owns the [`Gateway`] handle: the one `ArcSwap` of the compiled snapshot, the quota
//! registry, the upstream client, the metrics and the last-good-snapshot file. Submodules
//! each own one concern: [`handler`] the per-request phases, [`route`] matching,
//! [`forward`] the upstream call, [`quota`] the cells and journal, [`error`] the
//! [`error::Rejection`] → status/code mapping, [`metrics`], [`admin`] the admin listener,
//! [`listener`] accepting plain and TLS connections with graceful drain. This module does
//! not decide requests itself.

mod access_log;
pub mod admin;
pub mod allotments;
pub mod error;
pub mod forward;
pub mod handler;
pub mod leasing;
pub mod listener;
pub mod metrics;
pub mod quota;
pub mod route;
mod snapshot_files;
pub mod subscriber;
pub mod throttle;
pub mod uplink;
pub mod workers;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;

use crate::config::Config;
use crate::feed::ContentHash;
use crate::shutdown::Shutdown;
use crate::snapshot::compile::{self, prepare, CompiledSnapshot};
use crate::snapshot::delta::{self, Delta, DeltaError};
use crate::snapshot::validate::{validate, ValidationError};
use crate::snapshot::Snapshot;

/// File name of the last good snapshot inside `data_dir` (the last full checkpoint).
pub const SNAPSHOT_FILE: &str = "snapshot.json";
/// File name prefix of the log segments beside [`SNAPSHOT_FILE`]: `snapshot.log.<V>` holds
/// the deltas that follow from version `V`, one JSON line each, in order: a delta is
/// persisted by appending one record, not by rewriting the market ([`snapshot_files`]).
pub const SNAPSHOT_LOG_FILE: &str = "snapshot.log";
/// Records the log holds at least before a full checkpoint is written (and with it a
/// quarter of the checkpoint's bytes: [`Inner::checkpoint_due`]); bounds replay at start.
pub const SNAPSHOT_CHECKPOINT_EVERY_DELTAS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Quota(#[from] quota::QuotaError),
    #[error("cannot read the last good snapshot {path}")]
    SnapshotRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the last good snapshot {path} does not parse")]
    SnapshotParse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the last good snapshot {path} is invalid")]
    SnapshotInvalid {
        path: PathBuf,
        #[source]
        source: ValidationError,
    },
    #[error("cannot load the default TLS certificate")]
    Tls(#[source] listener::TlsError),
}

/// Why a pushed snapshot was not applied. Nothing changed in every case.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotRejection {
    #[error("snapshot is invalid: {0}")]
    Invalid(#[source] ValidationError),
    #[error("version {offered} is not greater than the current version {current}")]
    NotNewer { current: u64, offered: u64 },
    /// A delta for another base than the snapshot served (or none served): send it full.
    #[error("the delta applies to version {from_version}, this proxy serves {current:?}")]
    WrongBase {
        current: Option<u64>,
        from_version: u64,
    },
    #[error("cannot write the snapshot to disk")]
    Persist(#[source] std::io::Error),
    /// `serve`: this data plane takes snapshots from the control plane in its own process
    /// only, so that it never serves one its store did not make.
    #[error("this data plane follows the control plane of its own process (marketgate serve): snapshots are not pushed to it")]
    Followed,
}

pub(crate) struct Inner {
    pub(crate) config: Config,
    pub(crate) current: ArcSwapOption<CompiledSnapshot>,
    /// The wire form of what `current` was compiled from: the base of the next delta. Its
    /// lock also serializes applies, so the two change together (buyers never read it).
    applied: Mutex<Option<Served>>,
    /// The last good snapshot's files: the checkpoint and the log segments.
    files: snapshot_files::SnapshotFiles,
    /// The version the segment records are appended to follows from (changed under
    /// `applied`'s lock: a checkpoint started at version V starts the segment of V).
    segment_from: std::sync::atomic::AtomicU64,
    /// Records in the log since the durable checkpoint and their bytes (added to under
    /// `applied`'s lock, taken from by the checkpoint that covers them), and the
    /// checkpoint's bytes.
    logged: std::sync::atomic::AtomicUsize,
    logged_bytes: std::sync::atomic::AtomicUsize,
    checkpoint_bytes: std::sync::atomic::AtomicUsize,
    /// A checkpoint is also due once the log holds this many records, whatever their size
    /// (benches and tests lower it: [`Gateway::checkpoint_every_deltas`]).
    checkpoint_every: std::sync::atomic::AtomicUsize,
    /// The thread writing a checkpoint off the apply lock, if one was started.
    checkpointer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Held while `snapshot.json` is written; the version it holds. A checkpoint older than
    /// that one (a background one overtaken by a full snapshot) is not written.
    checkpoint_file: Mutex<u64>,
    pub(crate) quota: quota::QuotaRegistry,
    /// The throttling allotment exchange's queue (leased proxies).
    pub(crate) allotments: Arc<allotments::Allotments>,
    pub(crate) metrics: metrics::GatewayMetrics,
    pub(crate) listening: AtomicBool,
    /// The port the buyers' TLS listener is bound to (0: none yet), for HTTPS redirects.
    pub(crate) tls_port: std::sync::atomic::AtomicU16,
    /// Set by `serve` ([`Gateway::follow_in_process`]): pushes are refused.
    followed: AtomicBool,
    pub(crate) default_cert: Option<Arc<rustls::sign::CertifiedKey>>,
    snapshot_path: PathBuf,
    /// Failed authentications per peer, one table for both buyer listeners (a peer is the
    /// same guesser over HTTP and HTTPS); counted per listener in `metrics.accept`.
    pub(crate) auth_guard: crate::auth_guard::AuthGuard,
}

/// The wire snapshot served and where its apps and purchases are in it, so that a delta is
/// applied to it in place, in time proportional to the delta (`delta::apply_in_place`).
struct Served {
    wire: Arc<Snapshot>,
    positions: delta::Positions,
}

impl Served {
    fn new(wire: Snapshot) -> Served {
        Served {
            positions: delta::Positions::of(&wire),
            wire: Arc::new(wire),
        }
    }
}

/// The data plane, as a cheaply cloneable handle.
#[derive(Clone)]
pub struct Gateway {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("version", &self.snapshot_version())
            .finish()
    }
}

impl Gateway {
    /// Opens the quota journal and loads the last good snapshot from `config.data_dir`.
    /// Quota is leased from the control plane when `proxy.control_urls` names one, else local.
    pub fn open(config: &Config) -> Result<Gateway, GatewayError> {
        let mode = if config.proxy.control_urls.is_empty() {
            quota::QuotaMode::Local
        } else {
            quota::QuotaMode::Leased
        };
        Self::open_with_quota(config, mode)
    }

    /// [`Gateway::open`] with the quota mode chosen by the caller (`serve` leases in-process).
    pub fn open_with_quota(
        config: &Config,
        mode: quota::QuotaMode,
    ) -> Result<Gateway, GatewayError> {
        let quota = quota::QuotaRegistry::open_with_mode(
            &config.data_dir,
            config.gateway.quota_journal_block,
            mode,
        )?;
        let metrics = metrics::GatewayMetrics::new();
        let snapshot_path = config.data_dir.join(SNAPSHOT_FILE);
        let default_cert = match (&config.gateway.tls_cert, &config.gateway.tls_key) {
            (Some(cert), Some(key)) => Some(Arc::new(
                listener::load_default_cert(cert, key).map_err(GatewayError::Tls)?,
            )),
            _ => None,
        };
        if let Some(not_after) = default_cert
            .as_ref()
            .and_then(|key| key.cert.first())
            .and_then(|der| crate::certificate::not_after(der))
        {
            metrics.set_default_certificate_expiry(not_after);
        }
        let inner = Inner {
            config: config.clone(),
            current: ArcSwapOption::empty(),
            applied: Mutex::new(None),
            files: snapshot_files::SnapshotFiles::new(snapshot_path.clone()),
            segment_from: std::sync::atomic::AtomicU64::new(0),
            logged: std::sync::atomic::AtomicUsize::new(0),
            logged_bytes: std::sync::atomic::AtomicUsize::new(0),
            checkpoint_bytes: std::sync::atomic::AtomicUsize::new(0),
            checkpoint_every: std::sync::atomic::AtomicUsize::new(usize::MAX),
            checkpointer: Mutex::new(None),
            checkpoint_file: Mutex::new(0),
            quota,
            allotments: Arc::default(),
            metrics,
            listening: AtomicBool::new(false),
            tls_port: std::sync::atomic::AtomicU16::new(0),
            followed: AtomicBool::new(false),
            default_cert,
            snapshot_path,
            auth_guard: crate::auth_guard::AuthGuard::new(config.gateway.connections.auth_failures),
        };
        if let Some(loaded) = inner.files.load()? {
            let snapshot_files::Loaded {
                snapshot,
                logged,
                logged_bytes,
                checkpoint_bytes,
                checkpoint_version,
                segment_from,
            } = loaded;
            *lock(&inner.checkpoint_file) = checkpoint_version;
            inner.segment_from.store(segment_from, Ordering::Relaxed);
            inner.logged.store(logged, Ordering::Relaxed);
            inner.logged_bytes.store(logged_bytes, Ordering::Relaxed);
            inner
                .checkpoint_bytes
                .store(checkpoint_bytes, Ordering::Relaxed);
            let valid = validate(&snapshot).map_err(|source| GatewayError::SnapshotInvalid {
                path: inner.snapshot_path.clone(),
                source,
            })?;
            let compiled = prepare(valid, &inner.metrics).bind(&inner.quota, &inner.metrics);
            inner.metrics.snapshot_version.set(snapshot.version as i64);
            inner.metrics.snapshot_applied.set(now_secs());
            inner.current.store(Some(Arc::new(compiled)));
            tracing::info!(
                version = snapshot.version,
                "serving the last good snapshot from disk"
            );
            *lock(&inner.applied) = Some(Served::new(snapshot));
        }
        Ok(Gateway {
            inner: Arc::new(inner),
        })
    }

    /// Validates, compiles, persists and swaps in a pushed `snapshot`; returns its version.
    /// Refused with [`SnapshotRejection::Followed`] after [`Gateway::follow_in_process`].
    pub fn apply_snapshot(&self, snapshot: Snapshot) -> Result<u64, SnapshotRejection> {
        if self.inner.followed.load(Ordering::Acquire) {
            let result = Err(SnapshotRejection::Followed);
            self.count_push(&result);
            return result;
        }
        self.apply_unfollowed(snapshot)
    }

    /// From now on this data plane takes snapshots only through
    /// [`Gateway::apply_from_control`]: pushes to its admin listener are refused (409), so
    /// that the only snapshots it serves are those its own control plane made (`serve`).
    pub fn follow_in_process(&self) {
        self.inner.followed.store(true, Ordering::Release);
    }

    /// What `serve`'s follower applies: the in-process control plane's snapshot, exactly as
    /// a push is applied (validated, compiled, persisted, swapped), pushes refused or not.
    pub fn apply_from_control(&self, snapshot: Snapshot) -> Result<u64, SnapshotRejection> {
        self.apply_unfollowed(snapshot)
    }

    fn apply_unfollowed(&self, snapshot: Snapshot) -> Result<u64, SnapshotRejection> {
        let mut applied = lock(&self.inner.applied);
        let result = self.apply_locked(&mut applied, snapshot, None, false);
        self.count_push(&result);
        result
    }

    /// [`Gateway::apply_snapshot`] that also takes the version already served: a control
    /// plane resyncing a proxy whose content differs from that version's (a delta applied on
    /// a wrong base), docs/snapshot-protocol.md.
    pub fn resync_snapshot(&self, snapshot: Snapshot) -> Result<u64, SnapshotRejection> {
        let mut applied = lock(&self.inner.applied);
        let result = self.apply_locked(&mut applied, snapshot, None, true);
        self.count_push(&result);
        result
    }

    /// Applies a delta (`PATCH /v1/snapshot`) to the snapshot served: refused with
    /// [`SnapshotRejection::WrongBase`] unless that is `delta.from_version`; otherwise the
    /// rebuilt full snapshot goes through exactly what [`Gateway::apply_snapshot`] does.
    pub fn apply_delta(&self, delta: Delta) -> Result<u64, SnapshotRejection> {
        if self.inner.followed.load(Ordering::Acquire) {
            let result = Err(SnapshotRejection::Followed);
            self.count_push(&result);
            return result;
        }
        self.apply_delta_hashed(delta, None)
            .map(|(version, _)| version)
    }

    /// [`Gateway::apply_delta`] that also tells the content hash of what the delta makes,
    /// given `base_hash`, the hash of the snapshot served (`ContentHash::after_delta`, the
    /// entities replaced found by id: time proportional to the delta).
    pub fn apply_delta_hashed(
        &self,
        delta: Delta,
        base_hash: Option<ContentHash>,
    ) -> Result<(u64, Option<ContentHash>), SnapshotRejection> {
        if self.inner.followed.load(Ordering::Acquire) {
            self.count_push_error(Some(&SnapshotRejection::Followed));
            return Err(SnapshotRejection::Followed);
        }
        let mut applied = lock(&self.inner.applied);
        let result = self.apply_delta_locked(&mut applied, delta, base_hash);
        self.count_push_error(result.as_ref().err());
        result
    }

    /// Applies `delta` to the snapshot served while holding the apply lock: to the compiled
    /// snapshot by structural sharing when `compile::apply_delta` can (a buyer's purchase or
    /// app, a freeze, a group's state, a seller's groups, APIs, domains, authorizations and
    /// certificates), and to the wire form in place; otherwise the whole
    /// snapshot it makes is validated and compiled. Either way persisted as an appended
    /// record.
    fn apply_delta_locked(
        &self,
        applied: &mut Option<Served>,
        delta: Delta,
        base_hash: Option<ContentHash>,
    ) -> Result<(u64, Option<ContentHash>), SnapshotRejection> {
        let Some(served) = applied.as_mut() else {
            return Err(SnapshotRejection::WrongBase {
                current: None,
                from_version: delta.from_version,
            });
        };
        let hash = base_hash.map(|hash| {
            let (wire, positions) = (&*served.wire, &served.positions);
            hash.after_delta_found(
                wire,
                &delta,
                |id| positions.app(wire, id),
                |id| positions.purchase(wire, id),
            )
        });
        let record = serde_json::to_vec(&delta)
            .map_err(|e| SnapshotRejection::Persist(std::io::Error::other(e)))?;
        let current = self.compiled();
        let Some(prepared) = current.as_deref().and_then(|current| {
            compile::apply_delta(current, &served.wire, &delta, &self.inner.metrics)
        }) else {
            let snapshot = delta::apply(&served.wire, delta)?;
            return self
                .apply_locked(applied, snapshot, Some(record), false)
                .map(|version| (version, hash));
        };
        let inner = &self.inner;
        // Persist before anything shared changes: the record alone; a checkpoint (if one is
        // due) only once the change is served, and off this lock.
        self.append_locked(&record)
            .map_err(SnapshotRejection::Persist)?;
        // Served by nobody else (a reader's clone is copied first: rare, and correct; the
        // checkpoint is written from the files, not from this).
        // The delta is cloned (small): the prepared snapshot borrows its purchases.
        delta::apply_in_place(
            Arc::make_mut(&mut served.wire),
            &mut served.positions,
            delta.clone(),
        )?;
        let compiled = prepared.bind(&inner.quota, &inner.metrics);
        let version = self.swap_compiled(&served.wire, compiled);
        self.checkpoint_if_due_locked(&served.wire);
        Ok((version, hash))
    }

    /// Appends a delta's record to the log segment being written, under the apply lock.
    fn append_locked(&self, record: &[u8]) -> std::io::Result<()> {
        let inner = &self.inner;
        let segment = inner.segment_from.load(Ordering::Relaxed);
        inner.files.append(segment, record)?;
        inner.logged.fetch_add(1, Ordering::Relaxed);
        inner
            .logged_bytes
            .fetch_add(record.len() + 1, Ordering::Relaxed);
        Ok(())
    }

    /// Starts writing the checkpoint of `wire`'s version (just served, its record durable) on
    /// a thread of its own if one is due and none is being written; under the apply lock,
    /// which it does not hold meanwhile. Later records go to a new segment (that of `wire`'s
    /// version); the thread rebuilds that version from the checkpoint on disk and the sealed
    /// segments (`SnapshotFiles::compact`), so it shares nothing with the applier, and once
    /// durable removes exactly the segments it covers. A
    /// checkpoint that fails is logged and tried again at the next delta; the log keeps
    /// every change meanwhile.
    fn checkpoint_if_due_locked(&self, wire: &Arc<Snapshot>) {
        let inner = &self.inner;
        if !inner.checkpoint_due() {
            return;
        }
        let mut checkpointer = lock(&inner.checkpointer);
        if checkpointer
            .as_ref()
            .is_some_and(|writing| !writing.is_finished())
        {
            return;
        }
        if let Some(done) = checkpointer.take() {
            let _ = done.join();
        }
        let covered = (
            inner.logged.load(Ordering::Relaxed),
            inner.logged_bytes.load(Ordering::Relaxed),
        );
        let version = wire.version;
        inner.segment_from.store(version, Ordering::Relaxed);
        let writer = self.inner.clone();
        match std::thread::Builder::new()
            .name("snapshot-checkpoint".into())
            .spawn(move || writer.write_checkpoint_behind(version, covered))
        {
            Ok(writing) => *checkpointer = Some(writing),
            Err(error) => {
                tracing::warn!(%error, "cannot start the snapshot checkpoint; the snapshot log keeps every change")
            }
        }
    }

    /// Waits for the checkpoint being written off the apply lock, if any (tests, benches,
    /// and a proxy stopping: its next start then replays less).
    pub fn finish_checkpoint(&self) {
        let writing = lock(&self.inner.checkpointer).take();
        if let Some(writing) = writing {
            let _ = writing.join();
        }
    }

    /// Makes a checkpoint due once the log holds `deltas` records, whatever their size
    /// (benches and tests: the size rule alone makes one every ~10^5 deltas at 1M).
    pub fn checkpoint_every_deltas(&self, deltas: usize) {
        self.inner
            .checkpoint_every
            .store(deltas.max(1), Ordering::Relaxed);
    }
}

impl Inner {
    /// A checkpoint is written once the log has [`SNAPSHOT_CHECKPOINT_EVERY_DELTAS`] records
    /// and is a quarter of the checkpoint's size (or `checkpoint_every` records): a full
    /// checkpoint costs the whole market (seconds at 1M purchases, off the apply lock but a
    /// core's worth), so at 1M it comes every ~10^5 deltas; the log's replay at start is
    /// proportional to its records (`delta::apply_in_place`).
    fn checkpoint_due(&self) -> bool {
        let logged = self.logged.load(Ordering::Relaxed);
        let logged_bytes = self.logged_bytes.load(Ordering::Relaxed);
        let checkpoint_bytes = self.checkpoint_bytes.load(Ordering::Relaxed);
        logged >= self.checkpoint_every.load(Ordering::Relaxed)
            || (logged >= SNAPSHOT_CHECKPOINT_EVERY_DELTAS
                && logged_bytes.saturating_mul(4) >= checkpoint_bytes)
    }

    /// The checkpoint thread's work: writes the checkpoint of `version` from the files
    /// (`SnapshotFiles::compact`: the checkpoint on disk and the sealed segments) unless a
    /// newer checkpoint is on disk already, then takes the `covered` records (and bytes) off
    /// the log's count.
    fn write_checkpoint_behind(&self, version: u64, covered: (usize, usize)) {
        let mut durable = lock(&self.checkpoint_file);
        if *durable >= version {
            return;
        }
        let started = std::time::Instant::now();
        match self.files.compact(version) {
            Ok(bytes) => {
                *durable = version;
                self.logged.fetch_sub(covered.0, Ordering::Relaxed);
                self.logged_bytes.fetch_sub(covered.1, Ordering::Relaxed);
                self.checkpoint_bytes.store(bytes, Ordering::Relaxed);
                tracing::info!(
                    version,
                    bytes,
                    millis = started.elapsed().as_millis() as u64,
                    "snapshot checkpoint written"
                );
            }
            Err(error) => {
                tracing::warn!(%error, "cannot write the snapshot checkpoint; the snapshot log keeps every change, tried again at the next delta")
            }
        }
    }
}

/// Locks `mutex`, taking the value over from a thread that panicked holding it.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl From<DeltaError> for SnapshotRejection {
    fn from(error: DeltaError) -> SnapshotRejection {
        match error {
            DeltaError::WrongBase {
                from_version,
                current,
            } => SnapshotRejection::WrongBase {
                current,
                from_version,
            },
            DeltaError::NotNewer {
                from_version,
                version,
            } => SnapshotRejection::NotNewer {
                current: from_version,
                offered: version,
            },
        }
    }
}

impl Gateway {
    /// `marketgate_snapshot_push_total{result}`, label values as in `deploy/metrics.txt`.
    fn count_push(&self, result: &Result<u64, SnapshotRejection>) {
        self.count_push_error(result.as_ref().err())
    }

    /// [`Gateway::count_push`] of a push refused for `error`, or applied (`None`).
    fn count_push_error(&self, error: Option<&SnapshotRejection>) {
        let label = match error {
            None => "applied",
            Some(SnapshotRejection::Invalid(_)) => "rejected",
            Some(SnapshotRejection::NotNewer { .. }) => "stale",
            Some(SnapshotRejection::WrongBase { .. }) => "stale",
            Some(SnapshotRejection::Followed) => "stale",
            Some(SnapshotRejection::Persist(_)) => "error",
        };
        self.inner
            .metrics
            .snapshot_push
            .with_label_values(&[label])
            .inc();
    }

    /// Applies `snapshot` while holding the apply lock (`applied` is its guard). `delta` is
    /// the record of the delta that made it from the snapshot served (JSON), persisted by
    /// appending it to the snapshot log (a checkpoint started after, when due); a full
    /// snapshot (`None`) is persisted as a checkpoint, under the lock.
    fn apply_locked(
        &self,
        applied: &mut Option<Served>,
        snapshot: Snapshot,
        delta: Option<Vec<u8>>,
        same_version_too: bool,
    ) -> Result<u64, SnapshotRejection> {
        let inner = &self.inner;
        if let Some(current) = self.snapshot_version() {
            if snapshot.version < current || (snapshot.version == current && !same_version_too) {
                return Err(SnapshotRejection::NotNewer {
                    current,
                    offered: snapshot.version,
                });
            }
        }
        let valid = validate(&snapshot).map_err(SnapshotRejection::Invalid)?;
        let prepared = prepare(valid, &inner.metrics);
        // Persist before anything shared changes: what is served is always on disk, and a
        // failed persist leaves the quota cells and metrics of the snapshot served as they were.
        let logged = delta.is_some();
        match delta {
            Some(record) => self.append_locked(&record),
            None => self.checkpoint_full_locked(&snapshot),
        }
        .map_err(SnapshotRejection::Persist)?;
        let compiled = prepared.bind(&inner.quota, &inner.metrics);
        let served = Served::new(snapshot);
        self.swap_compiled(&served.wire, compiled);
        if logged {
            self.checkpoint_if_due_locked(&served.wire);
        }
        let version = served.wire.version;
        *applied = Some(served);
        Ok(version)
    }

    /// Writes a full `snapshot` (not in the log) as the checkpoint, under the apply lock
    /// (after a checkpoint being written behind, if one is), and removes every segment:
    /// records follow from its version on.
    fn checkpoint_full_locked(&self, snapshot: &Snapshot) -> std::io::Result<()> {
        let inner = &self.inner;
        let mut durable = lock(&inner.checkpoint_file);
        let bytes = inner.files.write_checkpoint(snapshot, true)?;
        *durable = snapshot.version;
        inner
            .segment_from
            .store(snapshot.version, Ordering::Relaxed);
        inner.logged.store(0, Ordering::Relaxed);
        inner.logged_bytes.store(0, Ordering::Relaxed);
        inner.checkpoint_bytes.store(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Swaps in `compiled` (made from `wire`) under the apply lock; returns its version.
    fn swap_compiled(&self, wire: &Snapshot, compiled: CompiledSnapshot) -> u64 {
        let inner = &self.inner;
        inner.current.store(Some(Arc::new(compiled)));
        inner.metrics.snapshot_version.set(wire.version as i64);
        inner.metrics.snapshot_applied.set(now_secs());
        tracing::info!(version = wire.version, "snapshot applied");
        wire.version
    }

    /// The wire snapshot now served (the base a delta must name).
    pub fn wire_snapshot(&self) -> Option<Arc<Snapshot>> {
        lock(&self.inner.applied)
            .as_ref()
            .map(|served| served.wire.clone())
    }

    /// Where the last good snapshot is kept (`data_dir/snapshot.json`).
    pub fn snapshot_path(&self) -> &Path {
        &self.inner.snapshot_path
    }

    /// This proxy's `[proxy] node_id`, told to the control plane in push answers.
    pub fn node_id(&self) -> &str {
        &self.inner.config.proxy.node_id
    }

    pub fn snapshot_version(&self) -> Option<u64> {
        self.inner.current.load().as_ref().map(|s| s.version)
    }

    /// The compiled snapshot now served (for benches and tests of the decision path).
    pub fn compiled(&self) -> Option<Arc<CompiledSnapshot>> {
        self.inner.current.load_full()
    }

    /// Has a snapshot and a bound buyer listener.
    pub fn is_ready(&self) -> bool {
        self.snapshot_version().is_some() && self.inner.listening.load(Ordering::Acquire)
    }

    pub fn quota(&self) -> &quota::QuotaRegistry {
        &self.inner.quota
    }

    pub fn metrics(&self) -> &metrics::GatewayMetrics {
        &self.inner.metrics
    }

    /// Serves buyers over plain HTTP until `shutdown`, then drains for `gateway.drain_timeout`.
    /// The loop forwards through an upstream pool of its own.
    pub async fn serve_buyers(&self, listener: tokio::net::TcpListener, shutdown: Shutdown) {
        let context = workers::WorkerContext::new(&self.inner, 0);
        self.serve_buyers_through(context, listener, false, shutdown)
            .await
    }

    /// Serves buyers over TLS (certificate by SNI from the snapshot, else the default one).
    pub async fn serve_buyers_tls(&self, listener: tokio::net::TcpListener, shutdown: Shutdown) {
        let context = workers::WorkerContext::new(&self.inner, 0);
        self.serve_buyers_through(context, listener, true, shutdown)
            .await
    }

    /// One accept loop of the worker `context` is for (a worker's plain and TLS loops share
    /// its upstream pool).
    pub(crate) async fn serve_buyers_through(
        &self,
        context: workers::WorkerContext,
        listener: tokio::net::TcpListener,
        tls: bool,
        shutdown: Shutdown,
    ) {
        let tls = tls.then(|| listener::tls_chooser(self.inner.clone()));
        listener::serve(self.inner.clone(), context, listener, tls, shutdown).await
    }

    /// The admin listener's routes (§5–§6).
    pub fn admin_router(&self) -> axum::Router {
        admin::router(self.clone())
    }

    /// Records the exact quota used (after traffic stopped).
    pub fn flush(&self) -> Result<(), quota::QuotaError> {
        self.inner.quota.flush()
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

type RunError = Box<dyn std::error::Error + Send + Sync>;

/// The gateway's listeners, bound from `[gateway]` and `[admin]`: one buyer socket per
/// worker (`SO_REUSEPORT`, [`workers`]), one admin listener.
pub struct Listeners {
    pub buyers: workers::BuyerSockets,
    pub admin: tokio::net::TcpListener,
}

impl Listeners {
    pub async fn bind(config: &Config) -> Result<Listeners, crate::bind::BindError> {
        let buyers = workers::BuyerSockets::bind(&config.gateway)?;
        let admin = crate::bind::bind("admin.listen", config.admin.listen).await?;
        Ok(Listeners { buyers, admin })
    }
}

impl Gateway {
    /// Serves buyers on `gateway.workers` threads of their own (plain and TLS) and
    /// `admin_router` on the admin listener, on the caller's runtime, until `shutdown`;
    /// then waits for every worker to drain and every listener to stop. Flushing the quota
    /// is the caller's, after this returns.
    pub async fn serve_listeners(
        &self,
        listeners: Listeners,
        admin_router: axum::Router,
        shutdown: Shutdown,
    ) -> Result<(), RunError> {
        let config = &self.inner.config;
        let admin_spec = crate::accept::router_spec("admin", config.admin.connections, config);
        let admin_tls = crate::plane_tls::admin_acceptor(config.admin.tls.as_ref())?;
        let admin_task = tokio::spawn(crate::accept::serve_router(
            listeners.admin,
            admin_spec,
            admin_tls,
            self.inner.metrics.accept.clone(),
            admin_router,
            shutdown.clone(),
        ));
        workers::run(self.clone(), listeners.buyers, shutdown).await?;
        admin_task.await?;
        Ok(())
    }
}

/// Runs a standalone proxy until `shutdown` fires: binds `gateway.listen`,
/// `gateway.tls_listen` (when set) and `admin.listen`, drains, then flushes quota. Buyers
/// are served on `gateway.workers` threads ([`workers`]); the admin listener and the lease
/// client run on the caller's runtime.
pub async fn run_proxy(mut config: Config, shutdown: Shutdown) -> Result<(), RunError> {
    // Held until the proxy has flushed and stopped; nothing in data_dir is touched before.
    let _data_dir = crate::data_dir::DataDir::claim(&config.data_dir)?;
    crate::accept::fit_open_file_limit(&mut config, false);
    let gateway = Gateway::open(&config)?;
    let listeners = Listeners::bind(&config).await?;
    run_proxy_with(gateway, listeners, shutdown).await
}

/// Runs an opened proxy on bound listeners until `shutdown`: with `proxy.control_urls`, it
/// subscribes to the control planes' snapshots (`subscriber`) and leases quota from them
/// (`leasing`), both through one [`uplink::Uplink`]. Then drains, flushes the journal and
/// gives its leases back. (Tests run proxies in-process through this.)
pub async fn run_proxy_with(
    gateway: Gateway,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<(), RunError> {
    let config = gateway.inner.config.clone();
    let uplink = match config.proxy.control_urls.is_empty() {
        true => None,
        false => Some(Arc::new(uplink::Uplink::new(
            config.proxy.control_urls.clone(),
            &config.proxy.control_token,
            crate::plane_tls::uplink_client_config(&config.proxy)?,
        ))),
    };
    let leasing = uplink.as_ref().map(|uplink| {
        let service = Arc::new(leasing::HttpLeaseService::new(uplink.clone()));
        Arc::new(leasing::LeaseClient::new(gateway.clone(), service))
    });
    tracing::info!(
        buyers = %listeners.buyers.local_addr()?,
        workers = listeners.buyers.workers(),
        admin = %listeners.admin.local_addr()?,
        version = ?gateway.snapshot_version(),
        node = %config.proxy.node_id,
        control = ?config.proxy.control_urls,
        "proxy listening"
    );
    if let (Some(uplink), Some(client)) = (&uplink, &leasing) {
        // Snapshots first (a proxy serves within a second of first contact), independent of
        // the lease recovery, which may wait for the control plane.
        let subscriber = subscriber::Subscriber::new(
            gateway.clone(),
            uplink.clone(),
            client.incarnation().to_owned(),
        );
        tokio::spawn(subscriber.run(shutdown.clone()));
        // Throttling counters admit only what the control plane allots from now on.
        tokio::spawn(allotments::run(
            gateway.inner.allotments.clone(),
            gateway.inner.quota.throttle().clone(),
            uplink.clone(),
            config.proxy.node_id.clone(),
            shutdown.clone(),
        ));
        // Report what the journal says was served before taking new leases; meanwhile
        // limited purchases are served only from what is leased (nothing yet).
        let client = client.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            client.recover(&shutdown).await;
            client.run(shutdown).await;
        });
    }
    gateway
        .serve_listeners(listeners, gateway.admin_router(), shutdown)
        .await?;
    gateway.flush()?;
    gateway.finish_checkpoint();
    if let Some(client) = &leasing {
        if let Err(error) = client.finish().await {
            tracing::warn!(%error, "could not give leases back; they return to the ledger at expiry");
        }
    }
    tracing::info!("proxy stopped; quota flushed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::wire::{App, Group, MarketState, Purchase, PurchaseState};
    use std::io::Write;

    fn market(version: u64, limit: u64) -> Snapshot {
        Snapshot {
            version,
            groups: vec![Group {
                id: "g".into(),
                name: "g".into(),
                sl_domain: "g.sl.test".into(),
                url_domain: Some("g.market.test".into()),
                market_state: MarketState::OnSale,
                apis: vec![],
            }],
            apps: vec![App {
                id: "a".into(),
                app_key: "k".into(),
                app_secret: "s".into(),
                app_codes: vec![],
                creator: "MARKET".into(),
            }],
            purchases: vec![Purchase {
                id: "p".into(),
                group_id: "g".into(),
                app_id: "a".into(),
                state: PurchaseState::Active,
                start_time: 0,
                expire_time: 10,
                quota_limit: Some(limit),
                quota_used: 0,
            }],
            ..Snapshot::default()
        }
    }

    fn open(dir: &Path) -> Gateway {
        let text = format!(
            "data_dir = '{}'\n[admin]\ntoken = 'test-token'\n",
            dir.display()
        );
        Gateway::open(&Config::from_toml(&text, Vec::new()).unwrap()).unwrap()
    }

    /// The purchase's limit goes up by one with each version: a delta of one purchase.
    fn next(gateway: &Gateway) -> u64 {
        let base = gateway.wire_snapshot().unwrap();
        let new = market(base.version + 1, 10 + base.version);
        gateway.apply_delta(delta::diff(&base, &new)).unwrap()
    }

    fn checkpoint_version(dir: &Path) -> u64 {
        snapshot_files::SnapshotFiles::new(dir.join(SNAPSHOT_FILE))
            .load_checkpoint()
            .unwrap()
            .unwrap()
            .0
            .version
    }

    /// The log segments in `dir`, by the version they follow from.
    fn segments(dir: &Path) -> Vec<u64> {
        let prefix = format!("{SNAPSHOT_LOG_FILE}.");
        let mut segments: Vec<u64> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|entry| {
                let name = entry.unwrap().file_name().into_string().unwrap();
                name.strip_prefix(&prefix)?.parse().ok()
            })
            .collect();
        segments.sort();
        segments
    }

    fn segment(dir: &Path, from: u64) -> PathBuf {
        dir.join(format!("{SNAPSHOT_LOG_FILE}.{from}"))
    }

    /// Deltas are persisted as appended records, replayed at start; a record torn by a crash
    /// is ignored and the log restarts from a new checkpoint.
    #[test]
    fn deltas_are_appended_and_replayed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let gateway = open(dir.path());
        gateway.apply_snapshot(market(1, 10)).unwrap();
        for _ in 0..3 {
            next(&gateway);
        }
        assert_eq!(
            checkpoint_version(dir.path()),
            1,
            "a delta rewrote the whole snapshot"
        );
        let log = std::fs::read_to_string(segment(dir.path(), 1)).unwrap();
        assert_eq!(log.lines().count(), 3);
        let served = gateway.wire_snapshot().unwrap();
        drop(gateway);

        let gateway = open(dir.path());
        assert_eq!(gateway.snapshot_version(), Some(4));
        assert_eq!(gateway.wire_snapshot().unwrap().purchases, served.purchases);
        assert_eq!(gateway.quota().get("p").unwrap().limit(), 13);
        next(&gateway);
        drop(gateway);

        // A crash in the middle of an append: half a record, never acknowledged.
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(segment(dir.path(), 1))
            .unwrap();
        file.write_all(br#"{"from_version":5,"vers"#).unwrap();
        drop(file);
        let gateway = open(dir.path());
        assert_eq!(gateway.snapshot_version(), Some(5));
        assert_eq!(segments(dir.path()), Vec::<u64>::new());
        assert_eq!(checkpoint_version(dir.path()), 5);
        // A checkpoint every SNAPSHOT_CHECKPOINT_EVERY_DELTAS deltas bounds the log.
        for _ in 0..SNAPSHOT_CHECKPOINT_EVERY_DELTAS + 3 {
            next(&gateway);
        }
        gateway.finish_checkpoint();
        assert!(
            checkpoint_version(dir.path()) > 5,
            "no checkpoint was written"
        );
        let logged: usize = segments(dir.path())
            .into_iter()
            .map(|from| {
                std::fs::read_to_string(segment(dir.path(), from))
                    .unwrap()
                    .lines()
                    .count()
            })
            .sum();
        assert!(logged < SNAPSHOT_CHECKPOINT_EVERY_DELTAS);
        let version = gateway.snapshot_version();
        drop(gateway);
        assert_eq!(open(dir.path()).snapshot_version(), version);
    }

    /// The crash points of a checkpoint written behind the apply lock: before it is durable
    /// (a half-written temporary file, the old checkpoint, the segment it was to cover and
    /// the one after), and after it is durable but before the segment it covers is removed
    /// (records older than the checkpoint, then records after it). Every one recovers the
    /// latest version applied, with its content.
    #[test]
    fn a_checkpoint_behind_the_apply_lock_recovers_from_every_crash_point() {
        let dir = tempfile::tempdir().unwrap();
        let gateway = open(dir.path());
        gateway.apply_snapshot(market(1, 10)).unwrap();
        gateway.checkpoint_every_deltas(4);
        // The checkpoint of v5 cannot be written: its temporary file's place is taken.
        let tmp = dir.path().join(format!("{SNAPSHOT_FILE}.tmp"));
        std::fs::create_dir_all(tmp.join("in-the-way")).unwrap();
        for _ in 0..6 {
            next(&gateway);
            gateway.finish_checkpoint();
        }
        assert_eq!(gateway.snapshot_version(), Some(7));
        assert_eq!(checkpoint_version(dir.path()), 1);
        // Tried at v5, then again at each delta: each try starts a segment.
        assert_eq!(
            segments(dir.path()),
            vec![1, 5, 6],
            "the log was not rotated"
        );
        let covered = std::fs::read(segment(dir.path(), 1)).unwrap();
        let old_checkpoint = std::fs::read(dir.path().join(SNAPSHOT_FILE)).unwrap();
        let served = gateway.wire_snapshot().unwrap();
        drop(gateway);

        // Crash before the checkpoint was durable: a half-written temporary file.
        std::fs::remove_dir_all(&tmp).unwrap();
        std::fs::write(&tmp, br#"{"version":5,"grou"#).unwrap();
        let gateway = open(dir.path());
        assert_eq!(gateway.snapshot_version(), Some(7));
        assert_eq!(*gateway.wire_snapshot().unwrap(), *served);
        assert_eq!(gateway.quota().get("p").unwrap().limit(), 16);
        // The next checkpoint (the log holds 6 records) covers every segment.
        gateway.checkpoint_every_deltas(4);
        next(&gateway);
        gateway.finish_checkpoint();
        assert_eq!(checkpoint_version(dir.path()), 8);
        assert_eq!(segments(dir.path()), Vec::<u64>::new());
        next(&gateway);
        next(&gateway);
        let served = gateway.wire_snapshot().unwrap();
        drop(gateway);
        assert_eq!(segments(dir.path()), vec![8]);

        // Crash after the checkpoint of v8 was durable, before the segment it covers was
        // removed: that segment's records are older than the checkpoint (one of them even
        // is the record that made v8's base from v1: none follows from v8).
        std::fs::write(segment(dir.path(), 1), &covered).unwrap();
        let gateway = open(dir.path());
        assert_eq!(gateway.snapshot_version(), Some(10));
        assert_eq!(*gateway.wire_snapshot().unwrap(), *served);
        drop(gateway);

        // A log with a gap (v1's checkpoint, records 1..5, then records from v8: a state no
        // crash leaves, as segments are removed only once a checkpoint covers them): the
        // replay stops where the records stop following, and never applies past the gap.
        std::fs::write(dir.path().join(SNAPSHOT_FILE), &old_checkpoint).unwrap();
        let gateway = open(dir.path());
        assert_eq!(
            gateway.snapshot_version(),
            Some(5),
            "replayed past a gap in the log"
        );
    }

    /// A full snapshot applied while a checkpoint is being written behind is not overwritten
    /// by that older checkpoint, and its records' segments are gone.
    #[test]
    fn a_full_snapshot_is_not_overtaken_by_an_older_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let gateway = open(dir.path());
        gateway.apply_snapshot(market(1, 10)).unwrap();
        gateway.checkpoint_every_deltas(2);
        next(&gateway);
        next(&gateway);
        gateway.apply_snapshot(market(100, 50)).unwrap();
        gateway.finish_checkpoint();
        assert_eq!(checkpoint_version(dir.path()), 100);
        assert_eq!(segments(dir.path()), Vec::<u64>::new());
        next(&gateway);
        drop(gateway);
        let gateway = open(dir.path());
        assert_eq!(gateway.snapshot_version(), Some(101));
        assert_eq!(gateway.quota().get("p").unwrap().limit(), 110);
    }

    /// A push whose persist fails changes nothing that is served: not the version, not the
    /// purchase's quota cell (compile touches shared state only after the persist).
    #[test]
    fn a_push_that_cannot_be_persisted_changes_no_quota_cell() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "data_dir = '{}'\n[admin]\ntoken = 'test-token'\n",
            dir.path().display()
        );
        let config = Config::from_toml(&text, Vec::new()).unwrap();
        let gateway = Gateway::open(&config).unwrap();
        assert_eq!(gateway.apply_snapshot(market(1, 10)).unwrap(), 1);
        let cell = gateway.quota().get("p").unwrap();
        assert_eq!(cell.limit(), 10);

        // The snapshot file's place taken by a non-empty directory: the rename fails.
        let path = dir.path().join(SNAPSHOT_FILE);
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir_all(path.join("in-the-way")).unwrap();
        let refused = gateway.apply_snapshot(market(2, 5));
        assert!(
            matches!(refused, Err(SnapshotRejection::Persist(_))),
            "{refused:?}"
        );
        assert_eq!(gateway.snapshot_version(), Some(1));
        assert_eq!(
            cell.limit(),
            10,
            "the refused snapshot's limit reached the live cell"
        );
    }
}
