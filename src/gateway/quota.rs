//! Quota: one atomic cell per purchase, and the journal that makes consumption durable.
//!
//! Owns every counter of calls taken and the on-disk journal (`quota.journal` in `data_dir`).
//! It does not decide who may call (that is `entitle`) and does not know about HTTP.
//!
//! # Invariants
//! - `used <= limit` after every successful [`QuotaCell::try_take`]: a call is taken by one
//!   compare-and-swap on `used`, so no interleaving of callers admits more than `limit`.
//! - `used <= reserved` at all times, and `reserved` is on disk (fsync'ed) before any call
//!   below it is granted. After a crash the proxy restarts with `used = reserved`, so a call
//!   that was served is never granted again. The bound on calls lost at a crash (counted but
//!   never served) is `gateway.quota_journal_block` per purchase.
//! - A clean shutdown ([`QuotaRegistry::flush`], after traffic stopped) records the exact
//!   `used`, so nothing is lost.
//! - Cells live in the registry, not in a snapshot: a compiled snapshot holds `Arc`s to them,
//!   so counters survive every swap.
//! - `limit` may only be raised by [`QuotaCell::add_calls`] (a lease refill) or set from the
//!   snapshot; `used` may only fall by [`QuotaCell::give_back`] for a call that never reached
//!   the backend.
//!
//! Standalone (no `proxy.control_url`) a cell's limit is the snapshot's `quota_limit`, and
//! `used` is max(snapshot `quota_used`, journaled used).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;

/// File name of the journal inside `data_dir`.
pub const JOURNAL_FILE: &str = "quota.journal";
/// The limit of a purchase without `quota_limit`: unlimited, still metered.
pub const UNLIMITED: u64 = u64::MAX;

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
}

/// The append-only journal: one line `purchase_id used_ceiling` per reservation; the last
/// line of a purchase wins.
#[derive(Debug)]
struct Journal {
    file: Mutex<File>,
}

impl Journal {
    fn record(&self, purchase_id: &str, value: u64) -> Result<(), QuotaError> {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let line = format!("{purchase_id} {value}\n");
        file.write_all(line.as_bytes()).map_err(QuotaError::Write)?;
        file.sync_data().map_err(QuotaError::Write)
    }
}

/// The calls of one purchase.
#[derive(Debug)]
pub struct QuotaCell {
    purchase_id: Box<str>,
    limit: AtomicU64,
    used: AtomicU64,
    /// Journaled ceiling of `used`.
    reserved: AtomicU64,
    reserve_lock: Mutex<()>,
    journal: Arc<Journal>,
    block: u64,
}

impl QuotaCell {
    /// Takes one call. `Ok(false)`: none left. Hot path: one CAS, plus one journal write per
    /// `block` calls.
    pub fn try_take(&self) -> Result<bool, QuotaError> {
        loop {
            let used = self.used.load(Ordering::Acquire);
            if used >= self.limit.load(Ordering::Acquire) {
                return Ok(false);
            }
            if used >= self.reserved.load(Ordering::Acquire) {
                self.reserve_beyond(used)?;
                continue;
            }
            // `reserved` only grows, so `used + 1 <= reserved` still holds if this succeeds.
            if self
                .used
                .compare_exchange_weak(used, used + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Ok(true);
            }
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

    pub fn purchase_id(&self) -> &str {
        &self.purchase_id
    }

    fn reserve_beyond(&self, used: u64) -> Result<(), QuotaError> {
        let _guard = self.reserve_lock.lock().unwrap_or_else(|e| e.into_inner());
        let reserved = self.reserved.load(Ordering::Acquire);
        if reserved > used {
            return Ok(());
        }
        let ceiling = used
            .saturating_add(self.block)
            .min(self.limit().max(used + 1));
        self.journal.record(&self.purchase_id, ceiling)?;
        self.reserved.store(ceiling, Ordering::Release);
        Ok(())
    }
}

/// Every purchase's cell, keyed by purchase id, plus the journal they write to.
#[derive(Debug)]
pub struct QuotaRegistry {
    cells: DashMap<Box<str>, Arc<QuotaCell>>,
    /// Journaled `used` of purchases not (yet) in a snapshot.
    recovered: HashMap<String, u64>,
    journal: Arc<Journal>,
    block: u64,
}

impl QuotaRegistry {
    /// Opens (or creates) the journal in `data_dir`, compacting it to one line per purchase.
    pub fn open(data_dir: &Path, block: u64) -> Result<QuotaRegistry, QuotaError> {
        let path = data_dir.join(JOURNAL_FILE);
        let open_err = |source| QuotaError::Open {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(data_dir).map_err(open_err)?;
        let mut recovered = HashMap::new();
        match File::open(&path) {
            Ok(file) => {
                for (i, line) in BufReader::new(file).lines().enumerate() {
                    let line = line.map_err(open_err)?;
                    if line.is_empty() {
                        continue;
                    }
                    // A torn last line (crash mid-write) is ignored: its reservation was not
                    // acknowledged, so no call was granted under it.
                    let Some((id, value)) = line.rsplit_once(' ') else {
                        return Err(QuotaError::Corrupt { line: i + 1 });
                    };
                    match value.parse::<u64>() {
                        Ok(v) => {
                            recovered.insert(id.to_owned(), v);
                        }
                        Err(_) => continue,
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(open_err(e)),
        }
        let compact = data_dir.join(format!("{JOURNAL_FILE}.tmp"));
        {
            let mut out = File::create(&compact).map_err(open_err)?;
            for (id, used) in &recovered {
                writeln!(out, "{id} {used}").map_err(open_err)?;
            }
            out.sync_all().map_err(open_err)?;
        }
        std::fs::rename(&compact, &path).map_err(open_err)?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(open_err)?;
        Ok(QuotaRegistry {
            cells: DashMap::new(),
            recovered,
            journal: Arc::new(Journal {
                file: Mutex::new(file),
            }),
            block: block.max(1),
        })
    }

    /// The cell of `purchase_id`, created on first sight; its limit set to `limit` and its
    /// used raised to `ledger_used`.
    pub fn cell(&self, purchase_id: &str, limit: u64, ledger_used: u64) -> Arc<QuotaCell> {
        let cell = self
            .cells
            .entry(purchase_id.into())
            .or_insert_with(|| {
                let journaled = self.recovered.get(purchase_id).copied().unwrap_or(0);
                Arc::new(QuotaCell {
                    purchase_id: purchase_id.into(),
                    limit: AtomicU64::new(limit),
                    used: AtomicU64::new(journaled),
                    reserved: AtomicU64::new(journaled),
                    reserve_lock: Mutex::new(()),
                    journal: self.journal.clone(),
                    block: self.block,
                })
            })
            .clone();
        cell.set_limit(limit);
        cell.raise_used(ledger_used);
        cell
    }

    /// The cell of a purchase, if it has one.
    pub fn get(&self, purchase_id: &str) -> Option<Arc<QuotaCell>> {
        self.cells.get(purchase_id).map(|c| c.clone())
    }

    /// Every cell, for `/v1/usage` and a lease client.
    pub fn cells(&self) -> Vec<Arc<QuotaCell>> {
        self.cells.iter().map(|e| e.value().clone()).collect()
    }

    /// Records every cell's exact `used` (call after traffic has stopped).
    pub fn flush(&self) -> Result<(), QuotaError> {
        for entry in self.cells.iter() {
            let cell = entry.value();
            let _guard = cell.reserve_lock.lock().unwrap_or_else(|e| e.into_inner());
            let used = cell.used();
            cell.journal.record(&cell.purchase_id, used)?;
            cell.reserved.store(used, Ordering::Release);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_exactly_the_limit_and_gives_back() {
        let dir = tempfile::tempdir().unwrap();
        let registry = QuotaRegistry::open(dir.path(), 4).unwrap();
        let cell = registry.cell("p1", 3, 0);
        assert!(cell.try_take().unwrap());
        assert!(cell.try_take().unwrap());
        assert!(cell.try_take().unwrap());
        assert!(!cell.try_take().unwrap());
        cell.give_back();
        assert!(cell.try_take().unwrap());
        assert_eq!(cell.left(), Some(0));
        cell.add_calls(1);
        assert!(cell.try_take().unwrap());
    }

    #[test]
    fn a_crash_never_grants_a_served_call_again() {
        let dir = tempfile::tempdir().unwrap();
        {
            let registry = QuotaRegistry::open(dir.path(), 8).unwrap();
            let cell = registry.cell("p1", 100, 0);
            for _ in 0..10 {
                assert!(cell.try_take().unwrap());
            }
            // dropped without flush: a crash
        }
        let registry = QuotaRegistry::open(dir.path(), 8).unwrap();
        let cell = registry.cell("p1", 100, 0);
        let used = cell.used();
        assert!((10..=10 + 8).contains(&used), "{used}");
    }

    #[test]
    fn a_clean_flush_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        {
            let registry = QuotaRegistry::open(dir.path(), 64).unwrap();
            let cell = registry.cell("p1", 100, 0);
            for _ in 0..7 {
                assert!(cell.try_take().unwrap());
            }
            registry.flush().unwrap();
        }
        let registry = QuotaRegistry::open(dir.path(), 64).unwrap();
        assert_eq!(registry.cell("p1", 100, 3).used(), 7);
    }
}
