//! The control plane's durable store: one interface, two backends (SQLite, PostgreSQL). The
//! store is the truth; every replica's in-memory `control::state::State` is only a follower
//! cache of it.
//!
//! Schema (one [`MIGRATIONS`] list, the same SQL on both backends):
//! - `records(kind, id, doc, rev, version)`: JSON documents keyed by `(kind, id)`. `rev`
//!   counts the writes of one record (compare-and-swap: a write names the `rev` it was
//!   validated against); `version` is the snapshot version of its last write. A delete keeps
//!   the row with `doc = NULL` (a tombstone), so that followers learn it by version.
//! - `claims(scope, key, owner)`: uniqueness, decided by the primary key: a url_domain, a
//!   group or app name in its project, an app key or code, an API's route in its group, an
//!   `order_id`. A record write carries the full set of claims its record holds afterwards.
//! - `ledgers(purchase_id, doc)`: each purchase's quota ledger (`crate::lease::Ledger`),
//!   apart from the purchase document so that market writes and lease exchanges never
//!   conflict; changed under a row lock (`FOR UPDATE`), never by compare-and-swap.
//! - `proxy_nodes(node_id, incarnation, seen_at_ms)`: which incarnation of a proxy holds each
//!   node id ([`nodes`]): one live proxy per node id across every replica.
//! - `throttle_allotments(counter, win, granted, expires_ms)`: the calls of each throttling
//!   counter granted to proxies per window ([`allotments`]): never more than its limit.
//! - `meta`: the snapshot version. A commit that changes what proxies see takes the next
//!   version as its LAST statement, once every row lock it needs is held, so of two
//!   conflicting commits the later one has the later version, and a reader that is at version
//!   N holds every commit up to N and nothing after it. SQLite (one writer at a time): `meta`
//!   is the counter. PostgreSQL: versions come from a sequence, may commit out of order or
//!   not at all, and readers serve only the settled prefix; `meta` is its floor
//!   (`postgres`, docs/control-plane.md "Version order").
//!
//! A [`Commit`] is one transaction whose own statements decide conflicts: stale reads and
//! writes (the `rev` moved) and taken claims fail it with [`StoreError::Conflict`], and the
//! caller catches up and tries again. A commit returns only after the database made it
//! durable (SQLite `synchronous=FULL` in WAL mode; PostgreSQL's COMMIT).
//!
//! This module must not interpret documents or decide anything about the market: that is
//! `state`'s job.

pub mod allotments;
pub mod nodes;
pub mod postgres;
pub mod sqlite;

use std::time::Duration;

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
    // The store as the truth of many replicas: revisions and versions on records (a delete
    // becomes a tombstone: `doc` nullable), uniqueness claims, and ledgers apart from the
    // purchases (copied from the purchase documents, whose ledger fields `LedgerDoc` reads).
    // `claims_built = 0` asks the next start to claim what existing records hold.
    (
        2,
        "CREATE TABLE records2 (kind TEXT NOT NULL, id TEXT NOT NULL, doc TEXT, rev BIGINT NOT NULL, version BIGINT NOT NULL, PRIMARY KEY (kind, id));
         INSERT INTO records2 (kind, id, doc, rev, version) SELECT kind, id, doc, 1, (SELECT value FROM meta WHERE key = 'snapshot_version') FROM records;
         DROP TABLE records;
         ALTER TABLE records2 RENAME TO records;
         CREATE INDEX records_by_version ON records (version);
         CREATE TABLE claims (scope TEXT NOT NULL, key TEXT NOT NULL, owner TEXT NOT NULL, PRIMARY KEY (scope, key));
         CREATE INDEX claims_by_owner ON claims (owner);
         CREATE TABLE ledgers (purchase_id TEXT PRIMARY KEY, doc TEXT NOT NULL);
         INSERT INTO ledgers (purchase_id, doc) SELECT id, doc FROM records WHERE kind = 'purchase';
         INSERT INTO meta (key, value) VALUES ('claims_built', 0);",
    ),
    // The node registry: one live proxy per node id, across replicas (`nodes`).
    (
        3,
        "CREATE TABLE proxy_nodes (node_id TEXT PRIMARY KEY, incarnation TEXT NOT NULL, seen_at_ms BIGINT NOT NULL);",
    ),
    // Throttling allotments: calls granted per counter and window, across replicas
    // (`allotments`).
    (
        4,
        "CREATE TABLE throttle_allotments (counter TEXT NOT NULL, win BIGINT NOT NULL, granted BIGINT NOT NULL, expires_ms BIGINT NOT NULL, PRIMARY KEY (counter, win));
         CREATE INDEX throttle_allotments_by_expiry ON throttle_allotments (expires_ms);",
    ),
];

/// The `meta` key of the snapshot version counter (SQLite) or settled floor (PostgreSQL).
pub const VERSION_KEY: &str = "snapshot_version";
/// The `meta` key that says whether existing records' claims were written (migration 2).
pub const CLAIMS_BUILT_KEY: &str = "claims_built";

/// How long one SQL statement may run before the store cancels it (`statement_timeout`).
pub const DEFAULT_STATEMENT_TIMEOUT_MS: u64 = 5_000;
/// How long a statement may wait for a row lock held by another transaction (`lock_timeout`;
/// SQLite: its busy timeout).
pub const DEFAULT_LOCK_TIMEOUT_MS: u64 = 2_000;
/// How long a request waits for a free connection of the pool, or for a new one to connect.
pub const DEFAULT_POOL_WAIT_MS: u64 = 2_000;
/// Connections each replica keeps to PostgreSQL (one more is its change listener).
pub const DEFAULT_POOL_SIZE: usize = 16;

/// The store's time limits and pool size (`[control] store_*` keys, docs/operations.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    pub statement_timeout: Duration,
    pub lock_timeout: Duration,
    pub pool_wait: Duration,
    pub pool_size: usize,
}

impl Default for StoreLimits {
    fn default() -> StoreLimits {
        StoreLimits {
            statement_timeout: Duration::from_millis(DEFAULT_STATEMENT_TIMEOUT_MS),
            lock_timeout: Duration::from_millis(DEFAULT_LOCK_TIMEOUT_MS),
            pool_wait: Duration::from_millis(DEFAULT_POOL_WAIT_MS),
            pool_size: DEFAULT_POOL_SIZE,
        }
    }
}

/// A uniqueness claim held by the record that carries it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Claim {
    pub scope: &'static str,
    pub key: String,
}

/// One record write: `doc = None` deletes. `rev` is the revision the write was validated
/// against (`None`: no live record was known); `claims` is everything the record holds
/// afterwards (claims it held before and not named here are given up).
#[derive(Debug, Clone)]
pub struct Write {
    pub kind: &'static str,
    pub id: String,
    pub doc: Option<String>,
    pub rev: Option<u64>,
    pub claims: Vec<Claim>,
}

/// A record the commit was decided on without writing it: it must still be at `rev` (and
/// stays there until the commit ends: PostgreSQL `FOR SHARE`).
#[derive(Debug, Clone)]
pub struct Read {
    pub kind: &'static str,
    pub id: String,
    pub rev: u64,
}

/// Ledger rows as a ledger update sees them: purchase id and document (`None`: no row yet).
pub type LedgerRows = Vec<(String, Option<String>)>;

/// A change to ledger rows, computed while they are locked: `apply` gets the rows of `ids`
/// (sorted, deduplicated, in that order) and changes their documents in place; the rows it
/// changed are written.
pub struct LedgerUpdate {
    pub ids: Vec<String>,
    pub apply: Box<dyn FnOnce(&mut LedgerRows) + Send>,
}

impl std::fmt::Debug for LedgerUpdate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerUpdate")
            .field("ids", &self.ids)
            .finish_non_exhaustive()
    }
}

/// One transaction: reads checked, records written, ledgers updated, and with
/// `bump_version` the next snapshot version taken (a change the data plane must see).
#[derive(Debug, Default)]
pub struct Commit {
    pub reads: Vec<Read>,
    pub writes: Vec<Write>,
    pub ledger: Option<LedgerUpdate>,
    pub bump_version: bool,
}

/// What a commit did: the version it made (0 without `bump_version`: none made, and the
/// counter is not read) and the new revision of each write, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub version: u64,
    pub revs: Vec<u64>,
}

/// One record as stored; `doc = None` is a tombstone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub kind: String,
    pub id: String,
    pub rev: u64,
    pub doc: Option<String>,
}

/// The records written after some version, up to `version`, read in one snapshot.
#[derive(Debug, Default)]
pub struct Changes {
    pub version: u64,
    pub records: Vec<Stored>,
}

/// Why a commit was refused by the store's own checks; the caller catches up and retries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    #[error("{scope} {key} is claimed by {owner}")]
    Claimed {
        scope: &'static str,
        key: String,
        owner: String,
    },
    #[error("the {kind} {id} changed since it was read")]
    Stale { kind: &'static str, id: String },
    /// The database aborted the transaction to resolve a deadlock or a serialization failure.
    #[error("the transaction was aborted by a concurrent one")]
    Aborted,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[source] rusqlite::Error),
    #[error("postgres: {0}")]
    Postgres(#[source] tokio_postgres::Error),
    /// The store cannot be reached, or did not answer in time (a statement, lock or pool-wait
    /// timeout, a lost connection): retryable, and reported as 503.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
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
    #[error("commit refused: {0}")]
    Conflict(Conflict),
}

/// The durable store. Implementations apply a whole [`Store::commit`] or nothing.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Every record written after `version` (tombstones included) and the current version,
    /// read in one snapshot of the store. `changes_since(0, &[])` is everything. A record
    /// whose last write is at one of the versions `held` is left out: the caller holds that
    /// write already (a replica's own commits, `ControlPlane`'s catch-up), and re-reading it
    /// would only cost the store and the parse.
    async fn changes_since(&self, version: u64, held: &[u64]) -> Result<Changes, StoreError>;
    /// Applies `commit` in one transaction, or nothing; see [`Commit`].
    async fn commit(&self, commit: Commit) -> Result<Committed, StoreError>;
    /// The ledger documents of `ids` (all ledgers when `None`), by purchase id.
    async fn ledgers(&self, ids: Option<Vec<String>>) -> Result<Vec<(String, String)>, StoreError>;
    /// Writes claims that existing records hold but the claims table lacks (after migration
    /// 2), once: later starts find `claims_built` set and do nothing. A key already claimed
    /// by another owner is left to that owner.
    async fn build_claims(&self, claims: Vec<(Claim, String)>) -> Result<(), StoreError>;
    /// Does the store need [`Store::build_claims`]?
    async fn claims_built(&self) -> Result<bool, StoreError>;
    /// Moves the version counter to `max(current, seen) + 1` in one transaction, with no record
    /// written; returns the new version once durable. For a data plane that holds a version
    /// this store did not make (the store was restored from an older backup): the next
    /// snapshot must be newer than what it holds.
    async fn advance_version(&self, seen: u64) -> Result<u64, StoreError>;
    /// Claims `node_id` for `incarnation` at `now_ms`, unless another incarnation seen within
    /// `expiry_ms` holds it ([`nodes::CLAIM_SQL`]).
    async fn claim_node(
        &self,
        node_id: &str,
        incarnation: &str,
        now_ms: i64,
        expiry_ms: i64,
    ) -> Result<nodes::NodeClaim, StoreError>;
    /// Gives `node_id` up if `incarnation` holds it (a clean stop).
    async fn release_node(&self, node_id: &str, incarnation: &str) -> Result<(), StoreError>;
    /// Grants each of `wants` what is left of its limit in its window, at most what it asks,
    /// in one transaction with the rows locked; forgets rows expired by `now_ms`. Returns
    /// the grants in order.
    async fn allot(
        &self,
        wants: Vec<allotments::AllotWant>,
        now_ms: i64,
    ) -> Result<Vec<u64>, StoreError>;
    /// Can the store be reached now? (`GET /readyz`.)
    async fn ping(&self) -> Result<(), StoreError>;
    /// Is this process the store's only writer? SQLite is for one process (`data_dir`, or a
    /// database file kept elsewhere, is locked to it: [`lock_sqlite_file`]), and one
    /// control plane per database in it; then a replica's requests need not read the store
    /// to see every acknowledged write (`ControlPlane::state`). PostgreSQL: no, replicas share it.
    fn sole_writer(&self) -> bool {
        false
    }
    /// Versions committed by other processes as the store announces them (PostgreSQL
    /// LISTEN/NOTIFY); `None` where no other process can write (SQLite). A notification may
    /// be lost: followers also poll.
    fn notifications(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// The lock file beside a SQLite database: `<db>.lock`.
pub const SQLITE_LOCK_SUFFIX: &str = ".lock";

/// SQLite is for one process. A database inside `data_dir` is covered by the data_dir lock
/// ([`crate::data_dir::DataDir::claim`], taken first); one kept elsewhere is locked on its
/// own, on `<db>.lock` (the same [`crate::data_dir::FileLock`]), before it is opened: a second
/// control plane on the file stops here, naming the holder's pid. `None` for PostgreSQL and
/// for a database inside `data_dir`. Call after claiming `data_dir`.
pub fn lock_sqlite_file(
    database_url: &str,
    data_dir: &std::path::Path,
) -> Result<Option<crate::data_dir::FileLock>, crate::data_dir::LockError> {
    let Some(path) = database_url.strip_prefix("sqlite://") else {
        return Ok(None);
    };
    let db = std::path::Path::new(path);
    let parent = match db.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|source| crate::data_dir::LockError::Io {
        action: "create",
        path: parent.clone(),
        source,
    })?;
    let inside = match (parent.canonicalize(), data_dir.canonicalize()) {
        (Ok(parent), Ok(data_dir)) => parent.starts_with(data_dir),
        _ => false,
    };
    if inside {
        return Ok(None);
    }
    let lock = std::path::PathBuf::from(format!("{path}{SQLITE_LOCK_SUFFIX}"));
    crate::data_dir::FileLock::acquire(&lock, "SQLite database", db).map(Some)
}

/// Opens the backend named by `database_url` (`sqlite://PATH` or `postgres://…`) and applies
/// pending migrations.
pub async fn open(database_url: &str, limits: StoreLimits) -> Result<Box<dyn Store>, StoreError> {
    if let Some(path) = database_url.strip_prefix("sqlite://") {
        Ok(Box::new(sqlite::SqliteStore::open(path, limits).await?))
    } else if database_url.starts_with("postgres://") || database_url.starts_with("postgresql://") {
        Ok(Box::new(
            postgres::PostgresStore::open(database_url, limits).await?,
        ))
    } else {
        Err(StoreError::UnknownScheme(crate::config::redact_url(
            database_url,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(id: &str, doc: &str, rev: Option<u64>, claims: &[(&'static str, &str)]) -> Write {
        Write {
            kind: "group",
            id: id.into(),
            doc: Some(doc.into()),
            rev,
            claims: claims
                .iter()
                .map(|(scope, key)| Claim {
                    scope,
                    key: (*key).into(),
                })
                .collect(),
        }
    }

    fn commit(writes: Vec<Write>) -> Commit {
        Commit {
            writes,
            bump_version: true,
            ..Commit::default()
        }
    }

    #[tokio::test]
    async fn sqlite_commits_survive_reopen_and_migrations_apply_once() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("nested/store.db").display());
        let store = open(&url, StoreLimits::default()).await.unwrap();
        assert_eq!(store.changes_since(0, &[]).await.unwrap().version, 0);
        let done = store
            .commit(commit(vec![
                put("a", "1", None, &[]),
                put("b", "2", None, &[]),
            ]))
            .await
            .unwrap();
        assert_eq!(
            done,
            Committed {
                version: 1,
                revs: vec![1, 1]
            }
        );
        let deleted = Write {
            doc: None,
            ..put("b", "", Some(1), &[])
        };
        let done = store
            .commit(commit(vec![put("a", "3", Some(1), &[]), deleted]))
            .await
            .unwrap();
        assert_eq!(
            done,
            Committed {
                version: 2,
                revs: vec![2, 2]
            }
        );
        drop(store);
        let store = open(&url, StoreLimits::default()).await.unwrap();
        let all = store.changes_since(0, &[]).await.unwrap();
        assert_eq!(all.version, 2);
        let stored = |id: &str, rev, doc: Option<&str>| Stored {
            kind: "group".into(),
            id: id.into(),
            rev,
            doc: doc.map(str::to_owned),
        };
        // The delete is a tombstone, so that followers learn it.
        assert_eq!(
            all.records,
            vec![stored("a", 2, Some("3")), stored("b", 2, None)]
        );
        assert!(store
            .changes_since(2, &[])
            .await
            .unwrap()
            .records
            .is_empty());
        let conn = rusqlite::Connection::open(dir.path().join("nested/store.db")).unwrap();
        let applied: i64 = conn
            .query_row("SELECT count(*) FROM schema_migrations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(applied, MIGRATIONS.len() as i64);
    }

    #[tokio::test]
    async fn stale_writes_and_taken_claims_are_refused_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("store.db").display());
        let store = open(&url, StoreLimits::default()).await.unwrap();
        store
            .commit(commit(vec![put(
                "a",
                "1",
                None,
                &[("domain", "x.example")],
            )]))
            .await
            .unwrap();
        // Validated against rev 0 (none): a record is there now.
        let stale = store.commit(commit(vec![put("a", "2", None, &[])])).await;
        assert!(matches!(
            stale,
            Err(StoreError::Conflict(Conflict::Stale { .. }))
        ));
        // Another record claiming the same key: refused, naming the holder, nothing written.
        let taken = store
            .commit(commit(vec![
                put("c", "3", None, &[]),
                put("b", "2", None, &[("domain", "x.example")]),
            ]))
            .await;
        match taken {
            Err(StoreError::Conflict(Conflict::Claimed { owner, .. })) => assert_eq!(owner, "a"),
            other => panic!("{other:?}"),
        }
        assert_eq!(store.changes_since(1, &[]).await.unwrap().records, vec![]);
        // The holder gives the claim up; then the other may take it.
        store
            .commit(commit(vec![put("a", "1b", Some(1), &[])]))
            .await
            .unwrap();
        store
            .commit(commit(vec![put(
                "b",
                "2",
                None,
                &[("domain", "x.example")],
            )]))
            .await
            .unwrap();
        // A read that moved fails the commit too.
        let read = Commit {
            reads: vec![Read {
                kind: "group",
                id: "a".into(),
                rev: 1,
            }],
            ..commit(vec![put("d", "4", None, &[])])
        };
        assert!(matches!(
            store.commit(read).await,
            Err(StoreError::Conflict(Conflict::Stale { .. }))
        ));
    }

    #[tokio::test]
    async fn ledger_updates_write_what_changed_without_a_version() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("store.db").display());
        let store = open(&url, StoreLimits::default()).await.unwrap();
        let update = |f: fn(&mut LedgerRows)| Commit {
            ledger: Some(LedgerUpdate {
                ids: vec!["p".into(), "q".into()],
                apply: Box::new(f),
            }),
            ..Commit::default()
        };
        let done = store
            .commit(update(|rows| {
                assert_eq!(rows, &vec![("p".into(), None), ("q".into(), None)]);
                rows[0].1 = Some("L1".into());
            }))
            .await
            .unwrap();
        assert_eq!(done.version, 0);
        store
            .commit(update(|rows| {
                assert_eq!(rows[0].1.as_deref(), Some("L1"));
                rows[0].1 = Some("L2".into());
            }))
            .await
            .unwrap();
        assert_eq!(
            store.ledgers(None).await.unwrap(),
            vec![("p".to_owned(), "L2".to_owned())]
        );
        assert_eq!(store.ledgers(Some(vec!["q".into()])).await.unwrap(), vec![]);
    }

    #[tokio::test]
    async fn sqlite_version_advances_past_what_a_data_plane_saw_and_never_back() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("store.db").display());
        let store = open(&url, StoreLimits::default()).await.unwrap();
        let done = store.commit(commit(vec![put("a", "1", None, &[])])).await;
        assert_eq!(done.unwrap().version, 1);
        assert_eq!(store.advance_version(40).await.unwrap(), 41);
        // Behind the counter already: it still moves, by one, never back.
        assert_eq!(store.advance_version(3).await.unwrap(), 42);
        assert_eq!(store.commit(commit(Vec::new())).await.unwrap().version, 43);
        drop(store);
        let loaded = open(&url, StoreLimits::default())
            .await
            .unwrap()
            .changes_since(0, &[])
            .await
            .unwrap();
        assert_eq!(loaded.version, 43);
        assert_eq!(loaded.records.len(), 1);
    }

    #[tokio::test]
    async fn unknown_scheme_is_refused() {
        assert!(matches!(
            open("mysql://x", StoreLimits::default()).await,
            Err(StoreError::UnknownScheme(_))
        ));
    }
}
