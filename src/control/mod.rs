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
//! This module owns wiring (`ControlPlane`, the router, `run_control`); request logic lives in
//! `management` and `market`, the snapshot build in `publish`. Pushing snapshots to proxies
//! and the admin listener are not here yet.

pub mod auth;
pub mod error;
pub mod leases;
pub mod management;
pub mod market;
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
    state: Mutex<State>,
    version: watch::Sender<u64>,
}

impl ControlPlane {
    /// Opens the store named by `config.database_url`, applies migrations, loads the state.
    pub async fn open(config: &Config) -> Result<ControlPlane, ControlError> {
        let store = store::open(&config.database_url).await?;
        let state = State::from_loaded(store.load().await?)?;
        let (version, _) = watch::channel(state.version);
        Ok(ControlPlane {
            inner: Arc::new(Inner {
                config: config.clone(),
                store,
                state: Mutex::new(state),
                version,
            }),
        })
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

/// Runs a standalone control plane until `shutdown` fires.
pub async fn run_control(
    config: Config,
    shutdown: Shutdown,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let cp = ControlPlane::open(&config).await?;
    let listener = tokio::net::TcpListener::bind(config.control.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, store = %crate::config::redact_url(&config.database_url), "control plane listening");
    serve(listener, cp, shutdown).await?;
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
