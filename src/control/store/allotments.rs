//! The throttling allotment ledger in the store (`throttle_allotments`, migration 4): for
//! each counter and window, the calls granted to proxies so far. A grant is decided while the
//! row is locked (PostgreSQL `FOR UPDATE`, SQLite's write transaction), so that replicas
//! granting at once never pass the limit together (`crate::throttle_allotment::grant`).
//!
//! Only the SQL lives here; the backends run it (`sqlite.rs`, `postgres.rs`) and
//! `control::throttle_allotments` decides what to ask.

/// One want as the store takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllotWant {
    pub counter: String,
    pub window: i64,
    pub limit: u64,
    pub calls: u64,
    /// When the row may be forgotten (ms since the epoch).
    pub expires_ms: i64,
}

/// Makes the row if it is new: `$1` counter, `$2` window, `$3` expiry.
pub const ENSURE_SQL: &str =
    "INSERT INTO throttle_allotments (counter, win, granted, expires_ms) VALUES ($1, $2, 0, $3)
     ON CONFLICT (counter, win) DO NOTHING";
/// The calls granted so far: `$1` counter, `$2` window (PostgreSQL appends `FOR UPDATE`).
pub const GRANTED_SQL: &str =
    "SELECT granted FROM throttle_allotments WHERE counter = $1 AND win = $2";
/// Records the new total: `$1` granted, `$2` counter, `$3` window. (Parameters are numbered
/// in the order they appear: SQLite binds by that order.)
pub const SET_SQL: &str =
    "UPDATE throttle_allotments SET granted = $1 WHERE counter = $2 AND win = $3";
/// Forgets rows past their expiry: `$1` now (ms).
pub const PRUNE_SQL: &str = "DELETE FROM throttle_allotments WHERE expires_ms < $1";
