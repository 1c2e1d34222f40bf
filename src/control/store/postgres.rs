//! The PostgreSQL backend (`database_url = "postgres://…"`): the store of a control plane with
//! any number of replicas. Same schema as SQLite, through a deadpool connection pool; a commit
//! is one PostgreSQL transaction (READ COMMITTED) whose statements decide conflicts: a read is
//! checked and share-locked (`FOR SHARE`), a write is a compare-and-swap on `rev`, a claim an
//! `INSERT … ON CONFLICT DO NOTHING` on its primary key (which waits for a concurrent claimer
//! to commit or roll back), ledger rows are locked `FOR UPDATE`, and the version is taken by
//! the last statement. A committed version is announced with `NOTIFY` on [`CHANNEL`]; one
//! extra connection per replica LISTENs (see [`PostgresStore::notifications`]).
//!
//! Every statement runs under `statement_timeout` and `lock_timeout` (set on each connection),
//! a pooled connection is waited for at most `pool_wait`, and every call as a whole is bounded
//! too (a frozen server answers nothing at all): the store answers within its limits or says
//! [`StoreError::Unavailable`]. Must not hold any market logic.

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, NoTls, Transaction};

use super::{
    Changes, Claim, Commit, Committed, Conflict, Store, StoreError, StoreLimits, Stored,
    CLAIMS_BUILT_KEY, MIGRATIONS, VERSION_KEY,
};

/// Key of the advisory lock that serialises migrations between processes.
const MIGRATION_LOCK_KEY: i64 = 0x6d67_6d69_6772;
/// The LISTEN/NOTIFY channel on which each commit announces its version.
pub const CHANNEL: &str = "marketgate_changes";
/// How long the listener waits before connecting again after losing its connection.
const LISTEN_RETRY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: Pool,
    limits: StoreLimits,
    notified: watch::Receiver<u64>,
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
        let store = PostgresStore {
            pool,
            limits,
            notified,
        };
        store.bounded(store.migrate()).await?;
        tokio::spawn(listen(pg, notify));
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
        for (version, sql) in MIGRATIONS {
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
                .query(
                    "SELECT purchase_id, doc FROM ledgers WHERE purchase_id = ANY($1)
                     ORDER BY purchase_id FOR UPDATE",
                    &[&update.ids],
                )
                .await
                .map_err(postgres_error)?;
            let mut rows: Vec<(String, Option<String>)> = update
                .ids
                .iter()
                .map(|id| {
                    let doc = locked
                        .iter()
                        .find(|row| row.get::<_, &str>(0) == id)
                        .map(|row| row.get::<_, String>(1));
                    (id.clone(), doc)
                })
                .collect();
            let before = rows.clone();
            (update.apply)(&mut rows);
            // Every changed row in ONE statement, whatever the exchange carries: a lease
            // exchange costs four round trips (BEGIN, lock, write, COMMIT), not one per
            // purchase.
            let (ids, docs): (Vec<&str>, Vec<&str>) = rows
                .iter()
                .zip(&before)
                .filter_map(|((id, doc), (_, old))| {
                    let doc = doc.as_ref().filter(|d| Some(*d) != old.as_ref())?;
                    Some((id.as_str(), doc.as_str()))
                })
                .unzip();
            if !ids.is_empty() {
                tx.execute(
                    "INSERT INTO ledgers (purchase_id, doc)
                     SELECT * FROM unnest($1::text[], $2::text[])
                     ON CONFLICT (purchase_id) DO UPDATE SET doc = excluded.doc",
                    &[&ids, &docs],
                )
                .await
                .map_err(postgres_error)?;
            }
        }
        let version: i64 = if commit.bump_version {
            // Last: the version, the records' stamps and the notification, in ONE statement:
            // the counter's row lock is held from here to COMMIT, so versions are taken in
            // commit order, and every round trip made while it is held delays every other
            // commit of every replica.
            let kinds: Vec<&str> = commit.writes.iter().map(|w| w.kind).collect();
            let ids: Vec<&str> = commit.writes.iter().map(|w| w.id.as_str()).collect();
            tx.query_one(
                "WITH v AS (UPDATE meta SET value = value + 1 WHERE key = $1 RETURNING value),
                      stamped AS (UPDATE records SET version = v.value
                                  FROM v, unnest($2::text[], $3::text[]) AS w(kind, id)
                                  WHERE records.kind = w.kind AND records.id = w.id)
                 SELECT v.value FROM v CROSS JOIN LATERAL (SELECT pg_notify($4, v.value::text)) AS n",
                &[&VERSION_KEY, &kinds, &ids, &CHANNEL],
            )
            .await
            .map_err(postgres_error)?
            .get(0)
        } else {
            // A commit without a version takes no lock on the counter (lease exchanges of
            // different purchases never wait for each other) and does not read it either:
            // `Committed::version` is 0 (none made).
            0
        };
        tx.commit().await.map_err(postgres_error)?;
        Ok(Committed {
            version: to_u64(version),
            revs,
        })
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
        self.bounded(async {
            let client = self.pool.get().await.map_err(pool_error)?;
            // One statement is one snapshot: the version and the records agree.
            let rows = client
                .query(
                    "SELECT m.value, r.kind, r.id, r.rev, r.doc FROM meta m
                     LEFT JOIN records r ON r.version > $2 AND r.version <> ALL($3)
                     WHERE m.key = $1 ORDER BY r.version, r.kind, r.id",
                    &[&VERSION_KEY, &(version as i64), &held],
                )
                .await
                .map_err(postgres_error)?;
            let current = rows.first().map_or(0, |row| to_u64(row.get(0)));
            let records = rows
                .iter()
                .filter_map(|row| {
                    Some(Stored {
                        kind: row.get::<_, Option<String>>(1)?,
                        id: row.get(2),
                        rev: to_u64(row.get(3)),
                        doc: row.get(4),
                    })
                })
                .collect();
            Ok(Changes {
                version: current,
                records,
            })
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
        self.bounded(async {
            let mut client = self.pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(postgres_error)?;
            let version: i64 = tx
                .query_one(
                    "UPDATE meta SET value = GREATEST(value, $2) + 1 WHERE key = $1 RETURNING value",
                    &[&VERSION_KEY, &seen],
                )
                .await
                .map_err(postgres_error)?
                .get(0);
            tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &version.to_string()])
                .await
                .map_err(postgres_error)?;
            tx.commit().await.map_err(postgres_error)?;
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
