//! The embedded SQLite backend (the default): one file under `data_dir`, WAL journal,
//! `synchronous=FULL` so that a commit is on disk before the control plane answers 2xx.
//!
//! rusqlite is blocking, so every call runs on `spawn_blocking` holding the one connection;
//! the control plane serialises writes anyway. Must not hold any market logic.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::{Loaded, Store, StoreError, Write, MIGRATIONS, VERSION_KEY};

/// How long a statement waits on a locked database before failing, in milliseconds.
const BUSY_TIMEOUT_MS: u64 = 5_000;

#[derive(Debug, Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    pub async fn open(path: &str) -> Result<SqliteStore, StoreError> {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || Self::open_blocking(&path))
            .await
            .map_err(StoreError::Worker)?
    }

    fn open_blocking(path: &str) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = Path::new(path).parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
                    path: dir.display().to_string(),
                    source,
                })?;
            }
        }
        let mut conn = Connection::open(path).map_err(StoreError::Sqlite)?;
        conn.busy_timeout(std::time::Duration::from_millis(BUSY_TIMEOUT_MS))
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
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&mut conn).map_err(StoreError::Sqlite)
        })
        .await
        .map_err(StoreError::Worker)?
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn load(&self) -> Result<Loaded, StoreError> {
        self.with_conn(|conn| {
            let version: i64 = conn.query_row(
                "SELECT value FROM meta WHERE key = ?1",
                params![VERSION_KEY],
                |row| row.get(0),
            )?;
            let mut stmt = conn.prepare("SELECT kind, id, doc FROM records ORDER BY kind, id")?;
            let records = stmt
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Loaded {
                version: u64::try_from(version).unwrap_or(0),
                records,
            })
        })
        .await
    }

    async fn commit(&self, writes: Vec<Write>, bump_version: bool) -> Result<u64, StoreError> {
        self.with_conn(move |conn| {
            let tx = conn.transaction()?;
            for write in &writes {
                match &write.doc {
                    Some(doc) => tx.execute(
                        "INSERT INTO records (kind, id, doc) VALUES (?1, ?2, ?3)
                         ON CONFLICT (kind, id) DO UPDATE SET doc = excluded.doc",
                        params![write.kind, write.id, doc],
                    )?,
                    None => tx.execute(
                        "DELETE FROM records WHERE kind = ?1 AND id = ?2",
                        params![write.kind, write.id],
                    )?,
                };
            }
            let version: i64 = tx.query_row(
                "UPDATE meta SET value = value + ?2 WHERE key = ?1 RETURNING value",
                params![VERSION_KEY, i64::from(bump_version)],
                |row| row.get(0),
            )?;
            tx.commit()?;
            Ok(u64::try_from(version).unwrap_or(0))
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
            Ok(u64::try_from(version).unwrap_or(0))
        })
        .await
    }
}
