//! The control plane (`marketgate control`): market API (CONTRACT §3), Huawei-APIG-v2
//! management API (§4), the durable store, and the snapshot source for the data plane.
//!
//! Design: the control plane is the single writer of its database. The whole market state
//! lives in memory behind one `tokio::sync::Mutex<State>`, loaded from the store at start.
//! Every write locks the state, validates against it, commits the changed records to the
//! store in ONE transaction (which also bumps the snapshot version), then applies them in
//! memory and answers. Uniqueness (names, url_domain, app_key) and order_id idempotency are
//! therefore exact under any concurrency, and every 2xx is durable before it is sent.
//!
//! This module owns wiring (`ControlPlane`, the routers, `run_control`); request logic lives in
//! `management` and `market`, the snapshot build in `publish`, pushing it to proxies in
//! `push`, the admin listener in `admin`, its metrics in `metrics`.

pub mod admin;
pub mod auth;
pub mod error;
pub mod leases;
pub mod management;
pub mod market;
pub mod metrics;
pub mod openapi;
pub mod publish;
pub mod push;
pub mod state;
pub mod store;

use std::sync::Arc;

use axum::routing::{delete, get, post, put};
use axum::Router;
use tokio::sync::{watch, Mutex, MutexGuard};

use crate::config::Config;
use crate::shutdown::Shutdown;

use push::{PushMetrics, PushStatus};

pub use error::ControlError;
use state::{Change, State};
use store::Store;

/// The control plane: cheap to clone, all clones share one state and store.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Config,
    store: Box<dyn Store>,
    /// In an `Arc` so that the metrics registry can read it at scrape time (weakly).
    state: Arc<Mutex<State>>,
    version: watch::Sender<u64>,
    metrics: metrics::ControlMetrics,
}

impl ControlPlane {
    /// Opens the store named by `config.database_url`, applies migrations, loads the state.
    ///
    /// A fresh store is at version 0, which no proxy accepts (`snapshot::validate`: version
    /// ≥ 1); opening one commits an empty change so that the very first snapshot pushed, an
    /// empty market at version 1, is valid and proxies become ready before the first sale.
    pub async fn open(config: &Config) -> Result<ControlPlane, ControlError> {
        let store = store::open(&config.database_url).await?;
        let mut state = State::from_loaded(store.load().await?)?;
        if state.version == 0 {
            state.version = store.commit(Vec::new(), true).await?;
        }
        let (version, _) = watch::channel(state.version);
        let state = Arc::new(Mutex::new(state));
        let metrics = metrics::ControlMetrics::new(&state);
        metrics.snapshot_version.set(*version.borrow() as i64);
        Ok(ControlPlane {
            inner: Arc::new(Inner {
                config: config.clone(),
                store,
                state,
                version,
                metrics,
            }),
        })
    }

    /// The admin listener's routes (health, metrics, version, `GET /v1/proxies`, leases);
    /// `push` is what [`ControlPlane::spawn_pushers`] returned, or `PushStatus::none()`.
    pub fn admin_router(&self, push: PushStatus) -> Router {
        admin::router(self.clone(), push)
    }

    /// This control plane's metrics registry (not the global one), for `serve` to expose
    /// beside the proxy's. Prefer [`ControlPlane::metrics_text`], which also announces the
    /// labelled families that have no series yet.
    pub fn metrics_registry(&self) -> &prometheus::Registry {
        self.inner.metrics.registry()
    }

    /// The control plane's metrics in the Prometheus text format.
    pub fn metrics_text(&self) -> String {
        self.inner.metrics.render()
    }

    /// The pushers' metrics (`spawn_pushers` registers nothing itself).
    pub fn push_metrics(&self) -> PushMetrics {
        self.inner.metrics.push.clone()
    }

    /// Starts one pusher per `[[control.proxies]]` entry (admin token, `push_debounce` from
    /// the config); they stop when `shutdown` fires. Returns their status for the admin
    /// router.
    pub fn spawn_pushers(&self, shutdown: Shutdown) -> PushStatus {
        let config = self.config();
        push::spawn_pushers(
            Arc::new(self.clone()),
            &config.control.proxies,
            config.admin.token.clone(),
            config.control.push_debounce,
            self.push_metrics(),
            shutdown,
        )
    }

    /// The current snapshot version (no lock taken).
    pub fn version(&self) -> u64 {
        *self.inner.version.borrow()
    }

    /// Does the store answer? (`GET /readyz`.)
    pub async fn ping_store(&self) -> Result<(), ControlError> {
        Ok(self.inner.store.ping().await?)
    }

    /// The market and management API.
    pub fn router(&self) -> Router {
        let m = "/v2/{project_id}/apigw/instances/{instance_id}";
        let k = "/v1/{project_id}/apigw/instances/{instance_id}/market";
        use management as mg;
        use market as mk;
        Router::new()
            .route(
                &format!("{m}/api-groups"),
                post(mg::create_group).get(mg::list_groups),
            )
            .route(
                &format!("{m}/api-groups/{{group_id}}"),
                get(mg::show_group)
                    .put(mg::update_group)
                    .delete(mg::delete_group),
            )
            .route(
                &format!("{m}/apis"),
                post(mg::create_api).get(mg::list_apis),
            )
            .route(&format!("{m}/apis/action"), post(mg::publish_action))
            .route(&format!("{m}/apis/publish"), post(mg::publish_batch))
            .route(
                &format!("{m}/apis/{{api_id}}"),
                get(mg::show_api).put(mg::update_api).delete(mg::delete_api),
            )
            .route(&format!("{m}/envs"), get(mg::list_envs))
            .route(
                &format!("{m}/apps"),
                post(mg::create_app).get(mg::list_apps),
            )
            .route(
                &format!("{m}/apps/{{app_id}}"),
                get(mg::show_app).put(mg::update_app).delete(mg::delete_app),
            )
            .route(
                &format!("{m}/apps/secret/{{app_id}}"),
                put(mg::reset_secret),
            )
            .route(
                &format!("{m}/apps/validation/{{app_id}}"),
                get(mg::check_app),
            )
            .route(
                &format!("{m}/apps/{{app_id}}/app-codes"),
                post(mg::create_app_code)
                    .put(mg::generate_app_code)
                    .get(mg::list_app_codes),
            )
            .route(
                &format!("{m}/apps/{{app_id}}/app-codes/{{app_code_id}}"),
                get(mg::show_app_code).delete(mg::delete_app_code),
            )
            .route(&format!("{m}/app-auths"), post(mg::create_auths))
            .route(&format!("{m}/app-auths/binded-apps"), get(mg::list_auths))
            .route(
                &format!("{m}/app-auths/{{app_auth_id}}"),
                delete(mg::delete_auth),
            )
            .route(
                &format!("{k}/api-groups/onsell/{{group_id}}"),
                put(mk::onsell).delete(mk::offsell),
            )
            .route(&format!("{k}/api-groups/onsell"), get(mk::list_onsell))
            .route(&format!("{k}/api-groups/tosell"), get(mk::list_tosell))
            .route(
                &format!("{k}/api-groups/delist/{{group_id}}"),
                delete(mk::delist),
            )
            .route(&format!("{k}/api-groups/reserve"), post(mk::reserve))
            .route(&format!("{k}/api-groups/purchase"), post(mk::purchase))
            .route(&format!("{k}/api-groups/status"), post(mk::set_unused))
            .route(
                &format!("{k}/api-groups/status/{{group_id}}"),
                put(mk::lock),
            )
            .route(&format!("{k}/project"), put(mk::freeze))
            .route(
                &format!("{k}/unsubscribe/{{purchase_id}}"),
                delete(mk::unsubscribe),
            )
            .route(&format!("{k}/purchases"), get(mk::list_purchases))
            .route(
                &format!("{k}/purchases/{{purchase_id}}"),
                get(mk::show_purchase),
            )
            .fallback(|| async { ControlError::RouteNotFound })
            // "No such API or method" is one case on APIG (CONTRACT §8).
            .method_not_allowed_fallback(|| async { ControlError::RouteNotFound })
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                auth::authenticate,
            ))
            .with_state(self.clone())
            // The OpenAPI document, `GET /openapi.json`: merged after the auth layer, so it
            // needs no credentials.
            .merge(openapi::router())
    }

    /// The full snapshot at the current version.
    pub async fn snapshot(&self) -> crate::snapshot::Snapshot {
        let state = self.inner.state.lock().await;
        publish::build(&state)
    }

    /// Fires with the new snapshot version after every committed change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.version.subscribe()
    }

    /// Adds `calls` served calls to the purchase's ledger, durably (no snapshot change).
    pub async fn record_usage(&self, purchase_id: &str, calls: u64) -> Result<(), ControlError> {
        let mut state = self.lock().await;
        let mut purchase = state
            .purchases
            .get(purchase_id)
            .cloned()
            .ok_or_else(|| ControlError::PurchaseNotFound(purchase_id.to_owned()))?;
        if calls == 0 {
            return Ok(());
        }
        purchase.quota_used = purchase.quota_used.saturating_add(calls);
        self.commit_ledger(&mut state, vec![Change::Purchase(purchase)])
            .await
    }

    /// Moves the snapshot version past `seen`, a version a data plane holds that this store
    /// did not make (the store was restored from an older backup, or something else pushed
    /// to that data plane), durably, and announces it: the snapshot built next is newer than
    /// what that data plane holds, so it is accepted and replaces it. Returns the version.
    pub async fn move_version_past(&self, seen: u64) -> Result<u64, ControlError> {
        let mut state = self.lock().await;
        let version = self.inner.store.advance_version(seen).await?;
        state.version = version;
        self.inner.version.send_replace(version);
        self.inner.metrics.snapshot_version.set(version as i64);
        Ok(version)
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    async fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().await
    }

    /// Commits `changes` durably (one transaction, version bumped), then applies them to the
    /// in-memory state and announces the new version. Callers hold the state lock.
    async fn commit(&self, state: &mut State, changes: Vec<Change>) -> Result<(), ControlError> {
        let writes = changes.iter().map(Change::to_write).collect();
        let version = self.inner.store.commit(writes, true).await?;
        for change in changes {
            state.apply(change);
        }
        state.version = version;
        self.inner.version.send_replace(version);
        self.inner.metrics.snapshot_version.set(version as i64);
        Ok(())
    }

    /// Commits quota ledger changes (usage, leases) durably without a new snapshot version:
    /// proxies learn them through lease exchanges, not pushes.
    async fn commit_ledger(
        &self,
        state: &mut State,
        changes: Vec<Change>,
    ) -> Result<(), ControlError> {
        let writes = changes.iter().map(Change::to_write).collect();
        self.inner.store.commit(writes, false).await?;
        for change in changes {
            state.apply(change);
        }
        Ok(())
    }
}

/// Runs a standalone control plane until `shutdown` fires: binds `control.listen` and
/// `admin.listen`, starts the pushers for `[[control.proxies]]` and the lease expiry sweep,
/// and on shutdown lets both listeners drain their requests in flight.
pub async fn run_control(
    config: Config,
    shutdown: Shutdown,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // On SQLite the store lives in data_dir (by default): one process per data_dir. On
    // PostgreSQL many replicas share the store and none owns a directory.
    let _data_dir = if config.database_url.starts_with("sqlite://") {
        Some(crate::data_dir::DataDir::claim(&config.data_dir)?)
    } else {
        None
    };
    let cp = ControlPlane::open(&config).await?;
    let listener = crate::bind::bind("control.listen", config.control.listen).await?;
    let admin = crate::bind::bind("admin.listen", config.admin.listen).await?;
    tracing::info!(
        listen = %listener.local_addr()?,
        admin = %admin.local_addr()?,
        proxies = config.control.proxies.len(),
        version = cp.version(),
        store = %crate::config::redact_url(&config.database_url),
        "control plane listening"
    );
    let push = cp.spawn_pushers(shutdown.clone());
    cp.spawn_lease_expiry(shutdown.clone());
    let admin_router = cp.admin_router(push);
    let admin_shutdown = shutdown.clone();
    let admin_task = tokio::spawn(async move {
        axum::serve(admin, admin_router)
            .with_graceful_shutdown(admin_shutdown.wait())
            .await
    });
    serve(listener, cp, shutdown).await?;
    admin_task.await??;
    tracing::info!("control plane stopped");
    Ok(())
}

/// Serves the control API on `listener` until `shutdown` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cp: ControlPlane,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    axum::serve(listener, cp.router())
        .with_graceful_shutdown(shutdown.wait())
        .await
}
