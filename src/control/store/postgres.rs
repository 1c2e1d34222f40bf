//! The PostgreSQL backend (`database_url = "postgres://…"`): the store of a control plane with
//! any number of replicas. Same schema as SQLite plus [`POSTGRES_MIGRATIONS`], through a
//! deadpool connection pool; a commit is one PostgreSQL transaction (READ COMMITTED) whose
//! statements decide conflicts: a read is checked and share-locked (`FOR SHARE`), a write is a
//! compare-and-swap on `rev`, a claim an `INSERT … ON CONFLICT DO NOTHING` on its primary key
//! (which waits for a concurrent claimer to commit or roll back), ledger rows are locked
//! `FOR UPDATE`. A commit of ledger rows alone (lease exchanges, the hottest writes) is two
//! pipelined round trips on a hand-begun transaction ([`OpenTransaction`]).
//!
//! Versions (docs/control-plane.md, "Version order"): a versioned commit takes
//! `nextval('snapshot_versions')` in its LAST statement, once every row lock it needs is held
//! (so of two conflicting commits the later one has the later version), and in that statement
//! inserts its row in `versions` and the content it wrote in `record_history`. No row is
//! shared by all commits: replicas' commits do not wait for each other unless they touch the
//! same rows, and PostgreSQL commits them in groups. The sequence hands versions out in the
//! order the statements run, not the order the transactions commit, and a rolled-back
//! transaction never commits its version: a reader sees gaps. A reader only ever serves the
//! contiguous prefix of `versions` (above the floor `meta(snapshot_version)`, below which
//! every version is settled), and reads each record's content at the latest version of that
//! prefix from `record_history`, so version N names one content on every replica. To get past
//! a gap below what it must show (read-your-writes: every version visible when it began), it
//! settles the gap with `INSERT … ON CONFLICT DO NOTHING` of a void row: the unique index
//! makes the insert wait for an owner still in flight and then do nothing (the version was
//! committed), or succeed when there is no owner (rolled back, or not yet inserted: that owner
//! then fails on the index and its request runs again). Superseded history rows below the
//! prefix are pruned by the followers ([`PostgresStore::prune_history`]).
//!
//! A committed version is announced with `NOTIFY` on [`CHANNEL`] after COMMIT, never inside a
//! write transaction (PostgreSQL's NOTIFY takes a database-wide lock held to the end of the
//! transaction: inside, it would serialise every commit): one task per replica sends the
//! highest version committed since it last sent ([`announce`]); one extra connection per
//! replica LISTENs (see [`PostgresStore::notifications`]). Followers also poll.
//!
//! Every statement runs under `statement_timeout` and `lock_timeout` (set on each connection),
//! a pooled connection is waited for at most `pool_wait`, and every call as a whole is bounded
//! too (a frozen server answers nothing at all): the store answers within its limits or says
//! [`StoreError::Unavailable`]. Must not hold any market logic.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::future::try_join;
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, NoTls, Transaction};

use super::{
    Changes, Claim, Commit, Committed, Conflict, LedgerUpdate, Store, StoreError, StoreLimits,
    Stored, CLAIMS_BUILT_KEY, MIGRATIONS, VERSION_KEY,
};

/// Key of the advisory lock that serialises migrations between processes.
const MIGRATION_LOCK_KEY: i64 = 0x6d67_6d69_6772;
/// The LISTEN/NOTIFY channel on which each commit announces its version.
pub const CHANNEL: &str = "marketgate_changes";
/// How long the listener waits before connecting again after losing its connection.
const LISTEN_RETRY: Duration = Duration::from_millis(500);
/// How often each replica prunes superseded `record_history` rows and moves the floor.
const PRUNE_INTERVAL: Duration = Duration::from_secs(10);

/// Migrations of the PostgreSQL backend alone, applied after [`MIGRATIONS`] (numbered from
/// 101, apart from the common list): the version sequence, `versions` (one row per version
/// made: `void` when settled without a commit) and `record_history` (each record's content at
/// each version it was written at; superseded rows pruned). `meta(snapshot_version)` becomes
/// the floor: every version up to it is settled (the old counter's value at migration).
pub const POSTGRES_MIGRATIONS: &[(i64, &str)] = &[(
    101,
    "CREATE SEQUENCE snapshot_versions;
     SELECT setval('snapshot_versions', (SELECT value FROM meta WHERE key = 'snapshot_version') + 1, false);
     CREATE TABLE versions (version BIGINT PRIMARY KEY, void BOOLEAN NOT NULL);
     CREATE TABLE record_history (kind TEXT NOT NULL, id TEXT NOT NULL, version BIGINT NOT NULL, rev BIGINT NOT NULL, doc TEXT, PRIMARY KEY (kind, id, version));
     CREATE INDEX record_history_by_version ON record_history (version);
     INSERT INTO record_history (kind, id, version, rev, doc) SELECT kind, id, version, rev, doc FROM records;",
)];

/// `settled(e)`: the end of the contiguous prefix of `versions` above `$1` or the floor,
/// whichever is higher (every version up to `e` is committed or void), and `m`, the highest
/// version visible; both in the statement's snapshot. Prefix of a statement whose `$1` is the
/// version to start from.
const SETTLED: &str = "WITH floor AS (SELECT GREATEST($1::bigint, value) AS s FROM meta WHERE key = 'snapshot_version'),
     settled AS (SELECT (SELECT min(c.v) - 1 FROM (SELECT floor.s + 1 AS v FROM floor
                         UNION ALL SELECT versions.version + 1 FROM versions, floor WHERE versions.version > floor.s) c
                         WHERE NOT EXISTS (SELECT 1 FROM versions w WHERE w.version = c.v)) AS e,
                        GREATEST((SELECT s FROM floor), (SELECT COALESCE(max(version), 0) FROM versions)) AS m,
                        (SELECT s FROM floor) AS s)";

/// Settles every version in `($1, $2]` without a visible `versions` row: a void row, unless its
/// owner commits it (the unique index makes the insert wait for an owner in flight, and
/// `ON CONFLICT DO NOTHING` then leaves the owner's row). Its own transaction, with no lock
/// held: the owner never waits for it.
const SETTLE: &str = "INSERT INTO versions (version, void)
     SELECT g, true FROM generate_series($1::bigint + 1, $2::bigint) g
     WHERE NOT EXISTS (SELECT 1 FROM versions WHERE version = g)
     ON CONFLICT (version) DO NOTHING";

#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: Pool,
    limits: StoreLimits,
    notified: watch::Receiver<u64>,
    /// The highest version this replica committed: [`announce`] sends it after COMMIT.
    committed: Arc<watch::Sender<u64>>,
}

/// Is this database error one that a retry (after the store recovers) can cure? Timeouts,
/// lost or refused connections, a database that is gone or shutting down.
fn postgres_error(e: tokio_postgres::Error) -> StoreError {
    let Some(code) = e.code() else {
        // Not an error the server reported: the connection (I/O, closed, a timeout).
        return StoreError::Unavailable(e.to_string());
    };
    if *code == SqlState::UNIQUE_VIOLATION
        || *code == SqlState::T_R_SERIALIZATION_FAILURE
        || *code == SqlState::T_R_DEADLOCK_DETECTED
    {
        return StoreError::Conflict(Conflict::Aborted);
    }
    let class = &code.code()[..2];
    let retryable = *code == SqlState::QUERY_CANCELED
        || *code == SqlState::LOCK_NOT_AVAILABLE
        || *code == SqlState::INVALID_CATALOG_NAME
        || *code == SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT
        // 08: connection exception; 53: insufficient resources; 57: operator intervention
        // (admin shutdown, pg_terminate_backend, cannot connect now).
        || matches!(class, "08" | "53" | "57");
    match retryable {
        true => StoreError::Unavailable(e.to_string()),
        false => StoreError::Postgres(e),
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    // Whatever stops the pool from handing out a connection — a wait or connect timeout, a
    // refused or failed connection, a database that is gone — a retry may cure.
    StoreError::Unavailable(format!("connection pool: {e}"))
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl PostgresStore {
    pub async fn open(url: &str, limits: StoreLimits) -> Result<PostgresStore, StoreError> {
        let mut pg: tokio_postgres::Config = url.parse().map_err(StoreError::Postgres)?;
        pg.options(format!(
            "-c statement_timeout={} -c lock_timeout={} -c idle_in_transaction_session_timeout={}",
            limits.statement_timeout.as_millis(),
            limits.lock_timeout.as_millis(),
            (limits.statement_timeout * 2).as_millis(),
        ));
        pg.connect_timeout(limits.pool_wait);
        let manager = Manager::from_config(
            pg.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(limits.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(limits.pool_wait))
            .create_timeout(Some(limits.pool_wait))
            .recycle_timeout(Some(limits.pool_wait))
            .build()
            .map_err(|e| StoreError::PoolConfig(deadpool_postgres::CreatePoolError::Build(e)))?;
        let (notify, notified) = watch::channel(0);
        let (committed, to_announce) = watch::channel(0);
        let store = PostgresStore {
            pool,
            limits,
            notified,
            committed: Arc::new(committed),
        };
        store.bounded(store.migrate()).await?;
        tokio::spawn(listen(pg, notify));
        tokio::spawn(announce(store.pool.clone(), to_announce.clone()));
        tokio::spawn(prune(store.pool.clone(), to_announce));
        Ok(store)
    }

    /// Bounds a whole call: statements are bounded by the server, but a server that stopped
    /// answering (frozen, or a network partition) is bounded only here.
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let limit = self.limits.pool_wait + self.limits.statement_timeout * 2;
        match tokio::time::timeout(limit, call).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!(
                "no answer within {} ms",
                limit.as_millis()
            ))),
        }
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        // Creating the table races between replicas starting together: serialise on the lock.
        let tx = client.transaction().await.map_err(postgres_error)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
            .await
            .map_err(postgres_error)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at TEXT NOT NULL)",
        )
        .await
        .map_err(postgres_error)?;
        tx.commit().await.map_err(postgres_error)?;
        for (version, sql) in MIGRATIONS.iter().chain(POSTGRES_MIGRATIONS) {
            let tx = client.transaction().await.map_err(postgres_error)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
                .await
                .map_err(postgres_error)?;
            let applied = tx
                .query_opt(
                    "SELECT version FROM schema_migrations WHERE version = $1",
                    &[version],
                )
                .await
                .map_err(postgres_error)?;
            if applied.is_none() {
                tx.batch_execute(sql).await.map_err(postgres_error)?;
                tx.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, now()::text)",
                    &[version],
                )
                .await
                .map_err(postgres_error)?;
            }
            tx.commit().await.map_err(postgres_error)?;
        }
        Ok(())
    }

    async fn commit_inner(&self, commit: Commit) -> Result<Committed, StoreError> {
        if commit.reads.is_empty() && commit.writes.is_empty() && !commit.bump_version {
            if let Some(update) = commit.ledger {
                return self.commit_ledger(update).await;
            }
        }
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await.map_err(postgres_error)?;
        for read in &commit.reads {
            let rev: Option<i64> = tx
                .query_opt(
                    "SELECT rev FROM records WHERE kind = $1 AND id = $2 AND doc IS NOT NULL FOR SHARE",
                    &[&read.kind, &read.id],
                )
                .await
                .map_err(postgres_error)?
                .map(|row| row.get(0));
            if rev.map(to_u64) != Some(read.rev) {
                return Err(StoreError::Conflict(Conflict::Stale {
                    kind: read.kind,
                    id: read.id.clone(),
                }));
            }
        }
        let mut revs = Vec::with_capacity(commit.writes.len());
        for write in &commit.writes {
            let row = match write.rev {
                None => tx
                    .query_opt(
                        "INSERT INTO records (kind, id, doc, rev, version) VALUES ($1, $2, $3, 1, 0)
                         ON CONFLICT (kind, id) DO UPDATE SET doc = excluded.doc, rev = records.rev + 1
                         WHERE records.doc IS NULL RETURNING rev",
                        &[&write.kind, &write.id, &write.doc],
                    )
                    .await
                    .map_err(postgres_error)?,
                Some(expected) => tx
                    .query_opt(
                        "UPDATE records SET doc = $3, rev = rev + 1
                         WHERE kind = $1 AND id = $2 AND rev = $4 AND doc IS NOT NULL RETURNING rev",
                        &[&write.kind, &write.id, &write.doc, &(expected as i64)],
                    )
                    .await
                    .map_err(postgres_error)?,
            };
            let Some(row) = row else {
                return Err(StoreError::Conflict(Conflict::Stale {
                    kind: write.kind,
                    id: write.id.clone(),
                }));
            };
            revs.push(to_u64(row.get(0)));
            claim(&tx, &write.id, &write.claims).await?;
        }
        if let Some(update) = commit.ledger {
            let locked = tx
                .query(LOCK_LEDGERS_SQL, &[&update.ids])
                .await
                .map_err(postgres_error)?;
            let (ids, docs) = apply_ledger_update(update, &locked);
            if !ids.is_empty() {
                tx.execute(WRITE_LEDGERS_SQL, &[&ids, &docs])
                    .await
                    .map_err(postgres_error)?;
            }
        }
        let version: i64 = if commit.bump_version {
            // Last, once every row lock is held: the version, its `versions` row and the
            // content written at it, in ONE statement. Nothing here is shared by all commits.
            // A record written twice in one commit is kept once, as last written.
            let mut written: Vec<(&str, &str, i64, Option<&str>)> = Vec::new();
            for (write, rev) in commit.writes.iter().zip(&revs) {
                written.retain(|(kind, id, ..)| (*kind, *id) != (write.kind, write.id.as_str()));
                written.push((write.kind, &write.id, *rev as i64, write.doc.as_deref()));
            }
            let kinds: Vec<&str> = written.iter().map(|w| w.0).collect();
            let ids: Vec<&str> = written.iter().map(|w| w.1).collect();
            let revs_written: Vec<i64> = written.iter().map(|w| w.2).collect();
            let docs: Vec<Option<&str>> = written.iter().map(|w| w.3).collect();
            tx.query_one(
                "WITH v AS (INSERT INTO versions (version, void) VALUES (nextval('snapshot_versions'), false)
                            RETURNING version),
                      h AS (INSERT INTO record_history (kind, id, version, rev, doc)
                            SELECT w.kind, w.id, v.version, w.rev, w.doc
                            FROM v, unnest($1::text[], $2::text[], $3::bigint[], $4::text[]) AS w(kind, id, rev, doc))
                 SELECT version FROM v",
                &[&kinds, &ids, &revs_written, &docs],
            )
            .await
            .map_err(postgres_error)?
            .get(0)
        } else {
            // A commit without a version takes none: `Committed::version` is 0 (none made).
            0
        };
        tx.commit().await.map_err(postgres_error)?;
        if version > 0 {
            self.committed.send_if_modified(|announced| {
                let newer = to_u64(version) > *announced;
                *announced = (*announced).max(to_u64(version));
                newer
            });
        }
        Ok(Committed {
            version: to_u64(version),
            revs,
        })
    }

    /// A commit of ledger rows alone: every lease exchange, usage report, release and expiry
    /// sweep, the store's hottest writes. Two round trips, both statements prepared once per
    /// connection: `BEGIN` pipelined with the row lock, then the write pipelined with
    /// `COMMIT`. The rows stay locked for one round trip of the replica and the commit's WAL
    /// flush, and the connection is idle in its transaction once, where a statement at a time
    /// (BEGIN, prepare and lock, prepare and write, COMMIT) took six round trips, each a
    /// wake-up of a busy replica (BENCHMARKS.md, "the simulated fleet: where an exchange's time
    /// goes").
    async fn commit_ledger(&self, update: LedgerUpdate) -> Result<Committed, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let lock = client
            .prepare_cached(LOCK_LEDGERS_SQL)
            .await
            .map_err(postgres_error)?;
        let write = client
            .prepare_cached(WRITE_LEDGERS_SQL)
            .await
            .map_err(postgres_error)?;
        let open = OpenTransaction(Some(client));
        let statements = async {
            // `try_join` polls its futures in order, so the statements are sent in order,
            // before either answer is read.
            let (_, locked) = try_join(
                open.batch_execute("BEGIN"),
                open.query(&lock, &[&update.ids]),
            )
            .await?;
            let (ids, docs) = apply_ledger_update(update, &locked);
            if ids.is_empty() {
                open.batch_execute("COMMIT").await
            } else {
                try_join(
                    open.execute(&write, &[&ids, &docs]),
                    open.batch_execute("COMMIT"),
                )
                .await
                .map(|_| ())
            }
        };
        match statements.await {
            Ok(()) => open.close(),
            Err(error) => {
                // A failed statement aborted the transaction (a `COMMIT` already sent then
                // rolled it back): end it, so that the connection goes back to the pool clean.
                if open.batch_execute("ROLLBACK").await.is_ok() {
                    open.close();
                }
                return Err(postgres_error(error));
            }
        }
        Ok(Committed {
            version: 0,
            revs: Vec::new(),
        })
    }
}

/// Locks the ledger rows of `$1` in one order (purchase id), so that two exchanges sharing
/// purchases wait for each other instead of deadlocking.
const LOCK_LEDGERS_SQL: &str = "SELECT purchase_id, doc FROM ledgers WHERE purchase_id = ANY($1)
     ORDER BY purchase_id FOR UPDATE";
/// Every changed ledger row in ONE statement, whatever the update carries.
const WRITE_LEDGERS_SQL: &str = "INSERT INTO ledgers (purchase_id, doc)
     SELECT * FROM unnest($1::text[], $2::text[])
     ON CONFLICT (purchase_id) DO UPDATE SET doc = excluded.doc";

/// Runs `update` on the rows `locked` (`LOCK_LEDGERS_SQL`'s answer), in the order of its
/// ids; returns the ids and documents of the rows it changed.
fn apply_ledger_update(
    update: LedgerUpdate,
    locked: &[tokio_postgres::Row],
) -> (Vec<String>, Vec<String>) {
    // By id: an exchange may carry thousands of purchases (a scan per id was quadratic).
    let docs: HashMap<&str, String> = locked
        .iter()
        .map(|row| (row.get::<_, &str>(0), row.get::<_, String>(1)))
        .collect();
    let mut rows: Vec<(String, Option<String>)> = update
        .ids
        .iter()
        .map(|id| (id.clone(), docs.get(id.as_str()).cloned()))
        .collect();
    let before: Vec<Option<String>> = rows.iter().map(|(_, doc)| doc.clone()).collect();
    (update.apply)(&mut rows);
    rows.into_iter()
        .zip(before)
        .filter_map(|((id, doc), old)| {
            let doc = doc.filter(|d| Some(d) != old.as_ref())?;
            Some((id, doc))
        })
        .unzip()
}

/// A pooled connection inside a transaction begun by hand (pipelined `BEGIN`): dropped before
/// [`OpenTransaction::close`] — the call cancelled at its time limit, or the transaction not
/// ended — it closes the connection instead of handing it back, so that PostgreSQL rolls the
/// transaction back and no later caller finds it open.
struct OpenTransaction(Option<deadpool_postgres::Object>);

impl OpenTransaction {
    /// The transaction is over: the connection goes back to the pool.
    fn close(mut self) {
        self.0.take();
    }
}

impl std::ops::Deref for OpenTransaction {
    type Target = deadpool_postgres::Object;

    fn deref(&self) -> &deadpool_postgres::Object {
        self.0.as_ref().expect("open until closed")
    }
}

impl Drop for OpenTransaction {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

/// Replaces the claims `owner` holds by `claims`; a key held by another owner is a conflict.
async fn claim(tx: &Transaction<'_>, owner: &str, claims: &[Claim]) -> Result<(), StoreError> {
    tx.execute("DELETE FROM claims WHERE owner = $1", &[&owner])
        .await
        .map_err(postgres_error)?;
    for c in claims {
        let inserted = tx
            .execute(
                "INSERT INTO claims (scope, key, owner) VALUES ($1, $2, $3) ON CONFLICT (scope, key) DO NOTHING",
                &[&c.scope, &c.key, &owner],
            )
            .await
            .map_err(postgres_error)?;
        if inserted == 0 {
            let holder: String = tx
                .query_opt(
                    "SELECT owner FROM claims WHERE scope = $1 AND key = $2",
                    &[&c.scope, &c.key],
                )
                .await
                .map_err(postgres_error)?
                .map(|row| row.get(0))
                .unwrap_or_default();
            return Err(StoreError::Conflict(Conflict::Claimed {
                scope: c.scope,
                key: c.key.clone(),
                owner: holder,
            }));
        }
    }
    Ok(())
}

/// Announces this replica's commits on [`CHANNEL`], after COMMIT and coalesced: each
/// notification carries the highest version committed since the previous one was sent (one in
/// flight at a time). A notification lost costs latency only: followers also poll.
async fn announce(pool: Pool, mut committed: watch::Receiver<u64>) {
    while committed.changed().await.is_ok() {
        let version = *committed.borrow_and_update();
        let sent = async {
            let client = pool.get().await.map_err(pool_error)?;
            client
                .execute(
                    "SELECT pg_notify($1, $2)",
                    &[&CHANNEL, &version.to_string()],
                )
                .await
                .map_err(postgres_error)
        };
        if let Err(error) = sent.await {
            tracing::debug!(%error, version, "announcing a version failed; followers poll");
        }
    }
}

/// Every [`PRUNE_INTERVAL`], for as long as the store lives: [`prune_history`].
async fn prune(pool: Pool, mut committed: watch::Receiver<u64>) {
    loop {
        let due = tokio::time::sleep(PRUNE_INTERVAL);
        let mut due = std::pin::pin!(due);
        loop {
            tokio::select! {
                _ = &mut due => break,
                changed = committed.changed() => if changed.is_err() {
                    return; // the store was dropped: let its connections go
                },
            }
        }
        let pruned = async { prune_history(&*pool.get().await.map_err(pool_error)?).await };
        if let Err(error) = pruned.await {
            tracing::debug!(%error, "pruning the record history failed; retrying later");
        }
    }
}

/// Deletes the `record_history` rows superseded by a later row of the same record at a
/// settled version above the floor, then moves the floor to the end of the settled prefix.
/// Safe for every reader: one that starts later reads up to a settled end at least as high,
/// where the later row is the record's content; one already reading keeps its snapshot.
/// Returns the new floor.
pub async fn prune_history(client: &tokio_postgres::Client) -> Result<u64, StoreError> {
    let row = client
        .query_one(
            &format!("{SETTLED} SELECT settled.s, settled.e FROM settled"),
            &[&0i64],
        )
        .await
        .map_err(postgres_error)?;
    let (floor, settled): (i64, i64) = (row.get(0), row.get(1));
    if settled > floor {
        client
            .execute(
                "DELETE FROM record_history h USING record_history n
                 WHERE n.version > $1 AND n.version <= $2
                   AND h.kind = n.kind AND h.id = n.id AND h.version < n.version",
                &[&floor, &settled],
            )
            .await
            .map_err(postgres_error)?;
        client
            .execute(
                "UPDATE meta SET value = $2 WHERE key = $1 AND value < $2",
                &[&VERSION_KEY, &settled],
            )
            .await
            .map_err(postgres_error)?;
    }
    Ok(to_u64(settled))
}

/// Follows [`CHANNEL`] on a connection of its own, for as long as anyone watches `notify`;
/// reconnects after [`LISTEN_RETRY`] when the connection is lost. Notifications lost while
/// it reconnects cost latency only: followers also poll.
async fn listen(config: tokio_postgres::Config, notify: watch::Sender<u64>) {
    loop {
        match config.connect(NoTls).await {
            Ok((client, mut connection)) => {
                let mut messages =
                    futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                let statement = format!("LISTEN {CHANNEL}");
                let listening = client.batch_execute(&statement);
                // The connection must be polled for the LISTEN to complete.
                let mut listening = std::pin::pin!(listening);
                let mut ready = false;
                loop {
                    tokio::select! {
                        done = &mut listening, if !ready => {
                            if let Err(error) = done {
                                tracing::warn!(%error, "LISTEN failed");
                                break;
                            }
                            ready = true;
                            // Wake the followers: whatever was committed while not listening.
                            notify.send_modify(|_| {});
                        }
                        message = messages.next() => match message {
                            Some(Ok(AsyncMessage::Notification(n))) => {
                                if let Ok(version) = n.payload().parse::<u64>() {
                                    notify.send_if_modified(|v| {
                                        let newer = version > *v;
                                        *v = (*v).max(version);
                                        newer
                                    });
                                }
                            }
                            Some(Ok(_)) => {}
                            Some(Err(error)) => {
                                tracing::warn!(%error, "the change listener lost its connection");
                                break;
                            }
                            None => break,
                        },
                        _ = notify.closed() => return,
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "the change listener cannot connect"),
        }
        tokio::select! {
            _ = tokio::time::sleep(LISTEN_RETRY) => {}
            _ = notify.closed() => return,
        }
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn changes_since(&self, version: u64, held: &[u64]) -> Result<Changes, StoreError> {
        let held: Vec<i64> = held.iter().map(|&v| v as i64).collect();
        let read = format!(
            "{SETTLED},
                  latest AS (SELECT DISTINCT ON (h.kind, h.id) h.kind, h.id, h.version, h.rev, h.doc
                             FROM record_history h, settled WHERE h.version > $1 AND h.version <= settled.e
                             ORDER BY h.kind, h.id, h.version DESC)
             SELECT settled.e, settled.m, l.kind, l.id, l.rev, l.doc
             FROM settled LEFT JOIN latest l ON l.version <> ALL($2)
             ORDER BY l.version, l.kind, l.id"
        );
        self.bounded(async {
            let client = self.pool.get().await.map_err(pool_error)?;
            // Every version visible when the call began must be reached: a write acknowledged
            // before it (read-your-writes across replicas).
            let mut must_reach = None;
            loop {
                // One statement is one snapshot: the prefix and the records agree.
                let rows = client
                    .query(&read, &[&(version as i64), &held])
                    .await
                    .map_err(postgres_error)?;
                let settled: i64 = rows.first().map_or(0, |row| row.get(0));
                let visible: i64 = rows.first().map_or(0, |row| row.get(1));
                let must_reach = *must_reach.get_or_insert(visible);
                if settled >= must_reach {
                    let records = rows
                        .iter()
                        .filter_map(|row| {
                            Some(Stored {
                                kind: row.get::<_, Option<String>>(2)?,
                                id: row.get(3),
                                rev: to_u64(row.get(4)),
                                doc: row.get(5),
                            })
                        })
                        .collect();
                    return Ok(Changes {
                        version: to_u64(settled),
                        records,
                    });
                }
                // Gaps below what must be shown: settle them, then read again.
                client
                    .execute(SETTLE, &[&settled, &must_reach])
                    .await
                    .map_err(postgres_error)?;
            }
        })
        .await
    }

    async fn commit(&self, commit: Commit) -> Result<Committed, StoreError> {
        self.bounded(self.commit_inner(commit)).await
    }

    async fn ledgers(&self, ids: Option<Vec<String>>) -> Result<Vec<(String, String)>, StoreError> {
        self.bounded(async {
            let client = self.pool.get().await.map_err(pool_error)?;
            let rows = match ids {
                None => client
                    .query(
                        "SELECT purchase_id, doc FROM ledgers ORDER BY purchase_id",
                        &[],
                    )
                    .await
                    .map_err(postgres_error)?,
                Some(ids) => client
                    .query(
                        "SELECT purchase_id, doc FROM ledgers WHERE purchase_id = ANY($1)",
                        &[&ids],
                    )
                    .await
                    .map_err(postgres_error)?,
            };
            Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
        })
        .await
    }

    async fn build_claims(&self, claims: Vec<(Claim, String)>) -> Result<(), StoreError> {
        self.bounded(async {
            let mut client = self.pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(postgres_error)?;
            for (c, owner) in &claims {
                tx.execute(
                    "INSERT INTO claims (scope, key, owner) VALUES ($1, $2, $3) ON CONFLICT (scope, key) DO NOTHING",
                    &[&c.scope, &c.key, owner],
                )
                .await
                .map_err(postgres_error)?;
            }
            tx.execute(
                "UPDATE meta SET value = 1 WHERE key = $1",
                &[&CLAIMS_BUILT_KEY],
            )
            .await
            .map_err(postgres_error)?;
            tx.commit().await.map_err(postgres_error)?;
            Ok(())
        })
        .await
    }

    async fn claims_built(&self) -> Result<bool, StoreError> {
        self.bounded(async {
            let client = self.pool.get().await.map_err(pool_error)?;
            let built: Option<i64> = client
                .query_opt(
                    "SELECT value FROM meta WHERE key = $1",
                    &[&CLAIMS_BUILT_KEY],
                )
                .await
                .map_err(postgres_error)?
                .map(|row| row.get(0));
            Ok(built != Some(0))
        })
        .await
    }

    async fn advance_version(&self, seen: u64) -> Result<u64, StoreError> {
        let seen = i64::try_from(seen).unwrap_or(i64::MAX - 1);
        let version = self
            .bounded(async {
                let mut client = self.pool.get().await.map_err(pool_error)?;
                let tx = client.transaction().await.map_err(postgres_error)?;
                // No version in flight from here to COMMIT: a versioned commit's last
                // statement inserts into `versions` (ROW EXCLUSIVE, which SHARE excludes), so
                // this waits for those that took one and holds back the others.
                tx.batch_execute("LOCK TABLE versions IN SHARE MODE")
                    .await
                    .map_err(postgres_error)?;
                let row = tx
                    .query_one(
                        "SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END,
                                (SELECT value FROM meta WHERE key = $1)
                         FROM snapshot_versions",
                        &[&VERSION_KEY],
                    )
                    .await
                    .map_err(postgres_error)?;
                let (handed_out, floor): (i64, i64) = (row.get(0), row.get(1));
                // Every version handed out is committed or rolled back now: settle the gaps.
                tx.execute(SETTLE, &[&floor, &handed_out])
                    .await
                    .map_err(postgres_error)?;
                let version = handed_out.max(seen).max(floor) + 1;
                tx.execute(
                    "UPDATE meta SET value = $2 WHERE key = $1",
                    &[&VERSION_KEY, &version],
                )
                .await
                .map_err(postgres_error)?;
                tx.query_one("SELECT setval('snapshot_versions', $1)", &[&version])
                    .await
                    .map_err(postgres_error)?;
                tx.commit().await.map_err(postgres_error)?;
                Ok(version)
            })
            .await?;
        self.committed.send_if_modified(|announced| {
            let newer = to_u64(version) > *announced;
            *announced = (*announced).max(to_u64(version));
            newer
        });
        Ok(to_u64(version))
    }

    async fn claim_node(
        &self,
        node_id: &str,
        incarnation: &str,
        now_ms: i64,
        expiry_ms: i64,
    ) -> Result<super::nodes::NodeClaim, StoreError> {
        self.bounded(async {
            let mut client = self.pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(postgres_error)?;
            tx.execute(
                super::nodes::CLAIM_SQL,
                &[&node_id, &incarnation, &now_ms, &expiry_ms],
            )
            .await
            .map_err(postgres_error)?;
            let holder: Option<String> = tx
                .query_opt(super::nodes::HOLDER_SQL, &[&node_id])
                .await
                .map_err(postgres_error)?
                .map(|row| row.get(0));
            tx.commit().await.map_err(postgres_error)?;
            Ok(super::nodes::outcome(incarnation, holder))
        })
        .await
    }

    async fn release_node(&self, node_id: &str, incarnation: &str) -> Result<(), StoreError> {
        self.bounded(async {
            let client = self.pool.get().await.map_err(pool_error)?;
            client
                .execute(super::nodes::RELEASE_SQL, &[&node_id, &incarnation])
                .await
                .map_err(postgres_error)?;
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
        self.bounded(async {
            let mut client = self.pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(postgres_error)?;
            let locked = format!("{GRANTED_SQL} FOR UPDATE");
            let mut grants = Vec::with_capacity(wants.len());
            for want in &wants {
                tx.execute(ENSURE_SQL, &[&want.counter, &want.window, &want.expires_ms])
                    .await
                    .map_err(postgres_error)?;
                let already: i64 = tx
                    .query_one(&locked, &[&want.counter, &want.window])
                    .await
                    .map_err(postgres_error)?
                    .get(0);
                let already = already.max(0) as u64;
                let granted = crate::throttle_allotment::grant(already, want.calls, want.limit);
                if granted > 0 {
                    let total = (already + granted) as i64;
                    tx.execute(SET_SQL, &[&total, &want.counter, &want.window])
                        .await
                        .map_err(postgres_error)?;
                }
                grants.push(granted);
            }
            tx.execute(PRUNE_SQL, &[&now_ms])
                .await
                .map_err(postgres_error)?;
            tx.commit().await.map_err(postgres_error)?;
            Ok(grants)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.bounded(async {
            let client = self.pool.get().await.map_err(pool_error)?;
            client
                .simple_query("SELECT 1")
                .await
                .map_err(postgres_error)?;
            Ok(())
        })
        .await
    }

    fn notifications(&self) -> Option<watch::Receiver<u64>> {
        Some(self.notified.clone())
    }
}
