//! The control plane (`marketgate control`): market API (CONTRACT §3), Huawei-APIG-v2
//! management API (§4), the durable store, and the snapshot source for the data plane.
//!
//! Design: the store is the truth, and any number of replicas may share it (PostgreSQL). Each
//! replica keeps a follower cache of the store, a [`State`] at a version of the store. Every
//! answer first catches the cache up to the store's current version (one query, shared by
//! the requests that arrive together: read-your-writes across replicas) and takes its own view of it (a clone: persistent maps, a few
//! pointer copies). A write then validates against its view (for precise errors), and
//! commits ONE transaction whose own statements decide conflicts: compare-and-swap on each
//! record's revision, uniqueness claims (names, url_domain, app keys, order_id) and the next
//! snapshot version, taken last so that conflicting commits get versions in commit order
//! (version N is the store's settled content at N on every replica: `store::postgres`). A commit refused by
//! those checks is [`ControlError::Contended`]: the request runs again on a caught-up view, a
//! bounded number of times ([`MAX_WRITE_ATTEMPTS`]), and now answers what the winner made
//! true (the same purchase for the same `order_id`, 400 APIG.3305 for a url_domain taken).
//! Every 2xx is durable before it is sent. Replicas follow each other's commits through the
//! store's notifications (LISTEN/NOTIFY), with a poll every [`FOLLOW_POLL_INTERVAL`] so that
//! a lost notification costs latency, never a change, and announce each new version on their
//! watch channel.
//!
//! No lock is held across a store's commit: the cache's mutex ([`Cache`]) is taken only to
//! read or move it (pointer copies and applying records already parsed). Requests of one
//! replica commit concurrently, like requests of different replicas, and the store orders
//! them; each commit is applied to the cache in version order ([`Cache::settle`]), and
//! whatever version the cache missed is read from the store, one read at a time per replica,
//! shared by every request that arrived before it began ([`CatchUps`]), and without the
//! records of the replica's own commits that the cache holds already.
//!
//! The quota ledgers (`leases`) live in their own rows, changed under row locks.
//!
//! This module owns wiring (`ControlPlane`, the routers, `run_control`) and the commit path;
//! request logic lives in `management` and `market` (a group's bound domains in `domains`,
//! certificates in `certificates`), the snapshot build in `publish`,
//! publishing it once per version to the proxies that subscribe in `subscriptions`, the admin
//! listener in `admin`, its metrics in `metrics`, the wording of every refused value (the
//! rule it broke) in `rule`.

pub mod admin;
pub mod apis;
pub mod app_auths;
pub mod apps;
pub mod auth;
pub mod certificates;
pub mod domains;
pub mod error;
pub mod groups;
pub mod leases;
pub mod management;
pub mod market;
pub mod market_requests;
pub mod metrics;
pub mod openapi;
pub mod publications;
pub mod publish;
pub mod rule;
pub mod state;
pub mod store;
pub mod subscriptions;
pub mod throttle_allotments;
pub mod throttle_bindings;
pub mod throttle_specials;
pub mod throttles;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::extract::State as AxState;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::Router;
use tokio::sync::watch;

use crate::config::Config;
use crate::shutdown::Shutdown;

use subscriptions::{SubscriptionMetrics, Subscriptions};

use auth::Call;
pub use error::ControlError;
use state::{Change, State};
use store::{Commit, LedgerUpdate, Read, Store, StoreError};

/// How many times one request runs when the store refuses its commit for a conflict (each
/// time on the caught-up state), before it answers the conflict.
pub const MAX_WRITE_ATTEMPTS: u32 = 8;
/// How often a replica asks the store for new versions even without a notification.
pub const FOLLOW_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The control plane: cheap to clone, all clones share one state and store.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Config,
    store: Box<dyn Store>,
    /// The follower cache. A std mutex: it is never held across an `.await`. In an `Arc` so
    /// that the metrics registry can read it at scrape time (weakly).
    cache: Arc<Mutex<Cache>>,
    version: watch::Sender<u64>,
    metrics: metrics::ControlMetrics,
    /// `marketgate serve`'s data plane, whose unreported calls a ledger read reports first.
    local_usage: std::sync::OnceLock<Weak<dyn leases::LocalUsage>>,
    /// Reads of the store's changes, one at a time, each shared by every caller that arrived
    /// before it began ([`ControlPlane::catch_up`]).
    catch_ups: CatchUps,
}

/// The replica's catch-ups: one reads the store at a time, and a caller whose arrival came
/// before a catch-up began takes that one's outcome instead of reading the store itself.
/// 100 requests arriving together cost two reads of the store, not 100 (each of which parsed
/// every record committed since the cache's version: the work per request grew with the
/// number of requests in flight, and with the replicas writing: BENCHMARKS.md).
#[derive(Debug, Default)]
struct CatchUps {
    /// The number of catch-ups begun.
    begun: std::sync::atomic::AtomicU64,
    /// Held while one reads the store: the last one finished, by its number, and the store's
    /// unavailability when that is how it ended.
    finished: tokio::sync::Mutex<(u64, Option<String>)>,
}

/// A replica's follower cache: the store's state at `state.version`, and this replica's own
/// commits that came back ahead of a version the cache has not applied yet.
#[derive(Debug, Default)]
pub struct Cache {
    state: State,
    /// Own commits by version, each change with its new revision: applied as soon as the
    /// cache reaches the version before them; dropped once a catch-up passes them.
    ahead: BTreeMap<u64, Vec<(Change, u64)>>,
}

impl Cache {
    /// The cached state as a value of its own (cheap: persistent maps).
    pub fn view(&self) -> State {
        self.state.clone()
    }

    /// Applies a commit this replica made at `version` (its changes with their new
    /// revisions) once every version before it is applied: at once when it is the next
    /// version, later (from `ahead`) otherwise, never when the cache is already past it.
    /// Returns the cache's version when it moved.
    fn settle(&mut self, version: u64, applied: Vec<(Change, u64)>) -> Option<u64> {
        if version <= self.state.version {
            return None;
        }
        self.ahead.insert(version, applied);
        self.apply_ahead()
    }

    /// Applies what the store holds after the cache's version (`changes`, parsed, read at
    /// `version`, without the records whose last write is an own commit that was waiting in
    /// `ahead` when they were read), unless the cache is already there. Returns the cache's
    /// version when it moved.
    fn catch_up(&mut self, version: u64, changes: Vec<(Change, u64)>) -> Option<u64> {
        if version <= self.state.version {
            return None;
        }
        // First the own commits up to `version` (in version order): the records left out of
        // the read are among them. Then the records read, each the latest of a record
        // written after the version the read started from (at most the cache's): a record
        // also written by an own commit here was written again later, and the read has that
        // later write. Together: the store's state at `version`, whatever the cache applied
        // in between.
        let later = self.ahead.split_off(&(version + 1));
        for (_, applied) in std::mem::replace(&mut self.ahead, later) {
            for (change, rev) in applied {
                self.state.apply_at(change, rev);
            }
        }
        for (change, rev) in changes {
            self.state.apply_at(change, rev);
        }
        self.state.version = version;
        self.apply_ahead();
        Some(self.state.version)
    }

    /// Applies the own commits that follow the cache's version without a gap.
    fn apply_ahead(&mut self) -> Option<u64> {
        let mut moved = None;
        while let Some(entry) = self.ahead.first_entry() {
            if *entry.key() != self.state.version + 1 {
                break;
            }
            let (version, applied) = entry.remove_entry();
            for (change, rev) in applied {
                self.state.apply_at(change, rev);
            }
            self.state.version = version;
            moved = Some(version);
        }
        moved
    }

    /// The cached state with this replica's own commits waiting in `ahead` applied too: every
    /// write this replica acknowledged, whether or not a commit still in flight comes before
    /// it in version order. A request's view where the store has no other writer (SQLite).
    /// Never the snapshot's state: its version would not name one content.
    pub fn latest(&self) -> State {
        let mut state = self.state.clone();
        for applied in self.ahead.values() {
            for (change, rev) in applied {
                state.apply_at(change.clone(), *rev);
            }
        }
        state
    }

    /// The cached state, borrowed (for the metrics' scrape).
    pub fn state(&self) -> &State {
        &self.state
    }
}

impl ControlPlane {
    /// Opens the store named by `config.database_url`, applies migrations, loads the state
    /// and starts following the store's changes.
    ///
    /// A fresh store is at version 0, which no proxy accepts (`snapshot::validate`: version
    /// ≥ 1); opening one commits an empty change so that the very first snapshot pushed, an
    /// empty market at version 1, is valid and proxies become ready before the first sale.
    pub async fn open(config: &Config) -> Result<ControlPlane, ControlError> {
        let store = store::open(&config.database_url, config.control.store).await?;
        let mut state = State::default();
        let everything = store.changes_since(0, &[]).await?;
        for stored in everything.records {
            state.apply_stored(stored)?;
        }
        state.version = everything.version;
        if !store.claims_built().await? {
            store.build_claims(state.all_claims()).await?;
        }
        if state.version == 0 {
            let done = store
                .commit(Commit {
                    bump_version: true,
                    ..Commit::default()
                })
                .await?;
            state.version = done.version;
        }
        let (version, _) = watch::channel(state.version);
        let cache = Arc::new(Mutex::new(Cache {
            state,
            ahead: BTreeMap::new(),
        }));
        let metrics = metrics::ControlMetrics::new(&cache);
        metrics.snapshot_version.set(*version.borrow() as i64);
        let notifications = store.notifications();
        let cp = ControlPlane {
            inner: Arc::new(Inner {
                config: config.clone(),
                store,
                cache,
                version,
                metrics,
                local_usage: std::sync::OnceLock::new(),
                catch_ups: CatchUps::default(),
            }),
        };
        tokio::spawn(follow(Arc::downgrade(&cp.inner), notifications));
        Ok(cp)
    }

    /// The admin listener's routes (health, metrics, version, the snapshot subscription,
    /// `GET /v1/proxies`, leases); `subscriptions` is what
    /// [`ControlPlane::spawn_subscriptions`] returned.
    pub fn admin_router(&self, subscriptions: Subscriptions) -> Router {
        admin::router(self.clone(), subscriptions)
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

    /// The accept loop's counters of this control plane's listeners.
    pub fn accept_metrics(&self) -> crate::accept::AcceptMetrics {
        self.inner.metrics.accept.clone()
    }

    /// The subscriptions' metrics (registered with the control plane's).
    pub fn subscription_metrics(&self) -> SubscriptionMetrics {
        self.inner.metrics.subscriptions.clone()
    }

    /// Starts publishing each version once for the proxies that subscribe (debounced by
    /// `control.push_debounce`); it stops when `shutdown` fires. Returns the handle the admin
    /// router answers polls and `GET /v1/proxies` from.
    pub fn spawn_subscriptions(&self, shutdown: Shutdown) -> Subscriptions {
        Subscriptions::start(self, shutdown)
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
        let c = "/v2/{project_id}/apigw";
        let g = "/v2/{project_id}/apigw/instances/{instance_id}/api-groups/{group_id}";
        use management as mg;
        use market as mk;
        Router::new()
            .route(
                &format!("{m}/api-groups"),
                post(retried(mg::create_group)).get(mg::list_groups),
            )
            .route(
                &format!("{m}/api-groups/{{group_id}}"),
                get(mg::show_group)
                    .put(retried(mg::update_group))
                    .delete(retried(mg::delete_group)),
            )
            .route(
                &format!("{m}/apis"),
                post(retried(mg::create_api)).get(mg::list_apis),
            )
            .route(
                &format!("{m}/apis/action"),
                post(retried(mg::publish_action)),
            )
            .route(
                &format!("{m}/apis/publish"),
                post(retried(mg::publish_batch)),
            )
            .route(
                &format!("{m}/apis/{{api_id}}"),
                get(mg::show_api)
                    .put(retried(mg::update_api))
                    .delete(retried(mg::delete_api)),
            )
            .route(&format!("{m}/envs"), get(mg::list_envs))
            .route(
                &format!("{m}/apps"),
                post(retried(mg::create_app)).get(mg::list_apps),
            )
            .route(
                &format!("{m}/apps/{{app_id}}"),
                get(mg::show_app)
                    .put(retried(mg::update_app))
                    .delete(retried(mg::delete_app)),
            )
            .route(
                &format!("{m}/apps/secret/{{app_id}}"),
                put(retried(mg::reset_secret)),
            )
            .route(
                &format!("{m}/apps/validation/{{app_id}}"),
                get(mg::check_app),
            )
            .route(
                &format!("{m}/apps/{{app_id}}/app-codes"),
                post(retried(mg::create_app_code))
                    .put(retried(mg::generate_app_code))
                    .get(mg::list_app_codes),
            )
            .route(
                &format!("{m}/apps/{{app_id}}/app-codes/{{app_code_id}}"),
                get(mg::show_app_code).delete(retried(mg::delete_app_code)),
            )
            .route(&format!("{m}/app-auths"), post(retried(mg::create_auths)))
            .route(&format!("{m}/app-auths/binded-apps"), get(mg::list_auths))
            .route(
                &format!("{m}/app-auths/{{app_auth_id}}"),
                delete(retried(mg::delete_auth)),
            )
            .route(&format!("{g}/domains"), post(retried(domains::bind)))
            .route(
                &format!("{g}/domains/{{domain_id}}"),
                put(retried(domains::update)).delete(retried(domains::unbind)),
            )
            .route(
                &format!("{g}/domains/{{domain_id}}/certificate"),
                post(retried(domains::bind_certificate)),
            )
            .route(
                &format!("{g}/domains/{{domain_id}}/certificate/{{certificate_id}}"),
                get(domains::show_certificate).delete(retried(domains::unbind_certificate)),
            )
            .route(
                &format!("{c}/certificates"),
                post(retried(certificates::create)).get(certificates::list),
            )
            .route(
                &format!("{c}/certificates/{{certificate_id}}"),
                get(certificates::show)
                    .put(retried(certificates::update))
                    .delete(retried(certificates::delete)),
            )
            .route(
                &format!("{c}/certificates/{{certificate_id}}/domains/attach"),
                post(retried(certificates::attach)),
            )
            .route(
                &format!("{c}/certificates/{{certificate_id}}/domains/detach"),
                post(retried(certificates::detach)),
            )
            .route(
                &format!("{c}/certificates/{{certificate_id}}/attached-domains"),
                get(certificates::attached_domains),
            )
            .route(
                &format!("{m}/throttles"),
                post(retried(throttles::create)).get(throttles::list),
            )
            .route(
                &format!("{m}/throttles/{{throttle_id}}"),
                get(throttles::show)
                    .put(retried(throttles::update))
                    .delete(retried(throttles::delete)),
            )
            .route(
                &format!("{m}/throttles/{{throttle_id}}/throttle-specials"),
                post(retried(throttle_specials::create)).get(throttle_specials::list),
            )
            .route(
                &format!("{m}/throttles/{{throttle_id}}/throttle-specials/{{strategy_id}}"),
                put(retried(throttle_specials::update)).delete(retried(throttle_specials::delete)),
            )
            .route(
                &format!("{m}/throttle-bindings"),
                post(retried(throttle_bindings::bind))
                    .put(retried(throttle_bindings::unbind_batch)),
            )
            .route(
                &format!("{m}/throttle-bindings/binded-apis"),
                get(throttle_bindings::bound_apis),
            )
            .route(
                &format!("{m}/throttle-bindings/unbinded-apis"),
                get(throttle_bindings::unbound_apis),
            )
            .route(
                &format!("{m}/throttle-bindings/binded-throttles"),
                get(throttle_bindings::bound_throttles),
            )
            .route(
                &format!("{m}/throttle-bindings/{{throttle_binding_id}}"),
                delete(retried(throttle_bindings::unbind)),
            )
            .route(
                &format!("{k}/api-groups/onsell/{{group_id}}"),
                put(retried(mk::onsell)).delete(retried(mk::offsell)),
            )
            .route(&format!("{k}/api-groups/onsell"), get(mk::list_onsell))
            .route(&format!("{k}/api-groups/tosell"), get(mk::list_tosell))
            .route(
                &format!("{k}/api-groups/delist/{{group_id}}"),
                delete(retried(mk::delist)),
            )
            .route(
                &format!("{k}/api-groups/reserve"),
                post(retried(mk::reserve)),
            )
            .route(
                &format!("{k}/api-groups/purchase"),
                post(retried(mk::purchase)),
            )
            .route(
                &format!("{k}/api-groups/status"),
                post(retried(mk::set_unused)),
            )
            .route(
                &format!("{k}/api-groups/status/{{group_id}}"),
                put(retried(mk::lock)),
            )
            .route(&format!("{k}/project"), put(retried(mk::freeze)))
            .route(
                &format!("{k}/unsubscribe/{{purchase_id}}"),
                delete(retried(mk::unsubscribe)),
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
            // Outermost: every request is counted and logged, refused ones included.
            .layer(axum::middleware::from_fn_with_state(
                self.inner.metrics.clone(),
                metrics::observe,
            ))
    }

    /// The full snapshot at the current version (caught up with the store first; if the store
    /// cannot be reached, the snapshot of the version this replica holds). Built from a view:
    /// no lock is held while it is built, so writes and lease exchanges never wait for it.
    pub async fn snapshot(&self) -> crate::snapshot::Snapshot {
        if let Err(error) = self.catch_up().await {
            tracing::warn!(%error, "snapshot built without catching up with the store");
        }
        publish::build(&self.cached())
    }

    /// Fires with the new snapshot version after every committed change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.version.subscribe()
    }

    /// Adds `calls` served calls to the purchase's ledger, durably (no snapshot change).
    pub async fn record_usage(&self, purchase_id: &str, calls: u64) -> Result<(), ControlError> {
        let state = self.knowing(&[purchase_id]).await?;
        if !state.purchases.contains_key(purchase_id) {
            return Err(ControlError::PurchaseNotFound(purchase_id.to_owned()));
        }
        if calls == 0 {
            return Ok(());
        }
        let failed = Arc::new(std::sync::Mutex::new(None));
        let failure = failed.clone();
        let update = LedgerUpdate {
            ids: vec![purchase_id.to_owned()],
            apply: Box::new(move |rows| {
                let doc = rows[0].1.as_deref().unwrap_or("{}");
                match state::LedgerDoc::parse(doc) {
                    Ok(mut ledger) => {
                        ledger.used = ledger.used.saturating_add(calls);
                        rows[0].1 = Some(state::LedgerDoc::render(&ledger));
                    }
                    Err(e) => *failure.lock().expect("ledger failure") = Some(e),
                }
            }),
        };
        self.commit_ledgers(update).await?;
        let failed = failed.lock().expect("ledger failure").take();
        failed.map_or(Ok(()), Err)
    }

    /// Moves the snapshot version past `seen`, a version a data plane holds that this store
    /// did not make (the store was restored from an older backup, or something else pushed
    /// to that data plane), durably, and announces it: the snapshot built next is newer than
    /// what that data plane holds, so it is accepted and replaces it. Returns the version.
    pub async fn move_version_past(&self, seen: u64) -> Result<u64, ControlError> {
        let version = self.inner.store.advance_version(seen).await?;
        // Caught up rather than jumped: another replica may have committed in between.
        self.catch_up().await?;
        Ok(version.max(self.version()))
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// A view of the state caught up with the store's current version: what every answer is
    /// built from, so that a 2xx on any replica shows every write acknowledged before it.
    /// The view is the request's own: the cache moves on meanwhile.
    ///
    /// Where this process is the store's only writer (SQLite: `data_dir` or the database file
    /// is locked to one process), the store is not asked: every write this replica
    /// acknowledged is in its cache already ([`Cache::latest`]), and reading the store would
    /// only parse the records of other requests' commits still in flight (with 100 concurrent
    /// writers, 0.3× the purchases/s: BENCHMARKS.md). A commit made by a request that was
    /// cancelled before it reached the cache was never acknowledged: the follower's poll
    /// applies it, and a conflict it causes catches up at once ([`ControlPlane::commit_with`]).
    async fn state(&self) -> Result<State, ControlError> {
        if self.inner.store.sole_writer() {
            return Ok(self.inner.cache.lock().expect("cache lock").latest());
        }
        self.catch_up().await?;
        Ok(self.cached())
    }

    /// A view of the cache as it is, without asking the store.
    fn cached(&self) -> State {
        self.inner.cache.lock().expect("cache lock").view()
    }

    /// A view that knows every purchase of `ids` the store knows: the cache as it is when it
    /// knows them all (a lease exchange or a usage report names purchases the proxy learned
    /// from a snapshot this replica built, or one at most a follow behind), else caught up.
    /// Ledger arithmetic never relies on it: the ledger rows are read locked in the commit.
    async fn knowing(&self, ids: &[&str]) -> Result<State, ControlError> {
        let state = self.cached();
        if ids.iter().all(|id| state.purchases.contains_key(*id)) {
            return Ok(state);
        }
        self.state().await
    }

    /// Applies to the cache everything the store committed before this call, and announces
    /// the new version: what read-your-writes across replicas needs (a write acknowledged by
    /// any replica before this call is in the cache after it). One catch-up reads the store
    /// at a time ([`CatchUps`]); a call takes the outcome of the first one that began after
    /// it arrived, which read the store after every write acknowledged before the call.
    async fn catch_up(&self) -> Result<(), ControlError> {
        use std::sync::atomic::Ordering;
        let catch_ups = &self.inner.catch_ups;
        let arrived = catch_ups.begun.load(Ordering::Acquire);
        let mut finished = catch_ups.finished.lock().await;
        if finished.0 > arrived {
            return match &finished.1 {
                None => Ok(()),
                Some(unavailable) => Err(StoreError::Unavailable(unavailable.clone()).into()),
            };
        }
        let number = catch_ups.begun.fetch_add(1, Ordering::AcqRel) + 1;
        let outcome = self.read_changes().await;
        match &outcome {
            Ok(()) => *finished = (number, None),
            Err(ControlError::StoreUnavailable(StoreError::Unavailable(why))) => {
                *finished = (number, Some(why.clone()));
            }
            // Anything else (a record that does not parse) is the caller's alone: the next
            // caller reads the store again.
            Err(_) => {}
        }
        outcome
    }

    /// Reads what the store committed after the cache's version, leaving out the records
    /// whose last write is one of this replica's own commits already waiting in the cache
    /// (`Cache::ahead`: parsed and applied from memory, not from the store), applies it and
    /// announces the new version. The cache's lock is taken only to apply what was read
    /// (parsed before).
    async fn read_changes(&self) -> Result<(), ControlError> {
        let (from, held) = {
            let cache = self.inner.cache.lock().expect("cache lock");
            (
                cache.state.version,
                cache.ahead.keys().copied().collect::<Vec<_>>(),
            )
        };
        let changes = self.inner.store.changes_since(from, &held).await?;
        if changes.version <= from {
            return Ok(());
        }
        let parsed = changes
            .records
            .into_iter()
            .map(state::Change::from_stored)
            .filter_map(Result::transpose)
            .collect::<Result<Vec<_>, _>>()?;
        let moved = self
            .inner
            .cache
            .lock()
            .expect("cache lock")
            .catch_up(changes.version, parsed);
        if let Some(version) = moved {
            self.announce(version);
        }
        Ok(())
    }

    /// Tells pushers, subscribers and the metrics that the cache reached `version` (the
    /// watch channel only ever moves forward).
    fn announce(&self, version: u64) {
        let moved = self.inner.version.send_if_modified(|current| {
            let newer = version > *current;
            if newer {
                *current = version;
            }
            newer
        });
        if moved {
            self.inner.metrics.snapshot_version.set(version as i64);
        }
    }

    /// Commits `changes` durably (one transaction, next version), then applies them to the
    /// request's view `state` (so that its answer shows them) and to the cache.
    async fn commit(&self, state: &mut State, changes: Vec<Change>) -> Result<(), ControlError> {
        self.commit_with(state, &[], changes, None).await
    }

    /// [`ControlPlane::commit`], also requiring that the records `reads` (`(kind, id)`) the
    /// changes were decided on are unchanged at commit, and with a ledger update in the same
    /// transaction. The revisions compared are those of the view `state`. No lock is held
    /// while the store commits. A conflict is [`ControlError::Contended`]: the request runs
    /// again ([`retried`]) on a view caught up with the winner (a conflict is only seen once
    /// the winner committed: claims and revisions wait for the row's holder).
    async fn commit_with(
        &self,
        state: &mut State,
        reads: &[(&'static str, &str)],
        changes: Vec<Change>,
        ledger: Option<LedgerUpdate>,
    ) -> Result<(), ControlError> {
        refuse_unpublishable(state, &changes)?;
        let commit = Commit {
            reads: reads
                .iter()
                .map(|(kind, id)| Read {
                    kind,
                    id: (*id).to_owned(),
                    rev: state.rev(kind, id).unwrap_or(0),
                })
                .collect(),
            writes: changes.iter().map(|c| c.to_write(state)).collect(),
            ledger,
            bump_version: true,
        };
        let done = match self.inner.store.commit(commit).await {
            Ok(done) => done,
            Err(StoreError::Conflict(conflict)) => {
                tracing::debug!(%conflict, "commit refused by the store");
                if self.inner.store.sole_writer() {
                    // The winner's commit may still be on its way to the cache (or its
                    // request was cancelled): the run again must see it, and its view is
                    // not caught up by itself (`state`).
                    self.catch_up().await?;
                }
                return Err(ControlError::Contended(conflict));
            }
            Err(other) => return Err(other.into()),
        };
        let applied: Vec<(Change, u64)> = changes.into_iter().zip(done.revs).collect();
        for (change, rev) in &applied {
            state.apply_at(change.clone(), *rev);
        }
        let moved = self
            .inner
            .cache
            .lock()
            .expect("cache lock")
            .settle(done.version, applied);
        if let Some(version) = moved {
            self.announce(version);
        }
        Ok(())
    }

    /// Commits a ledger update alone: no snapshot version (proxies learn ledgers through
    /// lease exchanges, not pushes), and no lock: ledger rows are locked by the store.
    async fn commit_ledgers(&self, update: LedgerUpdate) -> Result<(), ControlError> {
        self.inner
            .store
            .commit(Commit {
                ledger: Some(update),
                ..Commit::default()
            })
            .await?;
        Ok(())
    }
}

/// Validates what `changes` would publish, with the records they refer to
/// ([`publish::neighbourhood`]), with the proxies' own validator: a record the proxies would
/// refuse is [`ControlError::Unpublishable`] and is never stored (stored, it would make every
/// push of every later version fail). `state` is the write's view; the changes are applied
/// to a copy of it (persistent maps: the copy shares them).
fn refuse_unpublishable(state: &State, changes: &[Change]) -> Result<(), ControlError> {
    let mut after = state.clone();
    for change in changes {
        after.apply_at(change.clone(), 0);
    }
    let part = publish::neighbourhood(&after, changes);
    match crate::snapshot::validate::validate(&part) {
        Ok(_) => Ok(()),
        Err(refusal) => Err(ControlError::Unpublishable(publish::name_records(
            &part, refusal,
        ))),
    }
}

/// Follows the store's notifications for as long as the control plane lives: each announced
/// version (or, every [`FOLLOW_POLL_INTERVAL`], any version not announced) is caught up and
/// announced on the watch channel, so pushers and subscribers serve it. SQLite has no
/// notifications: there the follower only polls, which catches up a commit whose request was
/// cancelled after the store made it and before it reached the cache.
async fn follow(cp: Weak<Inner>, mut notifications: Option<watch::Receiver<u64>>) {
    // Logged once per state change, not once per poll (a store down for an hour would
    // otherwise log 3 600 lines).
    let mut failing = false;
    loop {
        let notified = match notifications.as_mut() {
            Some(channel) => {
                match tokio::time::timeout(FOLLOW_POLL_INTERVAL, channel.changed()).await {
                    Ok(Err(_)) => return, // the listener is gone: the store was dropped
                    Ok(Ok(())) => Some(*channel.borrow_and_update()),
                    Err(_) => None,
                }
            }
            None => {
                tokio::time::sleep(FOLLOW_POLL_INTERVAL).await;
                None
            }
        };
        let Some(inner) = cp.upgrade() else {
            return;
        };
        let cp = ControlPlane { inner };
        if notified.is_some_and(|version| version <= cp.version()) {
            continue; // our own commit, already applied
        }
        match cp.catch_up().await {
            Err(error) if !failing => {
                tracing::warn!(%error, "following the store failed; retrying (logged once until it succeeds)");
                failing = true;
            }
            Err(_) => {}
            Ok(_) if failing => {
                tracing::info!("following the store again");
                failing = false;
            }
            Ok(_) => {}
        }
    }
}

/// A boxed handler future, as [`retried`] returns it.
type Answer = Pin<Box<dyn Future<Output = Response> + Send>>;

/// Runs `handler` again while the store refuses its commit for a conflict
/// ([`ControlError::Contended`]), at most [`MAX_WRITE_ATTEMPTS`] times: each run validates
/// against the state the refused commit caught up, so it answers what the winner made true.
fn retried<H, F>(
    handler: H,
) -> impl Fn(AxState<ControlPlane>, Call) -> Answer + Clone + Send + 'static
where
    H: Fn(AxState<ControlPlane>, Call) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response, ControlError>> + Send + 'static,
{
    move |AxState(cp): AxState<ControlPlane>, call: Call| {
        let handler = handler.clone();
        Box::pin(async move {
            let mut attempt = 1;
            loop {
                match handler(AxState(cp.clone()), call.clone()).await {
                    Err(ControlError::Contended(conflict)) if attempt < MAX_WRITE_ATTEMPTS => {
                        tracing::debug!(%conflict, attempt, "request runs again");
                        attempt += 1;
                    }
                    other => return other.into_response(),
                }
            }
        })
    }
}

/// Runs a standalone control plane until `shutdown` fires: binds `control.listen` and
/// `admin.listen`, starts publishing snapshots to subscribed proxies and the lease expiry sweep,
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
    // A SQLite file kept outside data_dir needs its own lock (one process per database).
    let _database = store::lock_sqlite_file(&config.database_url, &config.data_dir)?;
    let admin_tls = crate::plane_tls::admin_acceptor(config.admin.tls.as_ref())?;
    let cp = ControlPlane::open(&config).await?;
    let listener = crate::bind::bind("control.listen", config.control.listen).await?;
    let admin = crate::bind::bind("admin.listen", config.admin.listen).await?;
    tracing::info!(
        listen = %listener.local_addr()?,
        admin = %admin.local_addr()?,
        admin_tls = config.admin.tls.is_some(),
        version = cp.version(),
        store = %crate::config::redact_url(&config.database_url),
        "control plane listening"
    );
    let subscriptions = cp.spawn_subscriptions(shutdown.clone());
    cp.spawn_lease_expiry(shutdown.clone());
    let admin_router = cp.admin_router(subscriptions);
    let admin_spec = crate::accept::router_spec("admin", config.admin.connections, &config);
    let admin_task = tokio::spawn(crate::accept::serve_router(
        admin,
        admin_spec,
        admin_tls,
        cp.accept_metrics(),
        admin_router,
        shutdown.clone(),
    ));
    serve(listener, cp, shutdown).await?;
    admin_task.await?;
    tracing::info!("control plane stopped");
    Ok(())
}

/// Serves the control API on `listener` until `shutdown` fires, bounded by `[control]`'s
/// connection limit and timeouts (`crate::accept`), counted in this control plane's metrics.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cp: ControlPlane,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let metrics = cp.accept_metrics();
    serve_with(listener, cp, metrics, shutdown).await
}

/// [`serve`], counted in `metrics` (`serve` counts all its listeners in the gateway's).
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    cp: ControlPlane,
    metrics: crate::accept::AcceptMetrics,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let config = cp.config();
    let spec = crate::accept::router_spec("control", config.control.connections, config);
    crate::accept::serve_router(listener, spec, None, metrics, cp.router(), shutdown).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::state::GroupRec;
    use super::*;
    use crate::snapshot::MarketState;

    fn group(id: &str) -> Change {
        Change::Group(GroupRec {
            id: id.into(),
            name: format!("group_{id}"),
            remark: String::new(),
            domain_id: "d".into(),
            project_id: "p".into(),
            instance_id: "i".into(),
            sl_domain: format!("{id}.sl"),
            url_domain: None,
            market_state: MarketState::Unlisted,
            register_time: String::new(),
            update_time: String::new(),
        })
    }

    /// A write acknowledged while a commit before it is still in flight is in every request's
    /// view on a sole-writer store (`Cache::latest`), but not in the state snapshots are built
    /// from until the version before it arrives: version N names one content.
    #[test]
    fn the_latest_view_holds_commits_waiting_behind_one_in_flight() {
        let mut cache = Cache::default();
        cache.state.version = 1;
        // Version 3 settles first; version 2 (another request's) is still in flight.
        assert_eq!(cache.settle(3, vec![(group("b"), 1)]), None);
        assert!(!cache.state().groups.contains_key("b"));
        assert!(cache.latest().groups.contains_key("b"));
        assert_eq!(cache.settle(2, vec![(group("a"), 1)]), Some(3));
        let latest = cache.latest();
        assert!(cache.state().groups.contains_key("a") && cache.state().groups.contains_key("b"));
        assert_eq!(latest.version, 3);
        assert!(latest.groups.contains_key("a") && latest.groups.contains_key("b"));
    }
}
