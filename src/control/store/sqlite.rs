//! The embedded SQLite backend (the default): one file under `data_dir`, WAL journal,
//! `synchronous=FULL` so that a commit is on disk before the control plane answers 2xx.
//!
//! SQLite serves one process (a second control plane on the file is refused at start:
//! `control::store`'s caller holds the lock file), so its claims and compare-and-swap are
//! trivially serial; it still runs the same checks as PostgreSQL, statement for statement,
//! so that both backends refuse the same commits. rusqlite is blocking: every call runs on
//! `spawn_blocking` holding the one connection. Must not hold any market logic.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, Transaction};

use super::{
    Changes, Claim, Commit, Committed, Conflict, Store, StoreError, StoreLimits, Stored,
    CLAIMS_BUILT_KEY, MIGRATIONS, VERSION_KEY,
};

#[derive(Debug, Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    /// The database file as opened: its path and (device, inode). Every use checks that the
    /// path still names that file, so that a database removed (or moved, or replaced) while
    /// open answers 503 instead of acknowledging writes into a file no restart would find.
    file: Arc<(PathBuf, Option<(u64, u64)>)>,
}

/// (device, inode) of `path`, if it names a file.
fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// A commit's failure inside the blocking closure: the database's or a conflict.
enum Failed {
    Sqlite(rusqlite::Error),
    Conflict(Conflict),
}

impl From<rusqlite::Error> for Failed {
    fn from(e: rusqlite::Error) -> Failed {
        Failed::Sqlite(e)
    }
}

impl SqliteStore {
    pub async fn open(path: &str, limits: StoreLimits) -> Result<SqliteStore, StoreError> {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || Self::open_blocking(&path, limits))
            .await
            .map_err(StoreError::Worker)?
    }

    fn open_blocking(path: &str, limits: StoreLimits) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = Path::new(path).parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
                    path: dir.display().to_string(),
                    source,
                })?;
            }
        }
        let mut conn = Connection::open(path).map_err(StoreError::Sqlite)?;
        conn.busy_timeout(limits.lock_timeout)
            .map_err(StoreError::Sqlite)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(StoreError::Sqlite)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(StoreError::Sqlite)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at TEXT NOT NULL)",
        )
        .map_err(StoreError::Sqlite)?;
        for (version, sql) in MIGRATIONS {
            let tx = conn.transaction().map_err(StoreError::Sqlite)?;
            let applied: Option<i64> = tx
                .query_row(
                    "SELECT version FROM schema_migrations WHERE version = ?1",
                    params![version],
                    |row| row.get(0),
                )
                .optional()
                .map_err(StoreError::Sqlite)?;
            if applied.is_none() {
                tx.execute_batch(sql).map_err(StoreError::Sqlite)?;
                tx.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, datetime('now'))",
                    params![version],
                )
                .map_err(StoreError::Sqlite)?;
            }
            tx.commit().map_err(StoreError::Sqlite)?;
        }
        let file = PathBuf::from(path);
        let opened = identity(&file);
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            file: Arc::new((file, opened)),
        })
    }

    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, Failed> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || {
            let (path, opened) = &*file;
            if opened.is_some() && identity(path) != *opened {
                return Err(StoreError::Unavailable(format!(
                    "the database file {} was removed or replaced while open: nothing is \
                     written until it is back",
                    path.display()
                )));
            }
            let mut conn = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&mut conn).map_err(|failed| match failed {
                Failed::Sqlite(e) => sqlite_error(e),
                Failed::Conflict(c) => StoreError::Conflict(c),
            })
        })
        .await
        .map_err(StoreError::Worker)?
    }
}

/// A busy or locked database is a lock timeout: retryable (503), like PostgreSQL's; so is a
/// full disk, an I/O error or a read-only file (the operator's to fix, then it answers again).
fn sqlite_error(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(
            rusqlite::ErrorCode::DatabaseBusy
            | rusqlite::ErrorCode::DatabaseLocked
            | rusqlite::ErrorCode::DiskFull
            | rusqlite::ErrorCode::SystemIoFailure
            | rusqlite::ErrorCode::ReadOnly
            | rusqlite::ErrorCode::CannotOpen,
        ) => StoreError::Unavailable(e.to_string()),
        _ => StoreError::Sqlite(e),
    }
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Replaces the claims `owner` holds by `claims`; a key held by another owner is a conflict.
fn claim(tx: &Transaction<'_>, owner: &str, claims: &[Claim]) -> Result<(), Failed> {
    tx.execute("DELETE FROM claims WHERE owner = ?1", params![owner])?;
    for c in claims {
        let inserted = tx.execute(
            "INSERT INTO claims (scope, key, owner) VALUES (?1, ?2, ?3) ON CONFLICT (scope, key) DO NOTHING",
            params![c.scope, c.key, owner],
        )?;
        if inserted == 0 {
            let holder: String = tx.query_row(
                "SELECT owner FROM claims WHERE scope = ?1 AND key = ?2",
                params![c.scope, c.key],
                |row| row.get(0),
            )?;
            return Err(Failed::Conflict(Conflict::Claimed {
                scope: c.scope,
                key: c.key.clone(),
                owner: holder,
            }));
        }
    }
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn changes_since(&self, version: u64, held: &[u64]) -> Result<Changes, StoreError> {
        let held = held.to_vec();
        self.with_conn(move |conn| {
            let tx = conn.transaction()?;
            let current: i64 = tx.query_row(
                "SELECT value FROM meta WHERE key = ?1",
                params![VERSION_KEY],
                |row| row.get(0),
            )?;
            let records = {
                let mut stmt = tx.prepare(
                    "SELECT kind, id, rev, doc, version FROM records WHERE version > ?1 ORDER BY version, kind, id",
                )?;
                let rows = stmt.query_map(params![version as i64], |row| {
                    let written_at = to_u64(row.get(4)?);
                    let stored = Stored {
                        kind: row.get(0)?,
                        id: row.get(1)?,
                        rev: to_u64(row.get(2)?),
                        doc: row.get(3)?,
                    };
                    Ok((!held.contains(&written_at)).then_some(stored))
                })?;
                rows.filter_map(Result::transpose)
                    .collect::<Result<Vec<_>, _>>()?
            };
            tx.commit()?;
            Ok(Changes {
                version: to_u64(current),
                records,
            })
        })
        .await
    }

    async fn commit(&self, commit: Commit) -> Result<Committed, StoreError> {
        self.with_conn(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            for read in &commit.reads {
                let rev: Option<i64> = tx
                    .query_row(
                        "SELECT rev FROM records WHERE kind = ?1 AND id = ?2 AND doc IS NOT NULL",
                        params![read.kind, read.id],
                        |row| row.get(0),
                    )
                    .optional()?;
                if rev.map(to_u64) != Some(read.rev) {
                    return Err(Failed::Conflict(Conflict::Stale {
                        kind: read.kind,
                        id: read.id.clone(),
                    }));
                }
            }
            let mut revs = Vec::with_capacity(commit.writes.len());
            for write in &commit.writes {
                let rev: Option<i64> = match write.rev {
                    None => tx
                        .query_row(
                            "INSERT INTO records (kind, id, doc, rev, version) VALUES (?1, ?2, ?3, 1, 0)
                             ON CONFLICT (kind, id) DO UPDATE SET doc = excluded.doc, rev = records.rev + 1
                             WHERE records.doc IS NULL RETURNING rev",
                            params![write.kind, write.id, write.doc],
                            |row| row.get(0),
                        )
                        .optional()?,
                    Some(expected) => tx
                        .query_row(
                            "UPDATE records SET doc = ?3, rev = rev + 1
                             WHERE kind = ?1 AND id = ?2 AND rev = ?4 AND doc IS NOT NULL RETURNING rev",
                            params![write.kind, write.id, write.doc, expected as i64],
                            |row| row.get(0),
                        )
                        .optional()?,
                };
                let Some(rev) = rev else {
                    return Err(Failed::Conflict(Conflict::Stale {
                        kind: write.kind,
                        id: write.id.clone(),
                    }));
                };
                revs.push(to_u64(rev));
                claim(&tx, &write.id, &write.claims)?;
            }
            if let Some(update) = commit.ledger {
                let mut rows = Vec::with_capacity(update.ids.len());
                for id in &update.ids {
                    let doc: Option<String> = tx
                        .query_row(
                            "SELECT doc FROM ledgers WHERE purchase_id = ?1",
                            params![id],
                            |row| row.get(0),
                        )
                        .optional()?;
                    rows.push((id.clone(), doc));
                }
                let before = rows.clone();
                (update.apply)(&mut rows);
                for ((id, doc), (_, old)) in rows.iter().zip(&before) {
                    if let Some(doc) = doc.as_ref().filter(|d| Some(*d) != old.as_ref()) {
                        tx.execute(
                            "INSERT INTO ledgers (purchase_id, doc) VALUES (?1, ?2)
                             ON CONFLICT (purchase_id) DO UPDATE SET doc = excluded.doc",
                            params![id, doc],
                        )?;
                    }
                }
            }
            // Last: the version (the same statements as PostgreSQL's, where the counter's
            // row lock orders versions as commits).
            let version: i64 = match commit.bump_version {
                true => tx.query_row(
                    "UPDATE meta SET value = value + 1 WHERE key = ?1 RETURNING value",
                    params![VERSION_KEY],
                    |row| row.get(0),
                )?,
                // No version made (the same as PostgreSQL's: `Committed::version` is 0).
                false => 0,
            };
            for write in &commit.writes {
                tx.execute(
                    "UPDATE records SET version = ?3 WHERE kind = ?1 AND id = ?2",
                    params![write.kind, write.id, version],
                )?;
            }
            tx.commit()?;
            Ok(Committed {
                version: to_u64(version),
                revs,
            })
        })
        .await
    }

    async fn ledgers(&self, ids: Option<Vec<String>>) -> Result<Vec<(String, String)>, StoreError> {
        self.with_conn(move |conn| {
            let mut out = Vec::new();
            match ids {
                None => {
                    let mut stmt =
                        conn.prepare("SELECT purchase_id, doc FROM ledgers ORDER BY purchase_id")?;
                    let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
                    out = rows.collect::<Result<Vec<_>, _>>()?;
                }
                Some(ids) => {
                    let mut stmt =
                        conn.prepare("SELECT doc FROM ledgers WHERE purchase_id = ?1")?;
                    for id in ids {
                        if let Some(doc) = stmt
                            .query_row(params![id], |row| row.get::<_, String>(0))
                            .optional()?
                        {
                            out.push((id, doc));
                        }
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn build_claims(&self, claims: Vec<(Claim, String)>) -> Result<(), StoreError> {
        self.with_conn(move |conn| {
            let tx = conn.transaction()?;
            for (c, owner) in &claims {
                tx.execute(
                    "INSERT INTO claims (scope, key, owner) VALUES (?1, ?2, ?3) ON CONFLICT (scope, key) DO NOTHING",
                    params![c.scope, c.key, owner],
                )?;
            }
            tx.execute(
                "UPDATE meta SET value = 1 WHERE key = ?1",
                params![CLAIMS_BUILT_KEY],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn claims_built(&self) -> Result<bool, StoreError> {
        self.with_conn(|conn| {
            let built: Option<i64> = conn
                .query_row(
                    "SELECT value FROM meta WHERE key = ?1",
                    params![CLAIMS_BUILT_KEY],
                    |row| row.get(0),
                )
                .optional()?;
            Ok(built != Some(0))
        })
        .await
    }

    async fn advance_version(&self, seen: u64) -> Result<u64, StoreError> {
        let seen = i64::try_from(seen).unwrap_or(i64::MAX - 1);
        self.with_conn(move |conn| {
            let version: i64 = conn.query_row(
                "UPDATE meta SET value = max(value, ?2) + 1 WHERE key = ?1 RETURNING value",
                params![VERSION_KEY, seen],
                |row| row.get(0),
            )?;
            Ok(to_u64(version))
        })
        .await
    }

    async fn claim_node(
        &self,
        node_id: &str,
        incarnation: &str,
        now_ms: i64,
        expiry_ms: i64,
    ) -> Result<super::nodes::NodeClaim, StoreError> {
        let (node_id, incarnation) = (node_id.to_owned(), incarnation.to_owned());
        self.with_conn(move |conn| {
            let tx = conn.transaction()?;
            tx.execute(
                super::nodes::CLAIM_SQL,
                params![node_id, incarnation, now_ms, expiry_ms],
            )?;
            let holder: Option<String> = tx
                .query_row(super::nodes::HOLDER_SQL, params![node_id], |row| row.get(0))
                .optional()?;
            tx.commit()?;
            Ok(super::nodes::outcome(&incarnation, holder))
        })
        .await
    }

    async fn release_node(&self, node_id: &str, incarnation: &str) -> Result<(), StoreError> {
        let (node_id, incarnation) = (node_id.to_owned(), incarnation.to_owned());
        self.with_conn(move |conn| {
            conn.execute(super::nodes::RELEASE_SQL, params![node_id, incarnation])?;
            Ok(())
        })
        .await
    }

    async fn allot(
        &self,
        wants: Vec<super::allotments::AllotWant>,
        now_ms: i64,
    ) -> Result<Vec<u64>, StoreError> {
        use super::allotments::{ENSURE_SQL, GRANTED_SQL, PRUNE_SQL, SET_SQL};
        self.with_conn(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let mut grants = Vec::with_capacity(wants.len());
            for want in &wants {
                tx.execute(
                    ENSURE_SQL,
                    params![want.counter, want.window, want.expires_ms],
                )?;
                let already: i64 =
                    tx.query_row(GRANTED_SQL, params![want.counter, want.window], |row| {
                        row.get(0)
                    })?;
                let already = already.max(0) as u64;
                let granted = crate::throttle_allotment::grant(already, want.calls, want.limit);
                if granted > 0 {
                    tx.execute(
                        SET_SQL,
                        params![(already + granted) as i64, want.counter, want.window],
                    )?;
                }
                grants.push(granted);
            }
            tx.execute(PRUNE_SQL, params![now_ms])?;
            tx.commit()?;
            Ok(grants)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn sole_writer(&self) -> bool {
        true
    }
}
