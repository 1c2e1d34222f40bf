//! The data plane (`marketgate proxy`): enforces purchases on buyers' calls and forwards them.
//!
//! Owns the [`Gateway`] handle: the one `ArcSwap` of the compiled snapshot, the quota
//! registry, the upstream client, the metrics and the last-good-snapshot file. Submodules
//! each own one concern: [`handler`] the per-request phases, [`route`] matching,
//! [`forward`] the upstream call, [`quota`] the cells and journal, [`error`] the
//! [`error::Rejection`] → status/code mapping, [`metrics`], [`admin`] the admin listener,
//! [`listener`] accepting plain and TLS connections with graceful drain. This module does
//! not decide requests itself.

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
pub mod subscriber;
pub mod throttle;
pub mod uplink;
pub mod workers;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;

use crate::config::Config;
use crate::shutdown::Shutdown;
use crate::snapshot::compile::{self, prepare, CompiledSnapshot};
use crate::snapshot::delta::{self, Delta, DeltaError};
use crate::snapshot::validate::{validate, ValidationError};
use crate::snapshot::Snapshot;

/// File name of the last good snapshot inside `data_dir` (the last full checkpoint).
pub const SNAPSHOT_FILE: &str = "snapshot.json";
/// File name of the deltas applied since the checkpoint in [`SNAPSHOT_FILE`], one JSON line
/// each, in order: a delta is persisted by appending one record, not by rewriting the market.
pub const SNAPSHOT_LOG_FILE: &str = "snapshot.log";
/// Deltas appended to [`SNAPSHOT_LOG_FILE`] before the next one is persisted as a full
/// checkpoint instead (and the log emptied): bounds replay at start to this many deltas.
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
    applied: Mutex<Option<Arc<Snapshot>>>,
    /// Records in the snapshot log since the checkpoint (changed under `applied`'s lock).
    logged: std::sync::atomic::AtomicUsize,
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
            logged: std::sync::atomic::AtomicUsize::new(0),
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
        if let Some((snapshot, logged)) = load_snapshot(&inner.snapshot_path)? {
            inner.logged.store(logged, Ordering::Relaxed);
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
            *inner.applied.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(snapshot));
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
        let mut applied = self.inner.applied.lock().unwrap_or_else(|e| e.into_inner());
        let result = self.apply_locked(&mut applied, snapshot, None, false);
        self.count_push(&result);
        result
    }

    /// [`Gateway::apply_snapshot`] that also takes the version already served: a control
    /// plane resyncing a proxy whose content differs from that version's (a delta applied on
    /// a wrong base), docs/snapshot-protocol.md.
    pub fn resync_snapshot(&self, snapshot: Snapshot) -> Result<u64, SnapshotRejection> {
        let mut applied = self.inner.applied.lock().unwrap_or_else(|e| e.into_inner());
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
        let mut applied = self.inner.applied.lock().unwrap_or_else(|e| e.into_inner());
        let base = applied.clone();
        let result = match base.as_deref() {
            None => Err(SnapshotRejection::WrongBase {
                current: None,
                from_version: delta.from_version,
            }),
            Some(base) => self.apply_delta_locked(&mut applied, base, delta),
        };
        self.count_push(&result);
        result
    }

    /// Applies `delta` to `base` (the wire snapshot served) while holding the apply lock: to
    /// the compiled snapshot served, by structural sharing, when `compile::apply_delta` can
    /// (a buyer's purchase, app, freeze, a group's state); otherwise by validating and
    /// compiling the whole snapshot it makes. Either way persisted as an appended record.
    fn apply_delta_locked(
        &self,
        applied: &mut Option<Arc<Snapshot>>,
        base: &Snapshot,
        delta: Delta,
    ) -> Result<u64, SnapshotRejection> {
        let record = serde_json::to_vec(&delta)
            .map_err(|e| SnapshotRejection::Persist(std::io::Error::other(e)))?;
        let served = self.compiled();
        let Some(prepared) = served
            .as_deref()
            .and_then(|served| compile::apply_delta(served, base, &delta))
        else {
            let snapshot = delta::apply(base, delta)?;
            return self.apply_locked(applied, snapshot, Some(record), false);
        };
        let snapshot = delta::apply(base, delta.clone())?;
        self.persist_locked(&snapshot, Some(record))?;
        let compiled = prepared.bind(&self.inner.quota, &self.inner.metrics);
        Ok(self.swap_locked(applied, snapshot, compiled))
    }
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
        let label = match result {
            Ok(_) => "applied",
            Err(SnapshotRejection::Invalid(_)) => "rejected",
            Err(SnapshotRejection::NotNewer { .. }) => "stale",
            Err(SnapshotRejection::WrongBase { .. }) => "stale",
            Err(SnapshotRejection::Followed) => "stale",
            Err(SnapshotRejection::Persist(_)) => "error",
        };
        self.inner
            .metrics
            .snapshot_push
            .with_label_values(&[label])
            .inc();
    }

    /// Applies `snapshot` while holding the apply lock (`applied` is its guard). `delta` is
    /// the record of the delta that made it from the snapshot served (JSON), persisted by
    /// appending it to the snapshot log; a full snapshot (`None`), or every
    /// [`SNAPSHOT_CHECKPOINT_EVERY_DELTAS`]th delta, is persisted as a checkpoint.
    fn apply_locked(
        &self,
        applied: &mut Option<Arc<Snapshot>>,
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
        self.persist_locked(&snapshot, delta)?;
        let compiled = prepared.bind(&inner.quota, &inner.metrics);
        Ok(self.swap_locked(applied, snapshot, compiled))
    }

    /// Persists `snapshot` (under the apply lock): `delta`, the record of the delta that made
    /// it, appended to the snapshot log, or the whole snapshot as a checkpoint (a full push,
    /// or every [`SNAPSHOT_CHECKPOINT_EVERY_DELTAS`]th delta).
    fn persist_locked(
        &self,
        snapshot: &Snapshot,
        delta: Option<Vec<u8>>,
    ) -> Result<(), SnapshotRejection> {
        let inner = &self.inner;
        let logged = inner.logged.load(Ordering::Relaxed);
        match delta {
            Some(record) if logged + 1 < SNAPSHOT_CHECKPOINT_EVERY_DELTAS => {
                append_record(&log_path(&inner.snapshot_path), &record)
                    .map_err(SnapshotRejection::Persist)?;
                inner.logged.store(logged + 1, Ordering::Relaxed);
            }
            _ => {
                persist_snapshot(&inner.snapshot_path, snapshot)
                    .map_err(SnapshotRejection::Persist)?;
                inner.logged.store(0, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Swaps in `compiled` (made from `snapshot`) under the apply lock; returns its version.
    fn swap_locked(
        &self,
        applied: &mut Option<Arc<Snapshot>>,
        snapshot: Snapshot,
        compiled: CompiledSnapshot,
    ) -> u64 {
        let inner = &self.inner;
        inner.current.store(Some(Arc::new(compiled)));
        inner.metrics.snapshot_version.set(snapshot.version as i64);
        inner.metrics.snapshot_applied.set(now_secs());
        tracing::info!(version = snapshot.version, "snapshot applied");
        let version = snapshot.version;
        *applied = Some(Arc::new(snapshot));
        version
    }

    /// The wire snapshot now served (the base a delta must name).
    pub fn wire_snapshot(&self) -> Option<Arc<Snapshot>> {
        self.inner
            .applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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

/// The snapshot log beside the checkpoint at `snapshot_path`.
fn log_path(snapshot_path: &Path) -> PathBuf {
    snapshot_path.with_file_name(SNAPSHOT_LOG_FILE)
}

/// The last good snapshot (validated by the caller) and how many logged deltas it took, or
/// `None` if there is none: the checkpoint, then every delta of the log that follows from
/// it, in order. A torn last record (a crash during its append: it was never acknowledged)
/// or one that does not follow (left from before a checkpoint) ends the replay; the
/// snapshot replayed is then written as a new checkpoint so the log restarts clean.
fn load_snapshot(path: &Path) -> Result<Option<(Snapshot, usize)>, GatewayError> {
    let Some(mut snapshot) = load_checkpoint(path)? else {
        return Ok(None);
    };
    let log = log_path(path);
    let bytes = match std::fs::read(&log) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some((snapshot, 0))),
        Err(source) => return Err(GatewayError::SnapshotRead { path: log, source }),
    };
    let mut replayed = 0;
    let mut clean = true;
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            clean = false; // torn: never acknowledged
            break;
        };
        let record = &rest[..end];
        rest = &rest[end + 1..];
        let next = serde_json::from_slice::<Delta>(record)
            .ok()
            .and_then(|delta| delta::apply(&snapshot, delta).ok());
        match next {
            Some(next) => {
                snapshot = next;
                replayed += 1;
            }
            None => {
                clean = false;
                break;
            }
        }
    }
    if !clean {
        tracing::warn!(
            log = %log.display(),
            replayed,
            version = snapshot.version,
            "the snapshot log ends in a record that does not apply (torn by a crash, or older than the checkpoint): serving what it replayed, checkpointed anew"
        );
        persist_snapshot(path, &snapshot).map_err(|source| GatewayError::SnapshotRead {
            path: path.to_owned(),
            source,
        })?;
        replayed = 0;
    }
    Ok(Some((snapshot, replayed)))
}

/// The checkpoint file as written, or `None` if there is none.
fn load_checkpoint(path: &Path) -> Result<Option<Snapshot>, GatewayError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(GatewayError::SnapshotRead {
                path: path.to_owned(),
                source,
            })
        }
    };
    let snapshot: Snapshot =
        serde_json::from_slice(&bytes).map_err(|source| GatewayError::SnapshotParse {
            path: path.to_owned(),
            source,
        })?;
    Ok(Some(snapshot))
}

/// Writes `snapshot` to `path` by a temporary file (mode 0600: it holds secrets), fsync and
/// rename, so a crash leaves either the old or the new file, never half of one.
fn persist_snapshot(path: &Path, snapshot: &Snapshot) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(snapshot).map_err(std::io::Error::other)?;
    crate::durable::write_atomic(path, &bytes)?;
    // The deltas before this checkpoint are in it. Left behind by a crash, they would not
    // replay: none follows from the checkpoint's version.
    match std::fs::remove_file(log_path(path)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
}

/// Appends one record (and a newline) to the snapshot log and makes it durable before
/// returning: the delta is then as persisted as a checkpoint would have made it.
fn append_record(log: &Path, record: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(log)?;
    let created = file.metadata()?.len() == 0;
    let mut line = Vec::with_capacity(record.len() + 1);
    line.extend_from_slice(record);
    line.push(b'\n');
    file.write_all(&line)?;
    file.sync_data()?;
    if created {
        // A new file's name is durable once its directory is.
        std::fs::File::open(log.parent().unwrap_or(Path::new(".")))?.sync_all()?;
    }
    Ok(())
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
        let checkpoint = load_checkpoint(&dir.path().join(SNAPSHOT_FILE))
            .unwrap()
            .unwrap();
        assert_eq!(checkpoint.version, 1, "a delta rewrote the whole snapshot");
        let log = std::fs::read_to_string(dir.path().join(SNAPSHOT_LOG_FILE)).unwrap();
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
            .open(dir.path().join(SNAPSHOT_LOG_FILE))
            .unwrap();
        file.write_all(br#"{"from_version":5,"vers"#).unwrap();
        drop(file);
        let gateway = open(dir.path());
        assert_eq!(gateway.snapshot_version(), Some(5));
        assert!(!dir.path().join(SNAPSHOT_LOG_FILE).exists());
        assert_eq!(
            load_checkpoint(&dir.path().join(SNAPSHOT_FILE))
                .unwrap()
                .unwrap()
                .version,
            5
        );
        // A checkpoint every SNAPSHOT_CHECKPOINT_EVERY_DELTAS deltas bounds the log.
        for _ in 0..SNAPSHOT_CHECKPOINT_EVERY_DELTAS + 3 {
            next(&gateway);
        }
        let log = std::fs::read_to_string(dir.path().join(SNAPSHOT_LOG_FILE)).unwrap();
        assert!(log.lines().count() < SNAPSHOT_CHECKPOINT_EVERY_DELTAS);
        let version = gateway.snapshot_version();
        drop(gateway);
        assert_eq!(open(dir.path()).snapshot_version(), version);
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
