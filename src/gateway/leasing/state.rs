//! The lease client's persisted state: what the control plane has acknowledged, per purchase,
//! in `lease-state.json` (rewritten now and then, durably) and the log of changes since
//! (`lease-state.<generation>.log`, one appended line per purchase an exchange changed). A
//! restarted proxy reads both back, so that it reports exactly what it has not reported and
//! keeps serving a lease that is still valid. Owns the file formats and their replay; it
//! decides nothing (the policy is `leasing`'s) and talks to no control plane.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// File in `data_dir` holding what the control plane acknowledged, as of its last rewrite.
pub const STATE_FILE: &str = "lease-state.json";
/// The changes since that rewrite: `lease-state.<generation>.log` in `data_dir`, one JSON
/// line per purchase changed by an exchange (the last line of a purchase wins).
const STATE_LOG_PREFIX: &str = "lease-state.";
/// The state file is rewritten (and a new log begun) once the log holds this many lines and
/// more than twice as many as there are purchases.
pub(super) const STATE_LOG_COMPACT_AFTER: u64 = if cfg!(test) { 64 } else { 10_000 };

/// What the control plane acknowledged, per purchase (and the calls given back, before they
/// are reported): persisted in [`STATE_FILE`] after every exchange, so that a restarted proxy reports exactly the rest and, with the control plane
/// unreachable, keeps serving the lease it held until that lease expires.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(super) struct AckedState {
    /// Names this life of the data directory in every exchange (made when the file is first
    /// written), so that the control plane can tell a repeated report from a proxy that lost
    /// its disk and counts from zero again.
    #[serde(default)]
    pub(super) incarnation: String,
    pub(super) purchases: HashMap<String, AckedPurchase>,
    /// Which log holds the changes made after this file was written (0 for files written
    /// before the log existed: there is no `lease-state.0.log` then).
    #[serde(default)]
    pub(super) log_generation: u64,
}

/// One line of the state log: a purchase's acknowledged values after an exchange.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct LoggedPurchase {
    pub(super) id: String,
    #[serde(flatten)]
    pub(super) acked: AckedPurchase,
}

/// Where the next changes to the lease state are appended.
#[derive(Debug)]
pub(super) struct StateLog {
    pub(super) dir: PathBuf,
    pub(super) generation: u64,
    /// Lines in the current log.
    pub(super) lines: u64,
}

impl StateLog {
    fn path(&self) -> PathBuf {
        log_path(&self.dir, self.generation)
    }
}

pub(super) fn log_path(dir: &std::path::Path, generation: u64) -> PathBuf {
    dir.join(format!("{STATE_LOG_PREFIX}{generation}.log"))
}

#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
pub(super) struct AckedPurchase {
    /// This proxy's `used` count the control plane has been told of.
    pub(super) reported: u64,
    /// Calls held at the last exchange.
    #[serde(default)]
    pub(super) held: u64,
    /// Epoch seconds; 0 when nothing is held.
    #[serde(default)]
    pub(super) expires_at: i64,
    /// Calls this proxy gave back from its leases in all, in this life of the data directory:
    /// written here before any exchange reports it (so that the running total the control
    /// plane counts never runs ahead of what a restart reads back).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(super) returned: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Applies the state's log (`lease-state.<generation>.log`) to `state`; returns its lines.
/// Only whole lines count: a torn last line was never acknowledged to anyone.
pub(super) fn replay_log(dir: &std::path::Path, state: &mut AckedState) -> u64 {
    let path = log_path(dir, state.log_generation);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return 0;
    };
    let whole = text.rsplit_once('\n').map_or("", |(whole, _torn)| whole);
    let mut lines = 0;
    for line in whole.split('\n').filter(|line| !line.is_empty()) {
        lines += 1;
        match serde_json::from_str::<LoggedPurchase>(line) {
            Ok(logged) => {
                state.purchases.insert(logged.id, logged.acked);
            }
            Err(error) => {
                tracing::error!(%error, path = %path.display(), line = lines, "lease state log line skipped")
            }
        }
    }
    lines
}

/// Appends `changed` to the current log and fsyncs it.
pub(super) fn append_log(
    state_log: &Mutex<StateLog>,
    changed: &[LoggedPurchase],
) -> std::io::Result<()> {
    use std::io::Write;
    let mut log = state_log.lock().unwrap_or_else(|e| e.into_inner());
    let mut lines = Vec::new();
    for logged in changed {
        serde_json::to_writer(&mut lines, logged).map_err(std::io::Error::other)?;
        lines.push(b'\n');
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log.path())?;
    file.write_all(&lines)?;
    file.sync_data()?;
    log.lines += changed.len() as u64;
    Ok(())
}

/// Rewrites the state file whole, naming the next log, then removes the old log. A crash in
/// between leaves the old log unread (the new state names the next one).
pub(super) fn rewrite_state(
    state_log: &Mutex<StateLog>,
    path: &std::path::Path,
    state: &AckedState,
) -> std::io::Result<()> {
    let mut log = state_log.lock().unwrap_or_else(|e| e.into_inner());
    write_state(path, state)?;
    let old = log.path();
    log.generation = state.log_generation;
    log.lines = 0;
    match std::fs::remove_file(old) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Writes `state` to `path` durably (`crate::durable`: the rename is durable before the old
/// log is removed).
pub(super) fn write_state(path: &std::path::Path, state: &AckedState) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(state).map_err(std::io::Error::other)?;
    crate::durable::write_atomic(path, &bytes)
}
