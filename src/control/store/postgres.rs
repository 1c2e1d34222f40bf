//! The PostgreSQL backend (`database_url = "postgres://…"`): the same records/meta schema as
//! SQLite, through a deadpool connection pool. A commit is one PostgreSQL transaction; the
//! answer waits for its COMMIT. Must not hold any market logic.

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use super::{Loaded, Store, StoreError, Write, MIGRATIONS, VERSION_KEY};

/// Connections kept by the pool; the control plane writes from one task at a time.
const POOL_MAX_CONNECTIONS: usize = 4;

/// Key of the advisory lock that serialises migrations between processes.
const MIGRATION_LOCK_KEY: i64 = 0x6d67_6d69_6772;

#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: Pool,
}

impl PostgresStore {
    pub async fn open(url: &str) -> Result<PostgresStore, StoreError> {
        let pg: tokio_postgres::Config = url.parse().map_err(StoreError::Postgres)?;
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_MAX_CONNECTIONS)
            .build()
            .map_err(|e| StoreError::PoolConfig(deadpool_postgres::CreatePoolError::Build(e)))?;
        let store = PostgresStore { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.pool.get().await.map_err(StoreError::Pool)?;
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at TEXT NOT NULL)",
            )
            .await
            .map_err(StoreError::Postgres)?;
        for (version, sql) in MIGRATIONS {
            let tx = client.transaction().await.map_err(StoreError::Postgres)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
                .await
                .map_err(StoreError::Postgres)?;
            let applied = tx
                .query_opt(
                    "SELECT version FROM schema_migrations WHERE version = $1",
                    &[version],
                )
                .await
                .map_err(StoreError::Postgres)?;
            if applied.is_none() {
                tx.batch_execute(sql).await.map_err(StoreError::Postgres)?;
                tx.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, now()::text)",
                    &[version],
                )
                .await
                .map_err(StoreError::Postgres)?;
            }
            tx.commit().await.map_err(StoreError::Postgres)?;
        }
        Ok(())
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn load(&self) -> Result<Loaded, StoreError> {
        let client = self.pool.get().await.map_err(StoreError::Pool)?;
        let version: i64 = client
            .query_one("SELECT value FROM meta WHERE key = $1", &[&VERSION_KEY])
            .await
            .map_err(StoreError::Postgres)?
            .get(0);
        let rows = client
            .query("SELECT kind, id, doc FROM records ORDER BY kind, id", &[])
            .await
            .map_err(StoreError::Postgres)?;
        Ok(Loaded {
            version: u64::try_from(version).unwrap_or(0),
            records: rows
                .iter()
                .map(|row| (row.get(0), row.get(1), row.get(2)))
                .collect(),
        })
    }

    async fn commit(&self, writes: Vec<Write>, bump_version: bool) -> Result<u64, StoreError> {
        let mut client = self.pool.get().await.map_err(StoreError::Pool)?;
        let tx = client.transaction().await.map_err(StoreError::Postgres)?;
        for write in &writes {
            match &write.doc {
                Some(doc) => tx
                    .execute(
                        "INSERT INTO records (kind, id, doc) VALUES ($1, $2, $3)
                         ON CONFLICT (kind, id) DO UPDATE SET doc = excluded.doc",
                        &[&write.kind, &write.id, doc],
                    )
                    .await
                    .map_err(StoreError::Postgres)?,
                None => tx
                    .execute(
                        "DELETE FROM records WHERE kind = $1 AND id = $2",
                        &[&write.kind, &write.id],
                    )
                    .await
                    .map_err(StoreError::Postgres)?,
            };
        }
        let version: i64 = tx
            .query_one(
                "UPDATE meta SET value = value + $2 WHERE key = $1 RETURNING value",
                &[&VERSION_KEY, &i64::from(bump_version)],
            )
            .await
            .map_err(StoreError::Postgres)?
            .get(0);
        tx.commit().await.map_err(StoreError::Postgres)?;
        Ok(u64::try_from(version).unwrap_or(0))
    }

    async fn advance_version(&self, seen: u64) -> Result<u64, StoreError> {
        let seen = i64::try_from(seen).unwrap_or(i64::MAX - 1);
        let client = self.pool.get().await.map_err(StoreError::Pool)?;
        let version: i64 = client
            .query_one(
                "UPDATE meta SET value = GREATEST(value, $2) + 1 WHERE key = $1 RETURNING value",
                &[&VERSION_KEY, &seen],
            )
            .await
            .map_err(StoreError::Postgres)?
            .get(0);
        Ok(u64::try_from(version).unwrap_or(0))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let client = self.pool.get().await.map_err(StoreError::Pool)?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(StoreError::Postgres)?;
        Ok(())
    }
}
