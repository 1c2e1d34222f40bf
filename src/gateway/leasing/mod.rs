//! The lease client: keeps this proxy's quota cells supplied with calls leased by the control
//! plane, and reports what they served (docs/quota-leases.md).
//!
//! In three parts: this module is the policy (the exchange loop, the per-purchase
//! bookkeeping — what was reported, when the lease expires, the recent rate — and how much to
//! ask for: `proxy.outage_budget_secs` of recent traffic, so that a proxy rides out an outage
//! of its control planes that long); [`transport`] carries an exchange to the control plane;
//! [`state`] is `lease-state.json` and its log in `data_dir` (what the control plane has
//! acknowledged, so that a restart reports exactly the rest). It does not decide requests:
//! the handler takes calls from cells; this module only moves the cells' limits, and tells
//! the quota registry whether the control plane answers (a dry cell is then refused at once).
//!
//! Invariants:
//! - A limited cell's `limit - used` is what this proxy holds; after every exchange it is set
//!   to the control plane's `held` for that purchase, counted from the `used` reported.
//! - Calls are given back (asked by the control plane's `recall`, or of this proxy's own
//!   accord when it holds far more than its traffic needs) by taking them out of the cell
//!   first ([`QuotaCell::give_up`]), persisting the running total, and only then reporting it:
//!   the control plane never leases elsewhere a call this proxy could still serve.
//! - A lease not renewed by its expiry (minus [`REVOKE_MARGIN_SECS`]) is dropped locally, so
//!   the control plane, which reclaims it only after a further grace, never hands out calls
//!   this proxy could still serve.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::gateway::quota::QuotaCell;
use crate::gateway::Gateway;
use crate::lease::{LeaseExchange, LeaseWant, UsageReport};
use crate::shutdown::Shutdown;

pub mod state;
pub mod transport;

pub use state::STATE_FILE;
use state::{
    append_log, replay_log, rewrite_state, write_state, AckedPurchase, AckedState, LoggedPurchase,
    StateLog, STATE_LOG_COMPACT_AFTER,
};
pub use transport::{HttpLeaseService, LeaseService, LeaseServiceError, EXCHANGE_TIMEOUT};

/// How often the client looks at its cells, unless a caller asks for a refill or a call is
/// taken sooner.
pub const TICK: Duration = Duration::from_millis(100);
/// Exchanges prompted by usage are at least this far apart: under load, reports batch.
pub const MIN_EXCHANGE_INTERVAL: Duration = Duration::from_millis(20);
/// An exchange that would only report usage waits this share of the time the thinnest busy
/// lease lasts at its rate (within [`MIN_EXCHANGE_INTERVAL`] and [`MAX_REPORT_INTERVAL`]):
/// the interval stretches with lease size, so that the store's load follows proxies, not
/// calls (docs/capacity.md). A lease of 60 s of traffic: reports once a second.
const REPORT_SHARE: f64 = 0.02;
/// The longest a report of usage waits while traffic flows (a fleet's buyer views lag by at
/// most this plus an exchange).
pub const MAX_REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// A lease is dropped locally this many seconds before it expires unless renewed.
pub const REVOKE_MARGIN_SECS: i64 = 5;
/// A lease is renewed when less than this share of its time to live is left.
const RENEW_WHEN_LEFT: f64 = 0.5;
/// Weight of the newest sample in the rate's moving average.
const RATE_SMOOTHING: f64 = 0.3;
/// A smoothed rate below this many calls per second counts as none (about 2.5 s after the
/// last call at 100 calls/s), so that a quiet cell stops being watched.
const IDLE_RATE: f64 = 0.01;

/// Bookkeeping of one purchase.
#[derive(Debug, Default, Clone, Copy)]
struct Tracked {
    reported: u64,
    /// Calls held at the last exchange.
    held: u64,
    /// Epoch seconds; 0 when nothing is held.
    expires_at: i64,
    /// Calls per second offered (served, or turned away while waiting for a refill),
    /// smoothed.
    rate: f64,
    last_used: u64,
    last_turned_away: u64,
    /// Calls given back from leases in all (this life of the data directory).
    returned: u64,
    /// `returned` as last persisted: what an exchange may report.
    returned_durable: u64,
    /// `returned` as the control plane acknowledged it (0 after a start: reported again).
    returned_acked: u64,
    /// `reported`, `held`, `expires_at` or `returned` changed since the state was last
    /// persisted.
    dirty: bool,
}

impl Tracked {
    fn acked(&self) -> AckedPurchase {
        AckedPurchase {
            reported: self.reported,
            held: self.held,
            expires_at: self.expires_at,
            returned: self.returned,
        }
    }

    /// Calls given back and persisted that the control plane has not acknowledged.
    fn return_unreported(&self) -> bool {
        self.returned_durable > self.returned_acked
    }

    /// Takes up to `calls` out of `cell` (a lease's calls given back); returns how many.
    fn give_up(&mut self, cell: &QuotaCell, calls: u64) -> u64 {
        let given = cell.give_up(calls);
        if given > 0 {
            self.returned += given;
            self.held = self.held.saturating_sub(given);
            self.dirty = true;
        }
        given
    }
}

/// Keeps the cells of one gateway leased.
pub struct LeaseClient {
    gateway: Gateway,
    service: Arc<dyn LeaseService>,
    node_id: String,
    min_calls: u64,
    max_calls: u64,
    /// A refill asks for this many seconds of the purchase's recent traffic.
    outage_budget_secs: f64,
    state_path: PathBuf,
    incarnation: String,
    book: Mutex<HashMap<String, Tracked>>,
    /// Where the book's changes are persisted (behind an `Arc` for the blocking pool).
    state_log: Arc<Mutex<StateLog>>,
    /// The cells each pass looks at: those the registry noticed (a call taken, a refill
    /// asked) and those still holding a lease, moving or unreported; an idle cell without a
    /// lease leaves. So a pass costs what is active, not every purchase of the market.
    watched: Mutex<HashMap<Arc<str>, Arc<QuotaCell>>>,
    /// One exchange at a time.
    exchanging: tokio::sync::Mutex<()>,
    /// Set once [`LeaseClient::recover`] has reported the journal.
    recovered: tokio::sync::watch::Sender<bool>,
    /// Calls were given back and not yet acknowledged: the next exchange goes soon.
    returns_pending: AtomicBool,
    /// When the last exchange was sent: a report alone waits [`LeaseClient::report_interval`]
    /// after it.
    last_exchange: Mutex<Option<Instant>>,
}

/// Whether an exchange may wait when all it has to say is usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Urgency {
    /// A pass of the loop: a report alone waits out the report interval.
    Paced,
    /// A caller needs the report now (a ledger read, the clean stop).
    Now,
}

impl LeaseClient {
    pub fn new(gateway: Gateway, service: Arc<dyn LeaseService>) -> LeaseClient {
        let config = &gateway.inner.config;
        let state_path = config.data_dir.join(STATE_FILE);
        let mut acked: AckedState = std::fs::read(&state_path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        let log_lines = replay_log(&config.data_dir, &mut acked);
        let first_life = acked.incarnation.is_empty();
        let incarnation = if first_life {
            uuid::Uuid::new_v4().simple().to_string()
        } else {
            acked.incarnation
        };
        let acked_generation = acked.log_generation;
        let now = now_secs();
        let quota = gateway.quota();
        let mut watched = HashMap::new();
        let book = acked
            .purchases
            .into_iter()
            .map(|(id, acked)| {
                // A lease still valid when this proxy stopped is still its own: serve from
                // it until it expires (with the control plane down, that is all there is).
                let valid = acked.expires_at - REVOKE_MARGIN_SECS > now;
                if let Some(cell) = quota.get(&id).filter(|c| c.is_leased() && valid) {
                    cell.set_limit((acked.reported + acked.held).max(cell.used()));
                    watched.insert(Arc::clone(cell.shared_purchase_id()), cell);
                }
                let tracked = Tracked {
                    reported: acked.reported,
                    held: if valid { acked.held } else { 0 },
                    expires_at: if valid { acked.expires_at } else { 0 },
                    last_used: acked.reported,
                    returned: acked.returned,
                    returned_durable: acked.returned,
                    ..Tracked::default()
                };
                (id, tracked)
            })
            .collect();
        let client = LeaseClient {
            node_id: config.proxy.node_id.clone(),
            min_calls: config.proxy.lease_min_calls,
            max_calls: config.proxy.lease_max_calls,
            outage_budget_secs: config.proxy.outage_budget.as_secs_f64(),
            state_path,
            incarnation,
            book: Mutex::new(book),
            state_log: Arc::new(Mutex::new(StateLog {
                dir: config.data_dir.clone(),
                generation: acked_generation,
                lines: log_lines,
            })),
            watched: Mutex::new(watched),
            exchanging: tokio::sync::Mutex::new(()),
            recovered: tokio::sync::watch::channel(false).0,
            returns_pending: AtomicBool::new(false),
            last_exchange: Mutex::new(None),
            service,
            gateway,
        };
        if first_life {
            // On disk before any report names it: a report made under an incarnation that a
            // restart forgot would be counted again.
            if let Err(error) = write_state(&client.state_path, &client.acked_state(0)) {
                client.gateway.metrics().quota_journal_errors.inc();
                tracing::error!(%error, "cannot write the lease state");
            }
        }
        client
    }

    /// After a start: reports what the journal says was served beyond what the control plane
    /// acknowledged (after a crash, up to one journal block more than really served), and
    /// gives back every lease this node held, so it starts clean. Retries until it succeeds
    /// or `shutdown` fires; meanwhile limited cells serve nothing they were not leased.
    pub async fn recover(&self, shutdown: &Shutdown) {
        let quota = self.gateway.quota();
        let mut backoff = Backoff::default();
        loop {
            let reports: Vec<UsageReport> = {
                let book = self.book.lock().expect("lease book lock");
                let mut reports: HashMap<&str, UsageReport> = quota
                    .recovered()
                    .iter()
                    .filter_map(|(id, journaled)| {
                        let reported = book.get(id).map_or(0, |t| t.reported);
                        (*journaled > reported).then(|| {
                            let report = UsageReport {
                                purchase_id: id.clone(),
                                used: journaled - reported,
                                since: Some(reported),
                                returned: None,
                            };
                            (id.as_str(), report)
                        })
                    })
                    .collect();
                // The running totals of calls given back: the control plane's tally then
                // agrees with this proxy's before any new lease is granted.
                for (id, tracked) in book.iter().filter(|(_, t)| t.returned_durable > 0) {
                    reports
                        .entry(id.as_str())
                        .or_insert_with(|| UsageReport {
                            purchase_id: id.clone(),
                            used: 0,
                            since: Some(tracked.reported),
                            returned: None,
                        })
                        .returned = Some(tracked.returned_durable);
                }
                reports.into_values().collect()
            };
            let exchange = LeaseExchange {
                node_id: self.node_id.clone(),
                reports: reports.clone(),
                wants: Vec::new(),
                release_all: true,
                leaving: false,
                incarnation: Some(self.incarnation.clone()),
            };
            match self.service.exchange(exchange).await {
                Ok(_) => {
                    {
                        let mut book = self.book.lock().expect("lease book lock");
                        for report in &reports {
                            let tracked = book.entry(report.purchase_id.clone()).or_default();
                            tracked.reported += report.used;
                            tracked.last_used = tracked.reported;
                            tracked.returned_acked = report.returned.unwrap_or(0);
                            tracked.dirty = true;
                        }
                        for tracked in book.values_mut() {
                            tracked.dirty |= tracked.held > 0 || tracked.expires_at > 0;
                            tracked.held = 0;
                            tracked.expires_at = 0;
                        }
                    }
                    self.persist().await;
                    quota.set_control_unreachable(false);
                    // Whatever a cell held before the restart was just given back.
                    for cell in quota.cells() {
                        if cell.is_leased() {
                            cell.set_limit(cell.used());
                        }
                    }
                    tracing::info!(
                        reported = reports.len(),
                        "leases recovered from the journal"
                    );
                    self.recovered.send_replace(true);
                    return;
                }
                Err(error) => {
                    self.gateway
                        .metrics()
                        .quota_lease_requests
                        .with_label_values(&["error"])
                        .inc();
                    if backoff.failures() == 0 {
                        tracing::warn!(%error, "cannot report the journal to the control plane yet; retrying with backoff");
                    }
                    quota.set_control_unreachable(true);
                    // Meanwhile the cells serve what they held before the restart, and no
                    // longer than that lease is valid.
                    self.revoke_expired();
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        _ = shutdown.clone().wait() => return,
                    }
                }
            }
        }
    }

    /// Names this life of the data directory (the subscription uses the same one).
    pub fn incarnation(&self) -> &str {
        &self.incarnation
    }

    /// Resolves once the journal has been reported after the start.
    pub async fn wait_recovered(&self) {
        let _ = self.recovered.subscribe().wait_for(|done| *done).await;
    }

    /// Exchanges whenever a cell runs low, a caller waits, a lease needs renewing, or usage
    /// is unreported; until `shutdown` fires.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        let mut last_tick = Instant::now();
        // The last exchange prompted by usage, and the last prompted by a waiting caller, each
        // paced on its own: the first report after a quiet spell goes at once (a buyer's view
        // then shows the call), later ones batch; a caller that keeps waiting (its calls are
        // being asked back from another proxy) asks again at this pace, not in a loop as fast
        // as the control plane answers. One clock for both made the report of a purchase's
        // first call (which always follows the refill that leased it) wait out the interval
        // behind that refill.
        let mut last_usage: Option<Instant> = None;
        let mut last_refill: Option<Instant> = None;
        let mut backoff = Backoff::default();
        loop {
            let quota = self.gateway.quota();
            // Calls given back wait, out of every cell, until reported: report them soon.
            let tick = if self.returns_pending.load(Ordering::Acquire) {
                MIN_EXCHANGE_INTERVAL
            } else {
                TICK
            };
            let prompted = tokio::select! {
                _ = tokio::time::sleep(tick) => None,
                _ = quota.refill_wanted() => Some((&mut last_refill, MIN_EXCHANGE_INTERVAL)),
                _ = quota.usage_noted() => Some((&mut last_usage, self.report_interval())),
                _ = shutdown.clone().wait() => return,
            };
            if let Some((last, interval)) = prompted {
                if let Some(since) = last.map(|at| at.elapsed()) {
                    if since < interval {
                        // A caller waiting for a refill cuts a report's wait short.
                        tokio::select! {
                            _ = tokio::time::sleep(interval - since) => {}
                            _ = quota.refill_wanted(), if interval > MIN_EXCHANGE_INTERVAL => {}
                            _ = shutdown.clone().wait() => return,
                        }
                    }
                }
                *last = Some(Instant::now());
            }
            let elapsed = last_tick.elapsed().as_secs_f64();
            last_tick = Instant::now();
            match self.pass(elapsed).await {
                // A pass with nothing to say proves nothing: the state changes only with an
                // exchange's outcome (set in `exchange`).
                Ok(()) if quota.control_unreachable() => {}
                Ok(()) => {
                    if backoff.failures() > 0 {
                        tracing::info!("lease exchanges succeed again");
                    }
                    backoff.reset();
                }
                Err(error) => {
                    // Logged once per outage, not per attempt; buyers whose lease runs dry
                    // meanwhile are answered 503 at once (`QuotaRegistry::control_unreachable`).
                    if backoff.failures() == 0 {
                        tracing::warn!(%error, "lease exchanges failing; serving from the leases held, retrying with backoff");
                    }
                    if let LeaseServiceError::Refused { status: 409, body } = &error {
                        if backoff.failures() == 0 {
                            tracing::error!(node = %self.node_id, reason = %body, "the control plane refuses this proxy's node id");
                        }
                    }
                    let delay = backoff.next_delay();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.clone().wait() => return,
                    }
                }
            }
        }
    }

    /// One look at the cells, `elapsed_secs` after the last: updates the watched cells'
    /// rates, exchanges if there is anything to report or ask for, and drops the leases that
    /// expired unrenewed (even when the exchange failed). What `run` does on each wake-up.
    pub async fn pass(&self, elapsed_secs: f64) -> Result<(), LeaseServiceError> {
        let cells = self.watched_cells();
        self.update_rates(&cells, elapsed_secs);
        let exchanged = self.exchange(cells, false, Urgency::Paced).await;
        self.unwatch_idle();
        self.revoke_expired();
        exchanged
    }

    /// Reports, before it returns, every call of `purchase_ids` taken so far and not yet
    /// reported: one exchange (as a pass makes it, over the watched cells), none when those
    /// purchases have nothing unreported. `marketgate serve` runs it before its control plane
    /// reads a ledger, so that a buyer's view shows every call answered before the read.
    pub async fn report_taken(&self, purchase_ids: &[String]) -> Result<(), LeaseServiceError> {
        let quota = self.gateway.quota();
        let unreported = {
            let book = self.book.lock().expect("lease book lock");
            purchase_ids.iter().any(|id| {
                quota
                    .get(id)
                    .is_some_and(|cell| cell.used() > book.get(id).map_or(0, |t| t.reported))
            })
        };
        if !unreported {
            return Ok(());
        }
        // A call is noticed (`QuotaRegistry::note_usage`) before its answer is sent, and a
        // watched cell with calls unreported stays watched: the exchange names every one.
        self.exchange(self.watched_cells(), false, Urgency::Now)
            .await
    }

    /// The last exchange at a clean shutdown (after traffic drained and the journal was
    /// flushed): reports everything and gives back what is held.
    pub async fn finish(&self) -> Result<(), LeaseServiceError> {
        self.exchange(self.gateway.quota().cells(), true, Urgency::Now)
            .await
    }

    /// Adds the cells the registry noticed to the watched ones and returns all watched.
    fn watched_cells(&self) -> Vec<Arc<QuotaCell>> {
        let noticed = self.gateway.quota().drain_noticed();
        let mut watched = self.watched.lock().expect("watched cells lock");
        for cell in noticed {
            watched.insert(Arc::clone(cell.shared_purchase_id()), cell);
        }
        watched.values().cloned().collect()
    }

    /// Stops watching the cells with nothing left to do: no lease held, no rate, nothing
    /// unreported (a call taken later lists the cell again: `QuotaRegistry::note_usage`).
    fn unwatch_idle(&self) {
        let book = self.book.lock().expect("lease book lock");
        self.watched
            .lock()
            .expect("watched cells lock")
            .retain(|id, cell| {
                book.get(&**id).is_none_or(|t| {
                    t.held > 0
                        || t.expires_at > 0
                        || t.rate >= IDLE_RATE
                        || cell.used() > t.reported
                        || t.returned > t.returned_acked
                })
            });
    }

    fn update_rates(&self, cells: &[Arc<QuotaCell>], elapsed_secs: f64) {
        if elapsed_secs <= 0.0 {
            return;
        }
        let mut book = self.book.lock().expect("lease book lock");
        for cell in cells {
            let used = cell.used();
            let turned_away = cell.turned_away();
            let tracked = match book.get_mut(cell.purchase_id()) {
                Some(tracked) => tracked,
                None => book.entry(cell.purchase_id().to_owned()).or_default(),
            };
            // Calls that waited for a refill count as traffic (a call served after its wait
            // counts twice: a starved proxy errs towards a larger share, never a smaller one).
            let offered = used.saturating_sub(tracked.last_used)
                + turned_away.saturating_sub(tracked.last_turned_away);
            tracked.last_turned_away = turned_away;
            let sample = offered as f64 / elapsed_secs;
            tracked.rate = RATE_SMOOTHING * sample + (1.0 - RATE_SMOOTHING) * tracked.rate;
            if tracked.rate < IDLE_RATE {
                tracked.rate = 0.0;
            }
            tracked.last_used = used;
        }
    }

    /// How long a report of usage alone waits after the last exchange while traffic flows:
    /// [`REPORT_SHARE`] of the time the thinnest busy lease of this proxy lasts at its rate,
    /// within [`MIN_EXCHANGE_INTERVAL`] and [`MAX_REPORT_INTERVAL`] (the longest when the
    /// busy cells are unlimited: nothing leased runs out). After a quiet spell (no cell has a
    /// rate) [`MIN_EXCHANGE_INTERVAL`]: the first report goes at once.
    fn report_interval(&self) -> Duration {
        let watched: Vec<Arc<QuotaCell>> = self
            .watched
            .lock()
            .expect("watched cells lock")
            .values()
            .cloned()
            .collect();
        let book = self.book.lock().expect("lease book lock");
        let mut busy = false;
        let mut thinnest = f64::INFINITY;
        for cell in &watched {
            let rate = book.get(cell.purchase_id()).map_or(0.0, |t| t.rate);
            if rate <= 0.0 {
                continue;
            }
            busy = true;
            if cell.is_leased() {
                let left = cell.limit().saturating_sub(cell.used());
                thinnest = thinnest.min(left as f64 / rate);
            }
        }
        if !busy {
            return MIN_EXCHANGE_INTERVAL;
        }
        let wait = (thinnest * REPORT_SHARE).min(MAX_REPORT_INTERVAL.as_secs_f64());
        Duration::from_secs_f64(wait).max(MIN_EXCHANGE_INTERVAL)
    }

    /// `proxy.outage_budget_secs` of the purchase's recent traffic, within
    /// `proxy.lease_min_calls` and `proxy.lease_max_calls`.
    fn budget(&self, tracked: &Tracked) -> u64 {
        ((tracked.rate * self.outage_budget_secs) as u64).clamp(self.min_calls, self.max_calls)
    }

    /// What this proxy would like to hold: half above the budget (told to the control plane,
    /// which sizes fair shares by it).
    fn demand(&self, tracked: &Tracked) -> u64 {
        let budget = self.budget(tracked);
        budget + budget / 2
    }

    /// What to ask for on `cell`: zero to renew only, `None` to leave it alone.
    fn want(&self, cell: &QuotaCell, tracked: &Tracked, now: i64, ttl_secs: i64) -> Option<u64> {
        if !cell.is_leased() {
            return None;
        }
        let left = cell.limit().saturating_sub(cell.used());
        let size = self.budget(tracked);
        let asked = cell.take_refill_request();
        // Never hold less than the outage budget while traffic flows, with a quarter to spare
        // for a rate that is still rising (the smoothed rate lags it): topped up to half above
        // the budget whenever it dips below a quarter above, so that an outage starting at
        // any moment finds `outage_budget_secs` of traffic in hand (as far as the fair share
        // allows). Measured: with no margin, a 60 s outage under load refused 660 calls.
        let low = left < size + size / 4;
        if asked || (tracked.rate > 0.0 && low) {
            return Some(self.demand(tracked).saturating_sub(left).max(1));
        }
        let renew_due = tracked.expires_at > 0
            && ((tracked.expires_at - now) as f64) < RENEW_WHEN_LEFT * ttl_secs as f64;
        (left > 0 && renew_due).then_some(0)
    }

    /// What to ask for on a busy `cell` that did not ask by itself, as an exchange goes
    /// anyway: up to its demand once it is an eighth of its budget below it (a cell asks by
    /// itself only at a quarter above its budget, [`LeaseClient::want`]).
    fn top_up(&self, cell: &QuotaCell, tracked: &Tracked) -> Option<u64> {
        if tracked.rate <= 0.0 {
            return None;
        }
        let left = cell.limit().saturating_sub(cell.used());
        let demand = self.demand(tracked);
        (left + self.budget(tracked) / 8 < demand).then(|| demand - left)
    }

    /// Calls of `cell` to give back of this proxy's own accord: what it holds beyond its
    /// demand once that is more than twice the demand (its traffic fell or stopped), so that
    /// an idle lease does not keep calls another proxy could serve.
    fn surplus(&self, cell: &QuotaCell, tracked: &Tracked) -> u64 {
        if !cell.is_leased() {
            return 0;
        }
        let left = cell.limit().saturating_sub(cell.used());
        let demand = self.demand(tracked);
        if left > 2 * demand {
            left - demand
        } else {
            0
        }
    }

    /// Reports what `cells` served and gave back and asks for what they need (with
    /// `release_all`, the last exchange of a clean shutdown: every cell is reported and every
    /// lease given back). Calls the answer recalls are taken out of their cells at once and
    /// reported by the next exchange. [`Urgency::Paced`]: an exchange that would only report
    /// usage is not made before the report interval passed since the last one
    /// ([`LeaseClient::report_interval`]); one that goes tops up, as it goes, every busy
    /// cell an eighth of its budget below its demand, so that a proxy's purchases ride on
    /// one exchange instead of each going when it runs low.
    async fn exchange(
        &self,
        cells: Vec<Arc<QuotaCell>>,
        release_all: bool,
        urgency: Urgency,
    ) -> Result<(), LeaseServiceError> {
        let _one = self.exchanging.lock().await;
        let quota = self.gateway.quota();
        let now = now_secs();
        let ttl_secs = self.gateway.inner.config.control.lease_ttl.as_secs() as i64;

        // Phase 1: calls held far beyond need are given up, and persisted before any report
        // names them. (Not while the control plane is unreachable: they are what an outage
        // is served from.)
        if !release_all && !quota.control_unreachable() {
            let mut given = 0;
            {
                let mut book = self.book.lock().expect("lease book lock");
                for cell in &cells {
                    if let Some(tracked) = book.get_mut(cell.purchase_id()) {
                        let surplus = self.surplus(cell, tracked);
                        if surplus > 0 {
                            given += tracked.give_up(cell, surplus);
                        }
                    }
                }
            }
            if given > 0 {
                tracing::debug!(given, "calls held beyond need given back");
                self.persist().await;
            }
        }

        // Phase 2: the exchange. First what each cell has to say: a report, a want (`None`:
        // nothing asked), or both.
        struct Said {
            cell: Arc<QuotaCell>,
            tracked: Tracked,
            used: u64,
            report: bool,
            want: Option<u64>,
        }
        let said: Vec<Said> = {
            let book = self.book.lock().expect("lease book lock");
            cells
                .into_iter()
                .map(|cell| {
                    let used = cell.used();
                    let tracked = book.get(cell.purchase_id()).copied().unwrap_or_default();
                    let report = used > tracked.reported || tracked.return_unreported();
                    let want = (!release_all)
                        .then(|| self.want(&cell, &tracked, now, ttl_secs))
                        .flatten();
                    Said {
                        cell,
                        tracked,
                        used,
                        report,
                        want,
                    }
                })
                .collect()
        };
        let urgent = release_all
            || said
                .iter()
                .any(|s| s.want.is_some() || s.tracked.return_unreported());
        if !urgent && urgency == Urgency::Paced && said.iter().any(|s| s.report) {
            let last = *self.last_exchange.lock().expect("last exchange lock");
            let interval = self.report_interval();
            // The loop paces usage at `MIN_EXCHANGE_INTERVAL` by itself; only a stretched
            // interval defers here.
            if interval > MIN_EXCHANGE_INTERVAL && last.is_some_and(|at| at.elapsed() < interval) {
                return Ok(()); // the report waits: the cells stay watched until it goes
            }
        }
        let mut used_at_send: HashMap<String, u64> = HashMap::new();
        let mut returned_at_send: HashMap<String, u64> = HashMap::new();
        let mut reports = Vec::new();
        let mut wants = Vec::new();
        for s in &said {
            let id = s.cell.purchase_id();
            let tracked = &s.tracked;
            let mut involved = false;
            if s.report {
                let returned = tracked.returned_durable;
                reports.push(UsageReport {
                    purchase_id: id.to_owned(),
                    used: s.used.saturating_sub(tracked.reported),
                    since: Some(tracked.reported),
                    returned: (returned > 0).then_some(returned),
                });
                returned_at_send.insert(id.to_owned(), returned);
                involved = true;
            }
            if !release_all && s.cell.is_leased() {
                let want = s.want.or_else(|| self.top_up(&s.cell, tracked));
                // Every mention carries the demand: the control plane sizes shares by it.
                if want.is_some() || involved {
                    wants.push(LeaseWant {
                        purchase_id: id.to_owned(),
                        calls: want.unwrap_or(0),
                        demand: Some(self.demand(tracked)),
                    });
                    involved = true;
                }
            }
            if involved {
                used_at_send.insert(id.to_owned(), s.used);
            }
        }
        if reports.is_empty() && wants.is_empty() && !release_all {
            return Ok(());
        }
        *self.last_exchange.lock().expect("last exchange lock") = Some(Instant::now());
        let asked_for_calls = wants.iter().any(|w| w.calls > 0);
        let exchange = LeaseExchange {
            node_id: self.node_id.clone(),
            reports,
            wants,
            release_all,
            // Only `finish` gives everything back from here: the clean stop.
            leaving: release_all,
            incarnation: Some(self.incarnation.clone()),
        };
        let result = self.service.exchange(exchange).await;
        let metrics = self.gateway.metrics();
        let reply = match result {
            Ok(reply) => reply,
            Err(error) => {
                metrics
                    .quota_lease_requests
                    .with_label_values(&["error"])
                    .inc();
                quota.set_control_unreachable(true);
                quota.exchange_finished();
                return Err(error);
            }
        };
        quota.set_control_unreachable(false);

        // Phase 3: the answer.
        let mut granted_any = false;
        let mut recalled = 0;
        {
            let mut book = self.book.lock().expect("lease book lock");
            for (id, used) in &used_at_send {
                // A call given back after it was reported leaves `used` below `reported`:
                // the ledger keeps counting it, and this proxy may take it once more.
                let tracked = book.entry(id.clone()).or_default();
                tracked.dirty |= *used > tracked.reported;
                tracked.reported = tracked.reported.max(*used);
            }
            for (id, returned) in &returned_at_send {
                let tracked = book.entry(id.clone()).or_default();
                tracked.returned_acked = tracked.returned_acked.max(*returned);
            }
            for grant in &reply.grants {
                granted_any |= grant.granted > 0;
                let tracked = book.entry(grant.purchase_id.clone()).or_default();
                let expires_at = if grant.held > 0 { grant.expires_at } else { 0 };
                tracked.dirty |= tracked.held != grant.held || tracked.expires_at != expires_at;
                tracked.held = grant.held;
                tracked.expires_at = expires_at;
                let Some(cell) = quota.get(&grant.purchase_id) else {
                    continue;
                };
                if cell.is_leased() {
                    // What this proxy may still take: what the ledger says it holds, counted
                    // from what the ledger has been told it used.
                    cell.set_limit(tracked.reported + grant.held);
                    if grant.recall > 0 && !release_all {
                        // Another proxy is short and this one holds more than its share.
                        recalled += tracked.give_up(&cell, grant.recall);
                    }
                    // Calls left beyond this lease: unleased or held elsewhere (an older
                    // control plane says only the unleased).
                    let elsewhere = grant
                        .calls_left
                        .map_or(grant.unleased.unwrap_or(0), |left| {
                            left.saturating_sub(grant.held)
                        });
                    cell.set_left_elsewhere(elsewhere);
                    metrics
                        .lease_calls_held
                        .with_label_values(&[&grant.purchase_id])
                        .set(tracked.held as i64);
                }
            }
        }
        if recalled > 0 {
            tracing::debug!(recalled, "calls asked back by the control plane given back");
        }
        self.returns_pending.store(recalled > 0, Ordering::Release);
        let result = if asked_for_calls && !granted_any {
            "empty"
        } else {
            "ok"
        };
        metrics
            .quota_lease_requests
            .with_label_values(&[result])
            .inc();
        self.persist().await;
        quota.exchange_finished();
        Ok(())
    }

    /// Drops, locally, leases that were not renewed in time.
    fn revoke_expired(&self) {
        let now = now_secs();
        let mut book = self.book.lock().expect("lease book lock");
        for (id, tracked) in book.iter_mut() {
            if tracked.expires_at > 0 && now >= tracked.expires_at - REVOKE_MARGIN_SECS {
                if let Some(cell) = self.gateway.quota().get(id) {
                    if cell.is_leased() {
                        cell.set_limit(cell.used());
                        tracing::warn!(purchase = %id, "lease expired unrenewed: dropped");
                    }
                }
                tracked.held = 0;
                tracked.expires_at = 0;
                tracked.dirty = true;
            }
        }
    }

    /// Everything the control plane acknowledged, as the state file holds it.
    fn acked_state(&self, log_generation: u64) -> AckedState {
        AckedState {
            incarnation: self.incarnation.clone(),
            purchases: self
                .book
                .lock()
                .expect("lease book lock")
                .iter()
                .map(|(id, t)| (id.clone(), t.acked()))
                .collect(),
            log_generation,
        }
    }

    /// Persists what changed since the last call: one appended line per changed purchase and
    /// one fsync, on a blocking-pool thread (an fsync can stall for tens of milliseconds, and
    /// the runtime that runs this client serves buyers). The cost follows the purchases an
    /// exchange touched, not the size of the market; now and then the whole state is
    /// rewritten instead and a new log begun.
    async fn persist(&self) {
        let (changed, purchases): (Vec<LoggedPurchase>, usize) = {
            let mut book = self.book.lock().expect("lease book lock");
            let changed = book
                .iter_mut()
                .filter(|(_, t)| t.dirty)
                .map(|(id, t)| {
                    t.dirty = false;
                    LoggedPurchase {
                        id: id.clone(),
                        acked: t.acked(),
                    }
                })
                .collect();
            (changed, book.len())
        };
        if changed.is_empty() {
            return;
        }
        let compact = {
            let log = self.state_log.lock().expect("lease state log lock");
            log.lines + changed.len() as u64 > STATE_LOG_COMPACT_AFTER.max(2 * purchases as u64)
        };
        let state_log = Arc::clone(&self.state_log);
        // The running totals of calls given back that this write makes durable: from then on
        // an exchange may report them.
        let durable: Vec<(String, u64)>;
        let written = if compact {
            let generation = state_log.lock().expect("lease state log lock").generation + 1;
            let (state, path) = (self.acked_state(generation), self.state_path.clone());
            durable = returned_totals(state.purchases.iter());
            tokio::task::spawn_blocking(move || rewrite_state(&state_log, &path, &state)).await
        } else {
            durable = returned_totals(changed.iter().map(|l| (&l.id, &l.acked)));
            tokio::task::spawn_blocking(move || append_log(&state_log, &changed)).await
        };
        let written = written.unwrap_or_else(|e| Err(std::io::Error::other(e)));
        if written.is_ok() {
            let mut book = self.book.lock().expect("lease book lock");
            for (id, returned) in durable {
                if let Some(tracked) = book.get_mut(&id) {
                    tracked.returned_durable = tracked.returned_durable.max(returned);
                }
            }
        }
        if let Err(error) = written {
            self.gateway.metrics().quota_journal_errors.inc();
            tracing::error!(%error, "cannot write the lease state");
            // Everything is written again with the next change (a rare path: a full pass).
            let mut book = self.book.lock().expect("lease book lock");
            for tracked in book.values_mut() {
                tracked.dirty = true;
            }
        }
    }
}

/// The purchases with calls given back, and their running totals.
fn returned_totals<'a>(
    purchases: impl Iterator<Item = (&'a String, &'a AckedPurchase)>,
) -> Vec<(String, u64)> {
    purchases
        .filter(|(_, acked)| acked.returned > 0)
        .map(|(id, acked)| (id.clone(), acked.returned))
        .collect()
}

fn now_secs() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

#[cfg(test)]
mod tests {
    use super::state::log_path;
    use super::*;
    use crate::gateway::quota::QuotaMode;
    use crate::lease::{LeaseGrant, LeaseReply};
    use std::sync::atomic::AtomicU64;

    /// Grants every want of calls in full (a want of none, a renewal, it leaves unanswered)
    /// and remembers how many reports each exchange carried.
    #[derive(Default)]
    struct Granting {
        reports: Mutex<Vec<usize>>,
    }

    #[async_trait::async_trait]
    impl LeaseService for Granting {
        async fn exchange(&self, exchange: LeaseExchange) -> Result<LeaseReply, LeaseServiceError> {
            self.reports.lock().unwrap().push(exchange.reports.len());
            let grants = exchange
                .wants
                .iter()
                .filter(|want| want.calls > 0)
                .map(|want| LeaseGrant {
                    purchase_id: want.purchase_id.clone(),
                    granted: want.calls,
                    held: want.calls,
                    unleased: Some(1_000_000),
                    calls_left: None,
                    recall: 0,
                    expires_at: now_secs() + 300,
                })
                .collect();
            Ok(LeaseReply { grants })
        }
    }

    fn leased_gateway(dir: &std::path::Path) -> Gateway {
        let text = format!("data_dir = '{}'\n", dir.display());
        let config = crate::config::Config::from_toml(&text, Vec::new()).unwrap();
        Gateway::open_with_quota(&config, QuotaMode::Leased).unwrap()
    }

    /// Takes one call from each of `cells` as the handler does (noticed by the registry).
    async fn call_each(gateway: &Gateway, cells: &[Arc<QuotaCell>]) {
        for cell in cells {
            assert!(cell.take().await.unwrap());
            gateway.quota().note_usage(cell);
        }
    }

    /// What the control plane acknowledged per purchase, as the client's book says.
    fn reported(client: &LeaseClient) -> HashMap<String, u64> {
        let book = client.book.lock().unwrap();
        book.iter()
            .map(|(id, t)| (id.clone(), t.reported))
            .collect()
    }

    #[tokio::test]
    async fn a_pass_looks_only_at_noticed_cells_and_lets_idle_ones_go() {
        let dir = tempfile::tempdir().unwrap();
        let gateway = leased_gateway(dir.path());
        let cells: Vec<_> = (0..1000)
            .map(|i| gateway.quota().cell(&format!("p{i}"), 1_000_000, 0))
            .collect();
        for cell in &cells {
            cell.add_calls(10);
        }
        let service = Arc::new(Granting::default());
        let client = LeaseClient::new(gateway.clone(), service.clone());
        call_each(&gateway, &cells[..10]).await;
        client.pass(0.0).await.unwrap();
        assert_eq!(*service.reports.lock().unwrap(), vec![10]);
        // Reported and without a lease or a rate: nothing more to watch.
        assert!(client.watched.lock().unwrap().is_empty());
        client.pass(0.0).await.unwrap();
        assert_eq!(service.reports.lock().unwrap().len(), 1, "nothing to say");

        call_each(&gateway, &cells[500..501]).await;
        client.pass(0.0).await.unwrap();
        assert_eq!(service.reports.lock().unwrap()[1], 1);
        // A clean shutdown still reports every cell it must: none is left unreported.
        call_each(&gateway, &cells[900..903]).await;
        client.finish().await.unwrap();
        assert_eq!(service.reports.lock().unwrap()[2], 3);
    }

    /// Holds one purchase's lease for the client: grants what is asked, and asks `recall`
    /// back in every answer while it is set; keeps every exchange it was sent.
    #[derive(Default)]
    struct Recalling {
        held: Mutex<u64>,
        recall: Mutex<u64>,
        sent: Mutex<Vec<LeaseExchange>>,
    }

    #[async_trait::async_trait]
    impl LeaseService for Recalling {
        async fn exchange(&self, exchange: LeaseExchange) -> Result<LeaseReply, LeaseServiceError> {
            let mut held = self.held.lock().unwrap();
            let mut recall = self.recall.lock().unwrap();
            for report in &exchange.reports {
                *held -= report.used;
                let sent = self.sent.lock().unwrap();
                let before = sent
                    .iter()
                    .flat_map(|e| &e.reports)
                    .filter_map(|r| r.returned)
                    .max()
                    .unwrap_or(0);
                let back = report.returned.unwrap_or(0).saturating_sub(before);
                *held -= back;
                *recall = recall.saturating_sub(back);
            }
            let granted: u64 = exchange.wants.iter().map(|w| w.calls).sum();
            *held += granted;
            self.sent.lock().unwrap().push(exchange.clone());
            let grants = exchange
                .wants
                .iter()
                .map(|want| LeaseGrant {
                    purchase_id: want.purchase_id.clone(),
                    granted,
                    held: *held,
                    unleased: Some(0),
                    calls_left: Some(1000),
                    recall: *recall,
                    expires_at: now_secs() + 300,
                })
                .collect();
            Ok(LeaseReply { grants })
        }
    }

    /// Keeps each purchase's lease as a ledger would (reports take from what is held, wants
    /// add to it, granted in full) and counts the exchanges.
    #[derive(Default)]
    struct Holding {
        held: Mutex<HashMap<String, u64>>,
        exchanges: Mutex<usize>,
    }

    #[async_trait::async_trait]
    impl LeaseService for Holding {
        async fn exchange(&self, exchange: LeaseExchange) -> Result<LeaseReply, LeaseServiceError> {
            *self.exchanges.lock().unwrap() += 1;
            let mut held = self.held.lock().unwrap();
            for report in &exchange.reports {
                let h = held.entry(report.purchase_id.clone()).or_default();
                *h = h.saturating_sub(report.used);
            }
            let grants = exchange
                .wants
                .iter()
                .map(|want| {
                    let h = held.entry(want.purchase_id.clone()).or_default();
                    *h += want.calls;
                    LeaseGrant {
                        purchase_id: want.purchase_id.clone(),
                        granted: want.calls,
                        held: *h,
                        unleased: Some(1_000_000_000),
                        calls_left: None,
                        recall: 0,
                        expires_at: now_secs() + 300,
                    }
                })
                .collect();
            Ok(LeaseReply { grants })
        }
    }

    /// Heavy steady traffic on many purchases of one proxy: the store's load follows the
    /// proxy, not its calls. The capacity model (docs/capacity.md) counts one exchange per
    /// [`MAX_REPORT_INTERVAL`] per proxy once its leases hold a minute of traffic; with
    /// reports paced at [`MIN_EXCHANGE_INTERVAL`] (before the interval stretched) this
    /// traffic made 50 exchanges a second. No call may wait for a refill meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exchanges_stay_at_the_models_rate_under_heavy_traffic() {
        const PURCHASES: usize = 20;
        const CALLS_PER_TICK: u64 = 5; // every 10 ms: 500 calls/s per purchase
        let dir = tempfile::tempdir().unwrap();
        let gateway = leased_gateway(dir.path());
        let cells: Vec<_> = (0..PURCHASES)
            .map(|i| gateway.quota().cell(&format!("p{i}"), 100_000_000, 0))
            .collect();
        let service = Arc::new(Holding::default());
        let client = Arc::new(LeaseClient::new(gateway.clone(), service.clone()));
        let (trigger, shutdown) = crate::shutdown::ShutdownTrigger::new();
        let running = tokio::spawn(client.clone().run(shutdown.clone()));
        let waited = Arc::new(AtomicU64::new(0));
        let traffic = {
            let (gateway, cells, waited) = (gateway.clone(), cells.clone(), waited.clone());
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = shutdown.clone().wait() => return,
                    }
                    for cell in &cells {
                        for _ in 0..CALLS_PER_TICK {
                            if !cell.take().await.unwrap() {
                                waited.fetch_add(1, Ordering::Relaxed);
                                gateway
                                    .quota()
                                    .wait_for_refill(cell, Duration::from_secs(1))
                                    .await;
                            }
                            gateway.quota().note_usage(cell);
                        }
                    }
                }
            })
        };
        // Warm-up: the rates settle and the leases grow to a minute of traffic.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let (exchanges_before, waited_before) = (
            *service.exchanges.lock().unwrap(),
            waited.load(Ordering::Relaxed),
        );
        let window = Duration::from_secs(4);
        tokio::time::sleep(window).await;
        let exchanges = *service.exchanges.lock().unwrap() - exchanges_before;
        let waited_in_window = waited.load(Ordering::Relaxed) - waited_before;
        trigger.fire();
        traffic.await.unwrap();
        running.await.unwrap();
        let served: u64 = cells.iter().map(|c| c.used()).sum();
        // The model's figure over the window, and one more for an exchange on its edge.
        let model = (window.as_secs_f64() / MAX_REPORT_INTERVAL.as_secs_f64()) as usize;
        assert!(
            exchanges <= model + 1,
            "{exchanges} exchanges in {window:?} (model: {model}), {served} calls served"
        );
        assert!(exchanges >= 1, "usage is still reported");
        assert_eq!(
            waited_in_window, 0,
            "no call waited for a refill after the warm-up"
        );
    }

    #[tokio::test]
    async fn calls_asked_back_leave_the_cell_and_are_reported_once_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let gateway = leased_gateway(dir.path());
        let cell = gateway.quota().cell("p1", 1000, 0);
        let service = Arc::new(Recalling::default());
        let client = LeaseClient::new(gateway.clone(), service.clone());
        // A refill asked by a waiting caller: 24 granted (1.5 × lease_min_calls).
        gateway.quota().wait_for_refill(&cell, Duration::ZERO).await;
        client.pass(0.0).await.unwrap();
        assert_eq!(cell.left(), Some(24));
        // The control plane asks 20 back: they leave the cell with the answer.
        *service.recall.lock().unwrap() = 20;
        call_each(&gateway, std::slice::from_ref(&cell)).await;
        client.pass(0.0).await.unwrap();
        assert_eq!(cell.left(), Some(3), "24 - 1 served - 20 given back");
        assert!(cell.may_refill(), "calls left elsewhere: not used up");
        // Persisted before it is reported, then reported as a running total.
        let state: AckedState =
            serde_json::from_slice(&std::fs::read(dir.path().join(STATE_FILE)).unwrap())
                .unwrap_or_default();
        let mut logged = state.clone();
        replay_log(dir.path(), &mut logged);
        assert_eq!(logged.purchases["p1"].returned, 20);
        client.pass(0.0).await.unwrap();
        let last = service.sent.lock().unwrap().last().cloned().unwrap();
        assert_eq!(last.reports[0].returned, Some(20));
        assert_eq!(*service.recall.lock().unwrap(), 0, "the recall is settled");
        // A restart reads the total back and reports it with its recovery.
        drop(client);
        let again = LeaseClient::new(gateway.clone(), service.clone());
        let (_trigger, shutdown) = crate::shutdown::ShutdownTrigger::new();
        again.recover(&shutdown).await;
        let last = service.sent.lock().unwrap().last().cloned().unwrap();
        assert!(last.release_all);
        assert_eq!(last.reports[0].returned, Some(20));
    }

    #[tokio::test]
    async fn the_lease_state_is_logged_compacted_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let gateway = leased_gateway(dir.path());
        let count = STATE_LOG_COMPACT_AFTER as usize + 10;
        let cells: Vec<_> = (0..count)
            .map(|i| gateway.quota().cell(&format!("p{i}"), 1_000_000, 0))
            .collect();
        // Within twice the idle demand (1.5 × lease_min_calls): none is given back.
        for cell in &cells {
            cell.add_calls(45);
        }
        let client = LeaseClient::new(gateway.clone(), Arc::new(Granting::default()));
        call_each(&gateway, &cells).await;
        client.pass(0.0).await.unwrap();
        // Many small exchanges on a few purchases: the log outgrows twice the purchases it
        // describes, and the state is rewritten.
        for round in 0..40 {
            call_each(&gateway, &cells[..5]).await;
            client.pass(0.0).await.unwrap();
            assert_eq!(client.book.lock().unwrap()["p0"].reported, round + 2);
        }
        let generation = client.state_log.lock().unwrap().generation;
        assert!(generation >= 1, "compacted at least once");
        assert!(
            !log_path(dir.path(), generation - 1).exists(),
            "old log removed"
        );
        // A torn last line (a crash mid-append) is ignored.
        {
            use std::io::Write;
            let mut log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log_path(dir.path(), generation))
                .unwrap();
            log.write_all(br#"{"id":"p1","reported":99"#).unwrap();
        }
        let expected = reported(&client);
        let incarnation = client.incarnation.clone();
        drop(client);
        let again = LeaseClient::new(gateway.clone(), Arc::new(Granting::default()));
        assert_eq!(again.incarnation, incarnation);
        let read_back = reported(&again);
        assert_eq!(read_back, expected);
        assert_eq!(read_back["p1"], 41);
        assert_eq!(read_back["p9"], 1);
    }
}
