//! Quota: one atomic cell per purchase, and the journal that makes consumption durable.
//!
//! Owns every counter of calls taken and the on-disk journal (`quota.journal` in `data_dir`).
//! It does not decide who may call (that is `entitle`) and does not know about HTTP.
//!
//! # Invariants
//! - `used <= limit` after every successful [`QuotaCell::take`]: a call is taken by one
//!   compare-and-swap on `used`, so no interleaving of callers admits more than `limit`.
//! - `used <= reserved` at all times, and `reserved` is on disk (fsync'ed) before any call
//!   below it is granted. After a crash the proxy restarts with `used = reserved`, so a call
//!   that was served is never granted again. The bound on calls lost at a crash (counted but
//!   never served) is `gateway.quota_journal_block` per purchase, plus the calls in flight
//!   then (taken but perhaps not yet forwarded: the cell cannot tell).
//! - A reservation reaches `used + step` ahead, the step following the purchase's rate:
//!   about [`JOURNAL_LEAD`] of its traffic, at least [`MIN_JOURNAL_STEP`] and at most
//!   `quota_journal_block`. A quiet purchase thus risks few calls at a crash, and a hot one
//!   reserves far enough ahead that the journal thread's fsync usually lands before requests
//!   catch up with it. Only the `quota-journal` thread writes the journal while serving: a
//!   request that catches up waits asynchronously, so a slow disk never blocks the runtime
//!   thread (and with it every other purchase on it).
//! - A clean shutdown ([`QuotaRegistry::flush`], after traffic stopped) records the exact
//!   `used`, so nothing is lost.
//! - Cells live in the registry, not in a snapshot: a compiled snapshot holds `Arc`s to them,
//!   so counters survive every swap.
//! - `limit` may only be raised by [`QuotaCell::add_calls`] (a lease refill) or set from the
//!   snapshot or an exchange, and lowered to give calls back ([`QuotaCell::give_up`]); `used`
//!   may only fall by [`QuotaCell::give_back`] for a call that never reached the backend (or
//!   by a take that lost a race with `give_up`, undone before anything was served).
//!
//! Two modes ([`QuotaMode`]), fixed when the registry opens:
//! - `Local` (a standalone `marketgate proxy` without `proxy.control_url`): a cell's limit is
//!   the snapshot's `quota_limit`, and `used` is max(snapshot `quota_used`, journaled used).
//! - `Leased` (`serve`, or a proxy with `proxy.control_url`): the control plane owns the
//!   ledger. A limited cell's `limit` lives in this proxy's own count of calls: it is `used`
//!   plus what this proxy holds, and only the lease client (`gateway::leasing`) moves it.
//!   Snapshots only switch a purchase between limited and unlimited. So a proxy never serves
//!   a call that was not leased to it (docs/quota-leases.md).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use hashbrown::DefaultHashBuilder;

/// File name of the journal inside `data_dir`.
pub const JOURNAL_FILE: &str = "quota.journal";
/// The limit of a purchase without `quota_limit`: unlimited, still metered.
pub const UNLIMITED: u64 = u64::MAX;
/// A leased cell's count of the purchase's calls left beyond its own lease before its first
/// exchange: unknown.
const UNKNOWN_ELSEWHERE: u64 = u64::MAX;
/// A reservation covers about this much of the purchase's recent traffic (capped by
/// `gateway.quota_journal_block`). Half of it is left when the journal thread is asked to
/// extend it, so an fsync may take up to half of this before a request waits on the disk
/// (fsyncs of ~100 ms were seen on the benchmark machine's virtual disk: BENCHMARKS.md).
pub const JOURNAL_LEAD: Duration = Duration::from_millis(250);
/// The smallest reservation step (or `quota_journal_block`, if smaller).
pub const MIN_JOURNAL_STEP: u64 = 16;
/// Cells recorded with one fsync by [`QuotaRegistry::flush`].
const FLUSH_BATCH: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("cannot open the quota journal {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("line {line} of the quota journal is not 'purchase_id used'")]
    Corrupt { line: usize },
    #[error("cannot write the quota journal")]
    Write(#[source] std::io::Error),
    /// The journal thread's last write failed (it logged why); a caller waiting on it gets
    /// this instead.
    #[error("the quota journal thread could not extend the reservation")]
    JournalFailed,
}

/// The journal is rewritten with one line per purchase once this many lines were appended
/// since it was last compacted (about 40 MB), so that it does not grow while a proxy runs.
pub const COMPACT_AFTER_LINES: u64 = 1 << 20;

/// The append-only journal: one line `purchase_id used_ceiling` per reservation; the last
/// line of a purchase wins.
#[derive(Debug)]
struct Journal {
    path: PathBuf,
    file: Mutex<JournalFile>,
    /// Cells whose reservation runs low, for the journal thread to extend ahead of need, so
    /// that a request rarely waits for an fsync (BENCHMARKS.md: one write + fdatasync per
    /// block on the request thread cost more than the whole decision).
    ahead: std::sync::mpsc::Sender<Arc<QuotaCell>>,
}

#[derive(Debug)]
struct JournalFile {
    file: File,
    /// The last value written per purchase: all a compacted journal keeps. Keyed by the
    /// cells' own ids (shared, not copied).
    last: HashMap<Arc<str>, u64>,
    /// Lines appended since the journal was last compacted.
    appended: u64,
}

impl Journal {
    /// Appends one line per entry and fsyncs once for all of them (a group commit), then
    /// compacts the file if it has grown by [`COMPACT_AFTER_LINES`].
    fn record(&self, entries: &[(&Arc<str>, u64)]) -> Result<(), QuotaError> {
        let mut journal = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let mut lines = String::new();
        for (purchase_id, value) in entries {
            push_line(&mut lines, purchase_id, *value);
        }
        journal
            .file
            .write_all(lines.as_bytes())
            .map_err(QuotaError::Write)?;
        journal.file.sync_data().map_err(QuotaError::Write)?;
        for (purchase_id, value) in entries {
            match journal.last.get_mut(&***purchase_id) {
                Some(last) => *last = *value,
                None => {
                    journal.last.insert(Arc::clone(purchase_id), *value);
                }
            }
        }
        journal.appended += entries.len() as u64;
        if journal.appended >= COMPACT_AFTER_LINES {
            // What was appended is durable already: a failed compaction loses nothing, and
            // is tried again after as many lines more.
            journal.appended = 0;
            if let Err(error) = journal.compact(&self.path) {
                tracing::error!(%error, path = %self.path.display(), "quota journal compaction failed");
            }
        }
        Ok(())
    }
}

impl JournalFile {
    /// Writes the journal anew with one line per purchase: a new file, fsync'ed, renamed over
    /// the old one (atomic: a crash leaves one or the other whole), then appended to.
    fn compact(&mut self, path: &Path) -> std::io::Result<()> {
        let last = self.last.iter().map(|(id, value)| (&**id, *value));
        self.file = write_compacted(path, last)?;
        Ok(())
    }
}

/// The last value of each purchase in a journal's text. Only whole lines count: a crash in
/// the middle of an append leaves a last line without its newline, whose reservation was
/// never acknowledged (no call was granted under it), so it is ignored.
fn parse_journal(text: &str) -> Result<HashMap<String, u64>, QuotaError> {
    let mut last = HashMap::new();
    let whole = text.rsplit_once('\n').map_or("", |(whole, _torn)| whole);
    for (i, line) in whole.split('\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let Some((id, value)) = line.rsplit_once(' ') else {
            return Err(QuotaError::Corrupt { line: i + 1 });
        };
        let value = value
            .parse::<u64>()
            .map_err(|_| QuotaError::Corrupt { line: i + 1 })?;
        last.insert(id.to_owned(), value);
    }
    Ok(last)
}

/// Appends the journal line `purchase_id value` to `lines`.
fn push_line(lines: &mut String, purchase_id: &str, value: u64) {
    lines.push_str(purchase_id);
    lines.push(' ');
    lines.push_str(&value.to_string());
    lines.push('\n');
}

/// Writes `last` (each purchase's last value) as a journal at `path`, durably replacing the
/// old one (`crate::durable`), and returns the file opened for appending.
fn write_compacted<'a>(
    path: &Path,
    last: impl Iterator<Item = (&'a str, u64)>,
) -> std::io::Result<File> {
    let mut lines = String::new();
    for (id, value) in last {
        push_line(&mut lines, id, value);
    }
    crate::durable::write_atomic(path, lines.as_bytes())?;
    OpenOptions::new().append(true).open(path)
}

/// Where a cell's limit comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaMode {
    /// From the snapshot; consumption journaled on this proxy alone.
    Local,
    /// From leases granted by the control plane.
    Leased,
}

/// The calls of one purchase.
#[derive(Debug)]
pub struct QuotaCell {
    /// Shared with the registry's and the journal's maps.
    purchase_id: Arc<str>,
    /// Limited and in `Leased` mode: served only from leases.
    leased: AtomicBool,
    /// The purchase's calls left beyond this proxy's lease at the last exchange (unleased, or
    /// held by other proxies and perhaps being recalled): worth waiting for a refill when the
    /// cell runs dry, and never "used up" while above zero (`Leased` mode only). Starts at
    /// [`UNKNOWN_ELSEWHERE`] until the first exchange.
    left_elsewhere: AtomicU64,
    /// A caller was refused and waits for a refill of this cell.
    refill_asked: AtomicBool,
    /// Calls that found the cell dry while calls were left elsewhere (they wait for a
    /// refill): traffic the lease client counts in the purchase's rate, or a starved proxy's
    /// rate, and with it its demand and fair share, would fall while it waits.
    turned_away: AtomicU64,
    limit: AtomicU64,
    used: AtomicU64,
    /// In the registry's list of cells for the lease client to look at (`Leased` mode).
    noticed: AtomicBool,
    /// Journaled ceiling of `used`.
    reserved: AtomicU64,
    /// How far the latest reservation reached past `used`: the next one is asked for once
    /// half of it is left.
    step: AtomicU64,
    /// Held while reserving; the last reservation's time and `used`, for the rate.
    reserve_lock: Mutex<LastReservation>,
    /// A reservation ahead of need is queued for the journal thread.
    reserving: AtomicBool,
    /// Woken after each reservation the journal thread lands (or fails to).
    extended: tokio::sync::Notify,
    /// The journal thread's last write for this cell failed.
    journal_failed: AtomicBool,
    journal: Arc<Journal>,
    /// `gateway.quota_journal_block`: the largest step, and the crash bound.
    max_step: u64,
}

/// When the last reservation was made, and at what `used`.
#[derive(Debug, Default)]
struct LastReservation {
    at: Option<std::time::Instant>,
    used: u64,
}

/// What [`QuotaCell::try_take`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Take {
    Taken,
    Exhausted,
    /// The journaled reservation is used up; the journal thread was asked to extend it.
    JournalBehind,
}

impl QuotaCell {
    /// Takes one call. `Ok(false)`: none left. Hot path: one CAS, and once half the
    /// reservation is used the journal thread is asked to extend it. A caller that catches
    /// up with the reservation before that lands waits for it without blocking its thread.
    pub async fn take(self: &Arc<Self>) -> Result<bool, QuotaError> {
        loop {
            match self.try_take() {
                Take::Taken => return Ok(true),
                Take::Exhausted => return Ok(false),
                Take::JournalBehind => self.journal_caught_up().await?,
            }
        }
    }

    fn try_take(self: &Arc<Self>) -> Take {
        loop {
            let used = self.used.load(Ordering::Acquire);
            if used >= self.limit.load(Ordering::Acquire) {
                return Take::Exhausted;
            }
            if used >= self.reserved.load(Ordering::Acquire) {
                self.ask_journal();
                return Take::JournalBehind;
            }
            // `reserved` only grows, so `used + 1 <= reserved` still holds if this succeeds.
            if self
                .used
                .compare_exchange_weak(used, used + 1, Ordering::SeqCst, Ordering::Acquire)
                .is_ok()
            {
                // `give_up` may have lowered the limit after the check above: taken past the
                // new limit, the call is undone (nothing was served yet). SeqCst pairs with
                // `give_up`'s limit store and `used` load: either this load sees the lower
                // limit, or `give_up` sees this call in `used` and gives up one call less.
                if used + 1 > self.limit.load(Ordering::SeqCst) {
                    self.used.fetch_sub(1, Ordering::SeqCst);
                    return Take::Exhausted;
                }
                self.reserve_ahead_if_low(used + 1);
                return Take::Taken;
            }
        }
    }

    /// Resolves once the reservation reaches past `used` again (or nothing is left to take),
    /// or with an error if the journal thread could not write it.
    async fn journal_caught_up(self: &Arc<Self>) -> Result<(), QuotaError> {
        loop {
            let extended = self.extended.notified();
            tokio::pin!(extended);
            // Registered before the checks: a reservation landing in between still wakes us.
            extended.as_mut().enable();
            let used = self.used();
            if used < self.reserved.load(Ordering::Acquire) || used >= self.limit() {
                return Ok(());
            }
            if self.journal_failed.load(Ordering::Acquire) {
                return Err(QuotaError::JournalFailed);
            }
            self.ask_journal();
            extended.await;
        }
    }

    /// Returns a call that never reached the backend.
    pub fn give_back(&self) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| u.checked_sub(1));
    }

    /// Adds `n` calls to the limit (a lease refill).
    pub fn add_calls(&self, n: u64) {
        let _ = self
            .limit
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| {
                Some(l.saturating_add(n))
            });
    }

    /// Lowers the limit by up to `n` calls, never below what is taken, and returns how many
    /// calls this cell gave up: calls that can no longer be served from it, whatever takes
    /// race with this (a lease's calls given back to the control plane). Not a hot path.
    pub fn give_up(&self, n: u64) -> u64 {
        loop {
            let limit = self.limit.load(Ordering::SeqCst);
            let lower = limit
                .saturating_sub(n)
                .max(self.used.load(Ordering::SeqCst));
            if lower >= limit {
                return 0;
            }
            if self
                .limit
                .compare_exchange(limit, lower, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                // A take that passed its check against the old limit is either in `used`
                // now (counted, so given up the less) or will see `lower` and undo itself.
                let used = self.used.load(Ordering::SeqCst);
                return limit.saturating_sub(lower.max(used));
            }
        }
    }

    /// Sets the limit (from a snapshot's `quota_limit`).
    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Release);
    }

    /// Raises `used` to at least `used` (the ledger's count from a snapshot).
    pub fn raise_used(&self, used: u64) {
        self.used.fetch_max(used, Ordering::AcqRel);
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Acquire)
    }

    /// Calls left; `None` when unlimited.
    pub fn left(&self) -> Option<u64> {
        let limit = self.limit();
        (limit != UNLIMITED).then(|| limit.saturating_sub(self.used()))
    }

    /// The purchase's calls left as this proxy knows them; `None` when unlimited, or when
    /// leased and no lease exchange has said yet. Standalone it is [`QuotaCell::left`].
    /// Leased, `left` is only this proxy's lease balance: the purchase's calls are those
    /// beyond this proxy's lease at the last exchange plus that balance (the buyer's view as
    /// of that exchange, less what this proxy served since).
    pub fn purchase_left(&self) -> Option<u64> {
        let left = self.left()?;
        if !self.is_leased() {
            return Some(left);
        }
        match self.left_elsewhere.load(Ordering::Acquire) {
            UNKNOWN_ELSEWHERE => None,
            elsewhere => Some(elsewhere.saturating_add(left)),
        }
    }

    /// This proxy's lease balance for the purchase; `None` unless the cell is leased.
    pub fn lease_left(&self) -> Option<u64> {
        self.left().filter(|_| self.is_leased())
    }

    pub fn purchase_id(&self) -> &str {
        &self.purchase_id
    }

    /// The purchase id as shared by the registry's maps (a cheap clone for another map key).
    pub fn shared_purchase_id(&self) -> &Arc<str> {
        &self.purchase_id
    }

    /// Is this cell served from leases (limited purchase, `Leased` mode)?
    pub fn is_leased(&self) -> bool {
        self.leased.load(Ordering::Acquire)
    }

    /// Could a lease refill help a caller this cell just refused? (Calls are left beyond
    /// this proxy's lease: unleased, or held by other proxies.)
    pub fn may_refill(&self) -> bool {
        self.is_leased() && self.left_elsewhere.load(Ordering::Acquire) > 0
    }

    /// A caller found the cell dry and waits for a refill (counted once per call).
    pub fn note_turned_away(&self) {
        self.turned_away.fetch_add(1, Ordering::Relaxed);
    }

    /// Calls that found the cell dry and waited, in all.
    pub fn turned_away(&self) -> u64 {
        self.turned_away.load(Ordering::Relaxed)
    }

    /// Takes the "a caller waits for a refill" mark (for the lease client).
    pub fn take_refill_request(&self) -> bool {
        self.refill_asked.swap(false, Ordering::AcqRel)
    }

    /// Records the control plane's count of the purchase's calls left beyond this proxy's
    /// lease.
    pub fn set_left_elsewhere(&self, calls: u64) {
        self.left_elsewhere.store(calls, Ordering::Release);
    }

    /// Queues a reservation for the journal thread once half the current one is used.
    fn reserve_ahead_if_low(self: &Arc<Self>, used: u64) {
        let half = self.step.load(Ordering::Relaxed) / 2;
        if used + half >= self.reserved.load(Ordering::Acquire) {
            self.ask_journal();
        }
    }

    /// Queues this cell for the journal thread, unless it is queued already.
    fn ask_journal(self: &Arc<Self>) {
        if !self.reserving.swap(true, Ordering::AcqRel)
            && self.journal.ahead.send(self.clone()).is_err()
        {
            // The journal thread is gone (the registry is closing): nothing will land.
            self.reserving.store(false, Ordering::Release);
            self.journal_failed.store(true, Ordering::Release);
            self.extended.notify_waiters();
        }
    }

    /// The journal thread's side: reserves up to `used + step` (never beyond the limit) for
    /// every cell of `cells` that needs it, with one write and one fsync for all of them.
    /// Keeps the crash bound: `reserved - used ≤ max_step`.
    fn reserve_ahead(journal: &Journal, cells: &mut [Arc<QuotaCell>]) -> Result<(), QuotaError> {
        Self::set_reservations(journal, cells, |cell, last| {
            let ceiling = cell.ceiling(last, cell.used());
            (ceiling > cell.reserved.load(Ordering::Acquire)).then_some(ceiling)
        })
    }

    /// Sets each cell's journaled reservation to what `next` chooses for it (`None`: leave
    /// it), with one write and one fsync for all. Each cell's reservation lock is held from
    /// the choice to the store, so the journal thread and `flush` never interleave on a cell;
    /// locks are taken in address order (the slice is sorted here), so they never deadlock.
    fn set_reservations(
        journal: &Journal,
        cells: &mut [Arc<QuotaCell>],
        next: impl Fn(&QuotaCell, &mut LastReservation) -> Option<u64>,
    ) -> Result<(), QuotaError> {
        cells.sort_unstable_by_key(|cell| Arc::as_ptr(cell) as usize);
        let mut held = Vec::with_capacity(cells.len());
        for cell in cells.iter() {
            let mut last = cell.reserve_lock.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(value) = next(cell, &mut last) {
                held.push((cell, value, last));
            }
        }
        if held.is_empty() {
            return Ok(());
        }
        let entries: Vec<(&Arc<str>, u64)> = held
            .iter()
            .map(|(cell, value, _)| (&cell.purchase_id, *value))
            .collect();
        journal.record(&entries)?;
        for (cell, value, _last) in &held {
            cell.reserved.store(*value, Ordering::Release);
        }
        Ok(())
    }

    /// The next reservation's ceiling for `used`: `used + step`, the step sized from the
    /// rate since `last` (about [`JOURNAL_LEAD`] of traffic, within
    /// [`MIN_JOURNAL_STEP`]..=`max_step`), never beyond the limit. Updates `last` and `step`.
    fn ceiling(&self, last: &mut LastReservation, used: u64) -> u64 {
        let now = std::time::Instant::now();
        let min_step = MIN_JOURNAL_STEP.min(self.max_step);
        let step = match last.at {
            Some(at) => {
                let elapsed = now.duration_since(at).as_secs_f64();
                let calls = used.saturating_sub(last.used) as f64;
                let wanted = calls / elapsed.max(1e-6) * JOURNAL_LEAD.as_secs_f64();
                (wanted as u64).clamp(min_step, self.max_step)
            }
            None => min_step,
        };
        *last = LastReservation {
            at: Some(now),
            used,
        };
        self.step.store(step, Ordering::Relaxed);
        used.saturating_add(step).min(self.limit().max(used))
    }
}

/// Every purchase's cell, keyed by purchase id, plus the journal they write to.
#[derive(Debug)]
pub struct QuotaRegistry {
    cells: DashMap<Arc<str>, Arc<QuotaCell>, DefaultHashBuilder>,
    /// Journaled `used` of purchases not (yet) in a snapshot.
    recovered: HashMap<String, u64>,
    journal: Arc<Journal>,
    block: u64,
    mode: QuotaMode,
    /// Woken when a refused caller could use a refill (`Leased` mode).
    refill_wanted: tokio::sync::Notify,
    /// Woken when a call was taken (`Leased` mode), so usage is reported promptly.
    usage: tokio::sync::Notify,
    /// Cells with a call taken or a refill asked since the lease client last drained this
    /// list (`Leased` mode): what it must look at, so that it never walks every cell.
    noticed: Mutex<Vec<Arc<QuotaCell>>>,
    /// Bumped after every lease exchange.
    refilled: tokio::sync::watch::Sender<u64>,
    /// Set while the lease client cannot reach the control plane.
    control_unreachable: AtomicBool,
    /// The request throttling counters: like the cells, they outlive snapshots.
    throttle: Arc<super::throttle::ThrottleRegistry>,
}

impl QuotaRegistry {
    /// Opens (or creates) the journal in `data_dir` in `Local` mode.
    pub fn open(data_dir: &Path, block: u64) -> Result<QuotaRegistry, QuotaError> {
        Self::open_with_mode(data_dir, block, QuotaMode::Local)
    }

    /// Opens (or creates) the journal in `data_dir`, compacting it to one line per purchase.
    pub fn open_with_mode(
        data_dir: &Path,
        block: u64,
        mode: QuotaMode,
    ) -> Result<QuotaRegistry, QuotaError> {
        let path = data_dir.join(JOURNAL_FILE);
        let open_err = |source| QuotaError::Open {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(data_dir).map_err(open_err)?;
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(open_err(e)),
        };
        let recovered = parse_journal(&text)?;
        let last = recovered.iter().map(|(id, value)| (id.as_str(), *value));
        let file = write_compacted(&path, last).map_err(open_err)?;
        Ok(QuotaRegistry {
            cells: DashMap::default(),
            journal: Arc::new(Journal {
                path: path.clone(),
                file: Mutex::new(JournalFile {
                    file,
                    last: recovered
                        .iter()
                        .map(|(id, value)| (Arc::from(id.as_str()), *value))
                        .collect(),
                    appended: 0,
                }),
                ahead: spawn_journal_thread().map_err(open_err)?,
            }),
            recovered,
            block: block.max(1),
            mode,
            refill_wanted: tokio::sync::Notify::new(),
            usage: tokio::sync::Notify::new(),
            noticed: Mutex::new(Vec::new()),
            refilled: tokio::sync::watch::channel(0).0,
            control_unreachable: AtomicBool::new(false),
            // Local until a proxy's allotment client starts (`gateway::allotments`).
            throttle: Arc::new(super::throttle::ThrottleRegistry::new(false)),
        })
    }

    pub fn mode(&self) -> QuotaMode {
        self.mode
    }

    /// Asks the lease client for a refill and waits up to `wait` for its next exchange to
    /// finish. Returns whether one finished.
    pub async fn wait_for_refill(&self, cell: &Arc<QuotaCell>, wait: Duration) -> bool {
        let mut refilled = self.refilled.subscribe();
        refilled.borrow_and_update();
        cell.refill_asked.store(true, Ordering::Release);
        self.notice(cell);
        self.refill_wanted.notify_one();
        tokio::time::timeout(wait, refilled.changed()).await.is_ok()
    }

    /// A call was taken from `cell`: lists it for the lease client and wakes the client
    /// (`Leased` mode; a no-op otherwise). Hot path: two atomic operations, plus a push onto
    /// the list for the first call after each time the client drained it, plus a task
    /// wake-up when the client is idle.
    pub fn note_usage(&self, cell: &Arc<QuotaCell>) {
        if self.mode == QuotaMode::Leased {
            self.notice(cell);
            self.usage.notify_one();
        }
    }

    /// Puts `cell` on the noticed list unless it is on it already.
    fn notice(&self, cell: &Arc<QuotaCell>) {
        // An RMW, not a load first: if the client's swap in `drain_noticed` came before this
        // one, this call re-lists the cell; if after, the client's swap reads this one's
        // `true`, so everything this caller did before (its take) is visible to the client.
        if !cell.noticed.swap(true, Ordering::AcqRel) {
            let mut noticed = self.noticed.lock().unwrap_or_else(|e| e.into_inner());
            noticed.push(Arc::clone(cell));
        }
    }

    /// Takes the list of cells noticed since the last call (for the lease client). Every
    /// call taken from a cell before its flag is cleared here is visible to the caller after
    /// this returns; any taken after lists the cell again.
    pub fn drain_noticed(&self) -> Vec<Arc<QuotaCell>> {
        let noticed = std::mem::take(&mut *self.noticed.lock().unwrap_or_else(|e| e.into_inner()));
        for cell in &noticed {
            cell.noticed.swap(false, Ordering::AcqRel);
        }
        noticed
    }

    /// Resolves after a call was taken (for the lease client).
    pub async fn usage_noted(&self) {
        self.usage.notified().await
    }

    /// Is the control plane unreachable (the lease client's last exchange failed)? A caller
    /// whose cell ran dry is then refused at once instead of waiting for a refill.
    /// The request throttling counters (leased with the quota: `Leased` mode).
    pub fn throttle(&self) -> &Arc<super::throttle::ThrottleRegistry> {
        &self.throttle
    }

    pub fn control_unreachable(&self) -> bool {
        self.control_unreachable.load(Ordering::Acquire)
    }

    /// The lease client's view after each exchange; waiters are woken when it turns bad.
    pub fn set_control_unreachable(&self, unreachable: bool) {
        let before = self.control_unreachable.swap(unreachable, Ordering::AcqRel);
        if unreachable && !before {
            self.refilled.send_modify(|n| *n += 1);
        }
    }

    /// Resolves when a refused caller asked for a refill (for the lease client).
    pub async fn refill_wanted(&self) {
        self.refill_wanted.notified().await
    }

    /// Tells waiting callers that an exchange finished (for the lease client).
    pub fn exchange_finished(&self) {
        self.refilled.send_modify(|n| *n += 1);
    }

    /// The journaled `used` of every purchase seen at start (recovered after a crash).
    pub fn recovered(&self) -> &HashMap<String, u64> {
        &self.recovered
    }

    /// The cell of `purchase_id`, created on first sight; its limit set to `limit` and its
    /// used raised to `ledger_used`.
    pub fn cell(&self, purchase_id: &str, limit: u64, ledger_used: u64) -> Arc<QuotaCell> {
        let cell = match self.get(purchase_id) {
            Some(cell) => cell,
            None => self.new_cell(purchase_id, limit),
        };
        match self.mode {
            QuotaMode::Local => {
                cell.set_limit(limit);
                cell.raise_used(ledger_used);
            }
            QuotaMode::Leased => {
                let limited = limit != UNLIMITED;
                if !limited {
                    cell.set_limit(UNLIMITED);
                } else if cell.limit() == UNLIMITED {
                    // Was unlimited, now limited: from here on only leases count.
                    cell.set_limit(cell.used());
                }
                cell.leased.store(limited, Ordering::Release);
            }
        }
        cell
    }

    /// Creates the cell of a purchase first seen, starting from its journaled `used` (unless
    /// another thread created it meanwhile).
    fn new_cell(&self, purchase_id: &str, limit: u64) -> Arc<QuotaCell> {
        let purchase_id: Arc<str> = purchase_id.into();
        self.cells
            .entry(Arc::clone(&purchase_id))
            .or_insert_with(|| {
                let journaled = self.recovered.get(&*purchase_id).copied().unwrap_or(0);
                let initial_limit = match self.mode {
                    // Nothing leased yet: the cell serves nothing until a grant arrives.
                    QuotaMode::Leased if limit != UNLIMITED => journaled,
                    _ => limit,
                };
                Arc::new(QuotaCell {
                    purchase_id,
                    leased: AtomicBool::new(false),
                    left_elsewhere: AtomicU64::new(UNKNOWN_ELSEWHERE),
                    refill_asked: AtomicBool::new(false),
                    turned_away: AtomicU64::new(0),
                    limit: AtomicU64::new(initial_limit),
                    used: AtomicU64::new(journaled),
                    noticed: AtomicBool::new(false),
                    reserved: AtomicU64::new(journaled),
                    step: AtomicU64::new(MIN_JOURNAL_STEP.min(self.block)),
                    reserve_lock: Mutex::new(LastReservation::default()),
                    reserving: AtomicBool::new(false),
                    extended: tokio::sync::Notify::new(),
                    journal_failed: AtomicBool::new(false),
                    journal: self.journal.clone(),
                    max_step: self.block,
                })
            })
            .clone()
    }

    /// The cell of a purchase, if it has one.
    pub fn get(&self, purchase_id: &str) -> Option<Arc<QuotaCell>> {
        self.cells.get(purchase_id).map(|c| c.clone())
    }

    /// Every cell, for `/v1/usage` and a lease client.
    pub fn cells(&self) -> Vec<Arc<QuotaCell>> {
        self.cells.iter().map(|e| e.value().clone()).collect()
    }

    /// Records every cell's exact `used` (call after traffic has stopped): one line for each
    /// cell whose journaled value differs, [`FLUSH_BATCH`] lines to an fsync.
    pub fn flush(&self) -> Result<(), QuotaError> {
        let mut cells = self.cells();
        for batch in cells.chunks_mut(FLUSH_BATCH) {
            QuotaCell::set_reservations(&self.journal, batch, |cell, _last| {
                let used = cell.used();
                (used != cell.reserved.load(Ordering::Acquire)).then_some(used)
            })?;
        }
        Ok(())
    }
}

/// The thread that extends reservations ahead of need; it ends when the journal is dropped.
/// It takes every cell queued meanwhile as one batch: one fsync for all (group commit), so
/// the number of fsyncs does not grow with the number of busy purchases.
fn spawn_journal_thread() -> std::io::Result<std::sync::mpsc::Sender<Arc<QuotaCell>>> {
    let (ahead, queue) = std::sync::mpsc::channel::<Arc<QuotaCell>>();
    std::thread::Builder::new()
        .name("quota-journal".into())
        .spawn(move || {
            while let Ok(first) = queue.recv() {
                let mut batch = vec![first];
                batch.extend(queue.try_iter());
                let journal = Arc::clone(&batch[0].journal);
                let failed = match QuotaCell::reserve_ahead(&journal, &mut batch) {
                    Ok(()) => false,
                    Err(error) => {
                        tracing::error!(%error, cells = batch.len(), "quota journal write failed");
                        true
                    }
                };
                for cell in &batch {
                    // Asks made while this write ran were folded into it; the next one
                    // queues anew.
                    cell.reserving.store(false, Ordering::Release);
                    cell.journal_failed.store(failed, Ordering::Release);
                    cell.extended.notify_waiters();
                }
            }
        })?;
    Ok(ahead)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn takes_exactly_the_limit_and_gives_back() {
        let dir = tempfile::tempdir().unwrap();
        let registry = QuotaRegistry::open(dir.path(), 4).unwrap();
        let cell = registry.cell("p1", 3, 0);
        assert!(cell.take().await.unwrap());
        assert!(cell.take().await.unwrap());
        assert!(cell.take().await.unwrap());
        assert!(!cell.take().await.unwrap());
        cell.give_back();
        assert!(cell.take().await.unwrap());
        assert_eq!(cell.left(), Some(0));
        cell.add_calls(1);
        assert!(cell.take().await.unwrap());
    }

    /// Calls given up while other threads take: what was taken plus what was given up never
    /// exceeds what the cell had, so a call given back to the control plane is never also
    /// served here.
    #[test]
    fn calls_given_up_are_never_also_taken() {
        let dir = tempfile::tempdir().unwrap();
        let registry =
            QuotaRegistry::open_with_mode(dir.path(), 1_000_000, QuotaMode::Leased).unwrap();
        for round in 0..20 {
            let cell = registry.cell(&format!("p{round}"), 1_000_000, 0);
            cell.add_calls(20_000);
            let takers: Vec<_> = (0..3)
                .map(|_| {
                    let cell = Arc::clone(&cell);
                    std::thread::spawn(move || {
                        let runtime = tokio::runtime::Builder::new_current_thread()
                            .build()
                            .unwrap();
                        let mut taken = 0u64;
                        while runtime.block_on(cell.take()).unwrap() {
                            taken += 1;
                        }
                        taken
                    })
                })
                .collect();
            let mut given_up = 0;
            for _ in 0..200 {
                given_up += cell.give_up(7);
                std::thread::yield_now();
            }
            let taken: u64 = takers.into_iter().map(|t| t.join().unwrap()).sum();
            assert_eq!(taken, cell.used());
            assert!(
                taken + given_up <= 20_000,
                "round {round}: {taken} taken + {given_up} given up > 20000"
            );
            assert_eq!(cell.give_up(1), 0, "nothing left to give up");
        }
    }

    #[tokio::test]
    async fn a_crash_never_grants_a_served_call_again() {
        let dir = tempfile::tempdir().unwrap();
        {
            let registry = QuotaRegistry::open(dir.path(), 8).unwrap();
            let cell = registry.cell("p1", 100, 0);
            for _ in 0..10 {
                assert!(cell.take().await.unwrap());
            }
            // dropped without flush: a crash
        }
        let registry = QuotaRegistry::open(dir.path(), 8).unwrap();
        let cell = registry.cell("p1", 100, 0);
        let used = cell.used();
        assert!((10..=10 + 8).contains(&used), "{used}");
    }

    #[tokio::test]
    async fn leased_cells_serve_only_what_was_granted() {
        let dir = tempfile::tempdir().unwrap();
        let registry = QuotaRegistry::open_with_mode(dir.path(), 8, QuotaMode::Leased).unwrap();
        let cell = registry.cell("p1", 1000, 0);
        assert!(cell.is_leased());
        assert!(!cell.take().await.unwrap(), "nothing leased yet");
        cell.add_calls(2);
        assert!(cell.take().await.unwrap());
        assert!(cell.take().await.unwrap());
        assert!(!cell.take().await.unwrap());
        // A new snapshot with another limit does not touch a leased cell.
        let again = registry.cell("p1", 5000, 900);
        assert_eq!((again.used(), again.limit()), (2, 2));
        // Unlimited purchases are not leased.
        let free = registry.cell("p2", UNLIMITED, 0);
        assert!(!free.is_leased());
        assert!(free.take().await.unwrap());
    }

    #[tokio::test]
    async fn a_caller_that_catches_up_waits_for_the_journal_thread() {
        let dir = tempfile::tempdir().unwrap();
        // A step of one call: every take finds the reservation used up and waits for the
        // journal thread to extend it; none is granted beyond what is on disk.
        let registry = QuotaRegistry::open(dir.path(), 1).unwrap();
        let cell = registry.cell("p1", 50, 0);
        for taken in 1..=50 {
            assert!(cell.take().await.unwrap());
            assert!(cell.reserved.load(Ordering::Acquire) >= taken);
        }
        assert!(!cell.take().await.unwrap());
        drop(registry);
        let registry = QuotaRegistry::open(dir.path(), 1).unwrap();
        assert_eq!(registry.recovered()["p1"], 50);
    }

    #[test]
    fn reservations_follow_the_rate_within_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let registry = QuotaRegistry::open(dir.path(), 1000).unwrap();
        let cell = registry.cell("p1", UNLIMITED, 0);
        let mut last = LastReservation::default();
        assert_eq!(cell.ceiling(&mut last, 0), MIN_JOURNAL_STEP, "no rate yet");
        // 10 calls in 10 s: 1 call/s wants a quarter of a call; the floor holds.
        last.at = Some(std::time::Instant::now() - Duration::from_secs(10));
        assert_eq!(cell.ceiling(&mut last, 10), 10 + MIN_JOURNAL_STEP);
        // 400 calls in 50 ms: 8000 calls/s wants 2000 (250 ms of traffic); the cap holds.
        last.at = Some(std::time::Instant::now() - Duration::from_millis(50));
        assert_eq!(cell.ceiling(&mut last, 410), 410 + 1000);
        // Never beyond the limit, nor past it once it is reached.
        cell.set_limit(500);
        last.at = Some(std::time::Instant::now() - Duration::from_millis(50));
        assert_eq!(cell.ceiling(&mut last, 450), 500);
        assert_eq!(cell.ceiling(&mut last, 500), 500);
    }

    #[test]
    fn a_torn_last_line_is_ignored_and_a_bad_whole_line_is_an_error() {
        let recovered = parse_journal("p1 10\np1 12\np2 5\np1 1").unwrap();
        assert_eq!((recovered["p1"], recovered["p2"]), (12, 5));
        assert!(matches!(
            parse_journal("p1 10\np1 x2\n"),
            Err(QuotaError::Corrupt { line: 2 })
        ));
        assert!(matches!(
            parse_journal("p1 10\nnonsense\n"),
            Err(QuotaError::Corrupt { line: 2 })
        ));
    }

    #[tokio::test]
    async fn the_journal_is_compacted_while_running_and_stays_true() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let registry = QuotaRegistry::open(dir.path(), 1).unwrap();
        let (a, b) = (registry.cell("pa", 100, 0), registry.cell("pb", 100, 0));
        for _ in 0..20 {
            assert!(a.take().await.unwrap());
            assert!(b.take().await.unwrap());
        }
        // Each take asked for the next reservation; let those land, so that no line is
        // appended behind the test's back after the compaction.
        a.journal_caught_up().await.unwrap();
        b.journal_caught_up().await.unwrap();
        let lines = |path: &Path| std::fs::read_to_string(path).unwrap().lines().count();
        assert!(lines(&path) >= 40, "one line per reservation of one call");
        {
            let mut journal = registry.journal.file.lock().unwrap();
            journal.compact(&path).unwrap();
        }
        assert_eq!(lines(&path), 2, "one line per purchase");
        // Appends go to the compacted file, and a restart reads it back.
        assert!(a.take().await.unwrap());
        drop((a, b, registry));
        let registry = QuotaRegistry::open(dir.path(), 1).unwrap();
        // Dropped without a flush (a crash): at most one step (one call here) beyond used.
        assert!((21..=22).contains(&registry.recovered()["pa"]));
        assert!((20..=21).contains(&registry.recovered()["pb"]));
    }

    #[tokio::test]
    async fn many_purchases_share_the_journal_thread() {
        let dir = tempfile::tempdir().unwrap();
        let registry = QuotaRegistry::open(dir.path(), 1).unwrap();
        let cells: Vec<_> = (0..50)
            .map(|i| registry.cell(&format!("p{i}"), 3, 0))
            .collect();
        let takers = cells.iter().cloned().map(|cell| {
            tokio::spawn(async move {
                let mut taken = 0;
                while cell.take().await.unwrap() {
                    taken += 1;
                }
                taken
            })
        });
        for taker in takers.collect::<Vec<_>>() {
            assert_eq!(taker.await.unwrap(), 3);
        }
        drop((cells, registry));
        let registry = QuotaRegistry::open(dir.path(), 1).unwrap();
        assert!(registry.recovered().values().all(|used| *used == 3));
        assert_eq!(registry.recovered().len(), 50);
    }

    #[tokio::test]
    async fn a_flush_of_many_cells_records_each_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let count = FLUSH_BATCH * 2 + 7;
        {
            let registry = QuotaRegistry::open(dir.path(), 64).unwrap();
            for i in 0..count {
                let cell = registry.cell(&format!("p{i}"), 100, 0);
                // Every third purchase is never called: it needs no line.
                for _ in 0..i % 3 {
                    assert!(cell.take().await.unwrap());
                }
            }
            registry.flush().unwrap();
        }
        let registry = QuotaRegistry::open(dir.path(), 64).unwrap();
        for i in 0..count {
            let recovered = registry.recovered().get(&format!("p{i}")).copied();
            assert_eq!(recovered.unwrap_or(0), (i % 3) as u64, "p{i}");
        }
    }

    #[tokio::test]
    async fn a_clean_flush_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        {
            let registry = QuotaRegistry::open(dir.path(), 64).unwrap();
            let cell = registry.cell("p1", 100, 0);
            for _ in 0..7 {
                assert!(cell.take().await.unwrap());
            }
            registry.flush().unwrap();
        }
        let registry = QuotaRegistry::open(dir.path(), 64).unwrap();
        assert_eq!(registry.cell("p1", 100, 3).used(), 7);
    }
}
