//! `marketgate serve`: the control plane and one data plane in one process, on the embedded
//! store — what a newcomer runs.
//!
//! It owns only the wiring. The planes talk through the same code paths as a fleet, minus
//! HTTP: every new snapshot version is applied to the in-process gateway (validated and
//! compiled exactly as a pushed one), and the gateway's quota is leased from the in-process
//! ledger through [`InProcessLeases`]. Buyers are served on the gateway's worker threads
//! (`gateway.workers`, as in `proxy`); the control plane (its listener, lease exchanges,
//! store commits, snapshot builds) runs on the caller's runtime, never on a buyer thread.
//! Nothing here decides a request or a market change.
//!
//! The store is the truth: the data plane serves only snapshots its own control plane made.
//! Pushes to its admin listener are refused, and at start and after every change the
//! follower checks the data plane's version against the store's; a data plane ahead of its
//! store (its `snapshot.json` outlived a restore of an older `marketgate.db`) is brought back
//! to the store's market by moving the store's version counter past it. A store that is
//! missing or empty while `data_dir` holds state a store made is an error at start.

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::Config;
use crate::control::leases::LocalUsage;
use crate::control::{ControlError, ControlPlane};
use crate::gateway::leasing::{self, LeaseClient, LeaseService, LeaseServiceError};
use crate::gateway::quota::QuotaMode;
use crate::gateway::{Gateway, Listeners, SnapshotRejection, SNAPSHOT_FILE};
use crate::lease::{LeaseExchange, LeaseReply};
use crate::shutdown::Shutdown;

type RunError = Box<dyn std::error::Error + Send + Sync>;

/// Why `serve` refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// `marketgate.db` was removed or truncated (or `database_url` now names another file)
    /// while `data_dir` still holds what the old store's market left: starting would serve
    /// an empty market and forget every purchase.
    #[error(
        "the store {} is missing or empty, but {} holds state of a market a store made: restore the store from a backup (docs/operations.md §9), or remove {} to start a new, empty market",
        store.display(), evidence.display(), evidence.display()
    )]
    StoreMissing { store: PathBuf, evidence: PathBuf },
}

/// The control plane's ledger as a lease service, without HTTP.
pub struct InProcessLeases(pub ControlPlane);

#[async_trait::async_trait]
impl LeaseService for InProcessLeases {
    async fn exchange(&self, exchange: LeaseExchange) -> Result<LeaseReply, LeaseServiceError> {
        self.0
            .exchange_leases(exchange)
            .await
            .map_err(|e| LeaseServiceError::Unreachable(Box::new(e)))
    }
}

#[async_trait::async_trait]
impl LocalUsage for LeaseClient {
    async fn report_taken(&self, purchase_ids: &[String]) -> Result<(), RunError> {
        Ok(LeaseClient::report_taken(self, purchase_ids).await?)
    }
}

/// Runs both planes until `shutdown` fires, then drains buyers, flushes the quota journal and
/// reports the last usage to the ledger.
pub async fn run_serve(mut config: Config, shutdown: Shutdown) -> Result<(), RunError> {
    // Before the store, the journal or the snapshot file is opened: a second process on this
    // data_dir stops here, having read and written nothing.
    let _data_dir = crate::data_dir::DataDir::claim(&config.data_dir)?;
    // A SQLite file kept outside data_dir needs its own lock (one process per database).
    let _database =
        crate::control::store::lock_sqlite_file(&config.database_url, &config.data_dir)?;
    check_store_present(&config)?;
    crate::accept::fit_open_file_limit(&mut config, true);
    let control = ControlPlane::open(&config).await?;
    let gateway = Gateway::open_with_quota(&config, QuotaMode::Leased)?;

    follow_snapshots(control.clone(), gateway.clone(), &config, shutdown.clone()).await?;

    let leases = Arc::new(LeaseClient::new(
        gateway.clone(),
        Arc::new(InProcessLeases(control.clone())),
    ));
    // A ledger read for a buyer's view first has this data plane report what it took: in
    // one process, the view shows every call answered before it.
    control.attach_local_usage(Arc::downgrade(&leases) as std::sync::Weak<dyn LocalUsage>);
    leases.recover(&shutdown).await;
    tokio::spawn(leases.clone().run(shutdown.clone()));
    control.spawn_lease_expiry(shutdown.clone());
    // Other proxies may subscribe to this one's control plane too.
    let subscriptions = control.spawn_subscriptions(shutdown.clone());

    let listeners = Listeners::bind(&config).await?;
    let control_listener = crate::bind::bind("control.listen", config.control.listen).await?;
    tracing::info!(
        buyers = %listeners.buyers.local_addr()?,
        control = %control_listener.local_addr()?,
        admin = %listeners.admin.local_addr()?,
        data_dir = %config.data_dir.display(),
        "marketgate serve: both planes listening"
    );

    // Every listener of this process is counted in the gateway's registry (one /metrics).
    let control_task = tokio::spawn(crate::control::serve_with(
        control_listener,
        control.clone(),
        gateway.metrics().accept.clone(),
        shutdown.clone(),
    ));
    // One admin listener: the gateway's routes (health, readiness, version, usage, metrics)
    // plus the control plane's own (proxies, leases), and one /metrics for both planes.
    gateway.metrics().also_render(
        control.metrics_registry().clone(),
        &crate::control::metrics::LABELLED_FAMILIES,
    );
    let admin_router = gateway
        .admin_router()
        .merge(crate::control::admin::ledger_router(
            control.clone(),
            subscriptions,
        ));
    gateway
        .serve_listeners(listeners, admin_router, shutdown)
        .await?;
    control_task.await??;
    gateway.flush()?;
    if let Err(error) = leases.finish().await {
        tracing::warn!(%error, "could not report the last usage to the ledger");
    }
    tracing::info!("marketgate serve stopped; quota flushed and reported");
    Ok(())
}

/// Refuses to start on a missing or empty SQLite store while `data_dir` holds a snapshot or
/// lease state: those were made from a store, which is gone. Checked before the store is
/// opened (opening would create an empty one and the next start would not see the loss).
fn check_store_present(config: &Config) -> Result<(), ServeError> {
    let Some(store) = config.database_url.strip_prefix("sqlite://") else {
        return Ok(());
    };
    let store = PathBuf::from(store);
    let present = std::fs::metadata(&store).is_ok_and(|meta| meta.len() > 0);
    let evidence = [SNAPSHOT_FILE, leasing::STATE_FILE]
        .into_iter()
        .map(|name| config.data_dir.join(name))
        .find(|path| path.exists());
    match evidence {
        Some(evidence) if !present => Err(ServeError::StoreMissing { store, evidence }),
        _ => Ok(()),
    }
}

/// Brings the data plane to the store's snapshot now, and again after every change (batched
/// by `control.push_debounce`), until `shutdown`. From here on, pushes to the data plane's
/// admin listener are refused.
async fn follow_snapshots(
    control: ControlPlane,
    gateway: Gateway,
    config: &Config,
    shutdown: Shutdown,
) -> Result<(), ControlError> {
    gateway.follow_in_process();
    let mut versions = control.subscribe();
    catch_up(&control, &gateway, Check::Content).await?;
    let debounce = config.control.push_debounce;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = versions.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = shutdown.clone().wait() => return,
            }
            tokio::time::sleep(debounce).await;
            versions.borrow_and_update();
            if let Err(error) = catch_up(&control, &gateway, Check::Version).await {
                tracing::error!(%error, "could not move the store's version past the data plane's");
            }
        }
    });
    Ok(())
}

/// How closely [`catch_up`] compares the data plane's snapshot with the store's when both
/// have the same version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// At start: the same version may have been made by another store (a restored one that
    /// has since counted up to it), so the contents are compared too.
    Content,
    /// After a change this follower saw committed: the version is enough.
    Version,
}

/// Applies the store's snapshot unless the data plane serves it already. A data plane
/// ahead of the store, or at the store's version with other contents, holds a snapshot this
/// store did not make: that is logged once, the store's version is moved past it, and the
/// store's snapshot (now newer) replaces it.
async fn catch_up(
    control: &ControlPlane,
    gateway: &Gateway,
    check: Check,
) -> Result<(), ControlError> {
    let mut snapshot = control.snapshot().await;
    // Version 0 is an empty store that never committed anything: nothing to serve yet.
    if snapshot.version == 0 {
        return Ok(());
    }
    if let Some(served) = gateway.wire_snapshot() {
        let same_version = served.version == snapshot.version;
        let foreign = served.version > snapshot.version
            || (same_version && check == Check::Content && !same_market(&served, &snapshot));
        if foreign {
            let version = control.move_version_past(served.version).await?;
            tracing::error!(
                served = served.version,
                store = snapshot.version,
                now = version,
                snapshot_file = %gateway.snapshot_path().display(),
                "the data plane's snapshot was not made by this store (restored from an older backup?): serving the store's market from now on, at a version past the data plane's"
            );
            snapshot = control.snapshot().await;
        } else if served.version >= snapshot.version {
            return Ok(());
        }
    }
    let gateway = gateway.clone();
    let applied = tokio::task::spawn_blocking(move || gateway.apply_from_control(snapshot)).await;
    match applied {
        Ok(Ok(version)) => tracing::debug!(version, "snapshot applied in-process"),
        Ok(Err(SnapshotRejection::NotNewer { .. })) => {}
        Ok(Err(error)) => tracing::error!(%error, "the control plane's snapshot was refused"),
        Err(error) => tracing::error!(%error, "applying the snapshot panicked"),
    }
    Ok(())
}

/// The same market, whatever each snapshot's informational build time.
fn same_market(a: &crate::snapshot::Snapshot, b: &crate::snapshot::Snapshot) -> bool {
    a.groups == b.groups
        && a.apps == b.apps
        && a.purchases == b.purchases
        && a.app_auths == b.app_auths
        && a.certificates == b.certificates
}
