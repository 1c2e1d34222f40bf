//! `marketgate serve`: the control plane and one data plane in one process, on the embedded
//! store — what a newcomer runs.
//!
//! It owns only the wiring. The planes talk through the same code paths as a fleet, minus
//! HTTP: every new snapshot version is applied to the in-process gateway (validated and
//! compiled exactly as a pushed one), and the gateway's quota is leased from the in-process
//! ledger through [`InProcessLeases`]. Nothing here decides a request or a market change.

use std::sync::Arc;

use crate::config::Config;
use crate::control::ControlPlane;
use crate::gateway::leasing::{LeaseClient, LeaseService, LeaseServiceError};
use crate::gateway::quota::QuotaMode;
use crate::gateway::{Gateway, Listeners, SnapshotRejection};
use crate::lease::{LeaseExchange, LeaseReply};
use crate::shutdown::Shutdown;

type RunError = Box<dyn std::error::Error + Send + Sync>;

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

/// Runs both planes until `shutdown` fires, then drains buyers, flushes the quota journal and
/// reports the last usage to the ledger.
pub async fn run_serve(config: Config, shutdown: Shutdown) -> Result<(), RunError> {
    let control = ControlPlane::open(&config).await?;
    let gateway = Gateway::open_with_quota(&config, QuotaMode::Leased)?;

    follow_snapshots(control.clone(), gateway.clone(), &config, shutdown.clone()).await;

    let leases = Arc::new(LeaseClient::new(
        gateway.clone(),
        Arc::new(InProcessLeases(control.clone())),
    ));
    leases.recover(&shutdown).await;
    tokio::spawn(leases.clone().run(shutdown.clone()));
    control.spawn_lease_expiry(shutdown.clone());

    let listeners = Listeners::bind(&config).await?;
    let control_listener = tokio::net::TcpListener::bind(config.control.listen).await?;
    tracing::info!(
        buyers = %listeners.buyers.local_addr()?,
        control = %control_listener.local_addr()?,
        admin = %listeners.admin.local_addr()?,
        data_dir = %config.data_dir.display(),
        "marketgate serve: both planes listening"
    );

    let control_task = tokio::spawn(crate::control::serve(
        control_listener,
        control.clone(),
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
            crate::control::push::PushStatus::none(),
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

/// Applies the control plane's snapshot now, and again after every change (batched by
/// `control.push_debounce`), until `shutdown`.
async fn follow_snapshots(
    control: ControlPlane,
    gateway: Gateway,
    config: &Config,
    shutdown: Shutdown,
) {
    let mut versions = control.subscribe();
    apply(&control, &gateway).await;
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
            apply(&control, &gateway).await;
        }
    });
}

async fn apply(control: &ControlPlane, gateway: &Gateway) {
    let snapshot = control.snapshot().await;
    // Version 0 is an empty store that never committed anything: nothing to serve yet.
    if snapshot.version == 0 || gateway.snapshot_version() >= Some(snapshot.version) {
        return;
    }
    let gateway = gateway.clone();
    let applied = tokio::task::spawn_blocking(move || gateway.apply_snapshot(snapshot)).await;
    match applied {
        Ok(Ok(version)) => tracing::debug!(version, "snapshot applied in-process"),
        Ok(Err(SnapshotRejection::NotNewer { .. })) => {}
        Ok(Err(error)) => tracing::error!(%error, "the control plane's snapshot was refused"),
        Err(error) => tracing::error!(%error, "applying the snapshot panicked"),
    }
}
