//! The control plane's durable store: one interface, two backends (SQLite, PostgreSQL).
//!
//! Design: the control plane is the single writer of its database and keeps the whole market
//! state in memory (`control::state`). The store therefore only has to load everything at
//! start and commit sets of record writes atomically. Records are JSON documents keyed by
//! `(kind, id)` in one `records` table; `meta` holds the snapshot version counter, which every
//! commit increments in the same transaction as its writes, so the version only grows, across
//! restarts too. `schema_migrations` lists the applied versioned migrations ([`MIGRATIONS`]),
//! applied in order at open.
//!
//! This module must not interpret documents or decide anything about the market: that is
//! `state`'s job. A commit returns only after the database has made it durable
//! (SQLite `synchronous=FULL` in WAL mode; PostgreSQL's commit).

pub mod postgres;
pub mod sqlite;

use async_trait::async_trait;

/// Versioned schema migrations, applied in order; each runs in its own transaction together
/// with its `schema_migrations` row. The SQL is common to SQLite and PostgreSQL.
pub const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE records (kind TEXT NOT NULL, id TEXT NOT NULL, doc TEXT NOT NULL, PRIMARY KEY (kind, id));
         CREATE TABLE meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
         INSERT INTO meta (key, value) VALUES ('snapshot_version', 0);",
    ),
];

/// The `meta` key of the snapshot version counter.
pub const VERSION_KEY: &str = "snapshot_version";

/// One record write: `doc = None` deletes.
#[derive(Debug, Clone)]
pub struct Write {
    pub kind: &'static str,
    pub id: String,
    pub doc: Option<String>,
}

/// Everything in the store, as loaded at start.
#[derive(Debug, Default)]
pub struct Loaded {
    pub version: u64,
    /// `(kind, id, doc)`.
    pub records: Vec<(String, String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[source] rusqlite::Error),
    #[error("postgres: {0}")]
    Postgres(#[source] tokio_postgres::Error),
    #[error("postgres pool: {0}")]
    Pool(#[source] deadpool_postgres::PoolError),
    #[error("postgres config: {0}")]
    PoolConfig(#[source] deadpool_postgres::CreatePoolError),
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("database_url '{0}' is neither sqlite:// nor postgres://")]
    UnknownScheme(String),
    #[error("the store's worker thread failed: {0}")]
    Worker(#[source] tokio::task::JoinError),
}

/// The durable store. Implementations must apply a whole [`Store::commit`] or nothing.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Every record and the current version.
    async fn load(&self) -> Result<Loaded, StoreError>;
    /// Applies `writes` in one transaction, incrementing the version with them when
    /// `bump_version` (a change the data plane must see; quota ledger writes — usage reports
    /// and leases — are not); returns the version once durable.
    async fn commit(&self, writes: Vec<Write>, bump_version: bool) -> Result<u64, StoreError>;
    /// Moves the version counter to `max(current, seen) + 1` in one transaction, with no record
    /// written; returns the new version once durable. For a data plane that holds a version
    /// this store did not make (the store was restored from an older backup): the next
    /// snapshot must be newer than what it holds.
    async fn advance_version(&self, seen: u64) -> Result<u64, StoreError>;
    /// Can the store be reached now? (`GET /readyz`.) An open SQLite file always can.
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Opens the backend named by `database_url` (`sqlite://PATH` or `postgres://…`) and applies
/// pending migrations.
pub async fn open(database_url: &str) -> Result<Box<dyn Store>, StoreError> {
    if let Some(path) = database_url.strip_prefix("sqlite://") {
        Ok(Box::new(sqlite::SqliteStore::open(path).await?))
    } else if database_url.starts_with("postgres://") || database_url.starts_with("postgresql://") {
        Ok(Box::new(postgres::PostgresStore::open(database_url).await?))
    } else {
        Err(StoreError::UnknownScheme(crate::config::redact_url(
            database_url,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(id: &str, doc: &str) -> Write {
        Write {
            kind: "group",
            id: id.into(),
            doc: Some(doc.into()),
        }
    }

    #[tokio::test]
    async fn sqlite_commits_survive_reopen_and_migrations_apply_once() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("nested/store.db").display());
        let store = open(&url).await.unwrap();
        assert_eq!(store.load().await.unwrap().version, 0);
        assert_eq!(
            store
                .commit(vec![put("a", "1"), put("b", "2")], true)
                .await
                .unwrap(),
            1
        );
        let deleted = Write {
            kind: "group",
            id: "b".into(),
            doc: None,
        };
        assert_eq!(
            store
                .commit(vec![put("a", "3"), deleted], true)
                .await
                .unwrap(),
            2
        );
        // A ledger write is durable but does not move the version.
        assert_eq!(store.commit(vec![put("c", "4")], false).await.unwrap(), 2);
        drop(store);
        let store = open(&url).await.unwrap();
        let loaded = store.load().await.unwrap();
        assert_eq!(loaded.version, 2);
        assert_eq!(
            loaded.records,
            vec![
                ("group".to_owned(), "a".to_owned(), "3".to_owned()),
                // The ledger write is there too: durable, only the version did not move.
                ("group".to_owned(), "c".to_owned(), "4".to_owned()),
            ]
        );
        let conn = rusqlite::Connection::open(dir.path().join("nested/store.db")).unwrap();
        let applied: i64 = conn
            .query_row("SELECT count(*) FROM schema_migrations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(applied, MIGRATIONS.len() as i64);
    }

    #[tokio::test]
    async fn sqlite_version_advances_past_what_a_data_plane_saw_and_never_back() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("store.db").display());
        let store = open(&url).await.unwrap();
        assert_eq!(store.commit(vec![put("a", "1")], true).await.unwrap(), 1);
        assert_eq!(store.advance_version(40).await.unwrap(), 41);
        // Behind the counter already: it still moves, by one, never back.
        assert_eq!(store.advance_version(3).await.unwrap(), 42);
        assert_eq!(store.commit(Vec::new(), true).await.unwrap(), 43);
        drop(store);
        let loaded = open(&url).await.unwrap().load().await.unwrap();
        assert_eq!(loaded.version, 43);
        assert_eq!(loaded.records.len(), 1);
    }

    #[tokio::test]
    async fn unknown_scheme_is_refused() {
        assert!(matches!(
            open("mysql://x").await,
            Err(StoreError::UnknownScheme(_))
        ));
    }
}
