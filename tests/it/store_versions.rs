//! The PostgreSQL store's version order with gaps (docs/control-plane.md, "Version order"):
//! versions come from a sequence, so a reader can see a later version committed while an
//! earlier one is still in flight, or was rolled back. These tests make such gaps by hand on
//! a real PostgreSQL (a second session taking a version) and check that a reader settles them
//! exactly: it waits for an owner in flight and then shows its commit, voids a version rolled
//! back, and an owner whose version was voided before it wrote its row fails.

use marketgate::control::store::{self, postgres, Claim, Commit, Store, StoreLimits, Write};

use crate::support::control::{a_session_waits_for_a_lock, Backend, POSTGRES_ADMIN_URL};

/// A fresh PostgreSQL database with the store's schema and group `a` = "a1" committed at
/// version 1, a raw session on it, and its URL;
/// `None` (the test skipped, as `Backend::all` says) without PostgreSQL.
async fn fresh() -> Option<(Box<dyn Store>, tokio_postgres::Client, String)> {
    let backends = Backend::all().await;
    if !backends.iter().any(|b| matches!(b, Backend::Postgres)) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let url = Backend::Postgres.fresh_database(dir.path()).await;
    let store = store::open(&url, StoreLimits::default()).await.unwrap();
    assert_eq!(store.commit(put("a", "a1", None)).await.unwrap().version, 1);
    let (raw, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    Some((store, raw, url))
}

async fn drop_database(url: &str) {
    let name = url.rsplit_once('/').unwrap().1;
    let admin = std::env::var("MARKETGATE_TEST_POSTGRES").unwrap_or(POSTGRES_ADMIN_URL.into());
    let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .unwrap();
}

fn put(id: &str, doc: &str, rev: Option<u64>) -> Commit {
    Commit {
        writes: vec![Write {
            kind: "group",
            id: id.into(),
            doc: Some(doc.into()),
            rev,
            claims: Vec::<Claim>::new(),
        }],
        bump_version: true,
        ..Commit::default()
    }
}

async fn void(raw: &tokio_postgres::Client, version: i64) -> Option<bool> {
    raw.query_opt("SELECT void FROM versions WHERE version = $1", &[&version])
        .await
        .unwrap()
        .map(|row| row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_versions_a_gap_in_flight_is_waited_for_and_shown() {
    let Some((store, mut raw, url)) = fresh().await else {
        return;
    };
    // A transaction of another replica takes version 2 as its last statement and has not
    // committed yet; version 3 commits meanwhile.
    let owner = raw.transaction().await.unwrap();
    owner
        .batch_execute(
            "WITH v AS (INSERT INTO versions (version, void) VALUES (nextval('snapshot_versions'), false) RETURNING version)
             INSERT INTO record_history (kind, id, version, rev, doc) SELECT 'group', 'b', version, 1, 'b1' FROM v;
             INSERT INTO records (kind, id, doc, rev, version) VALUES ('group', 'b', 'b1', 1, 0)",
        )
        .await
        .unwrap();
    assert_eq!(store.commit(put("c", "c1", None)).await.unwrap().version, 3);
    // A reader must show version 3 (acknowledged): it waits for version 2's owner.
    let reader = tokio::spawn(async move { store.changes_since(1, &[]).await.map(|c| (c, store)) });
    let (watcher, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    a_session_waits_for_a_lock(&watcher, "the reader never waited for the owner").await;
    assert!(!reader.is_finished(), "read past a version in flight");
    owner.commit().await.unwrap();
    let (changes, store) = reader.await.unwrap().unwrap();
    assert_eq!(changes.version, 3);
    let ids: Vec<&str> = changes.records.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["b", "c"], "version 3 holds version 2's commit");
    assert_eq!(void(&raw, 2).await, Some(false), "committed, not voided");
    drop(store);
    drop_database(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_versions_a_rolled_back_version_is_void_for_every_reader() {
    let Some((store, raw, url)) = fresh().await else {
        return;
    };
    // Version 2 is taken and rolled back: a gap nobody will fill.
    raw.batch_execute(
        "BEGIN; INSERT INTO versions (version, void) VALUES (nextval('snapshot_versions'), false); ROLLBACK",
    )
    .await
    .unwrap();
    assert_eq!(
        store.commit(put("a", "a2", Some(1))).await.unwrap().version,
        3
    );
    let changes = store.changes_since(1, &[]).await.unwrap();
    assert_eq!(changes.version, 3);
    assert_eq!(changes.records.len(), 1);
    assert_eq!(changes.records[0].doc.as_deref(), Some("a2"));
    assert_eq!(void(&raw, 2).await, Some(true));
    // Another replica reads the same versions and content.
    let replica = store::open(&url, StoreLimits::default()).await.unwrap();
    let all = replica.changes_since(0, &[]).await.unwrap();
    assert_eq!(all.version, 3);
    assert_eq!(all.records.len(), 1);
    assert_eq!(all.records[0].doc.as_deref(), Some("a2"));
    drop((store, replica));
    drop_database(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_versions_an_owner_whose_version_was_voided_fails() {
    let Some((store, raw, url)) = fresh().await else {
        return;
    };
    // Version 2 handed out, its row not inserted yet (a stalled owner); version 3 commits.
    let taken: i64 = raw
        .query_one("SELECT nextval('snapshot_versions')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(taken, 2);
    assert_eq!(store.commit(put("b", "b1", None)).await.unwrap().version, 3);
    assert_eq!(store.changes_since(1, &[]).await.unwrap().version, 3);
    assert_eq!(void(&raw, 2).await, Some(true));
    // The owner's commit now fails on the unique index: version 2 is void for everyone.
    let late = raw
        .execute(
            "INSERT INTO versions (version, void) VALUES (2, false)",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(
        late.code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
    );
    drop(store);
    drop_database(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_versions_advance_and_prune_keep_every_reader_exact() {
    let Some((store, raw, url)) = fresh().await else {
        return;
    };
    assert_eq!(store.advance_version(40).await.unwrap(), 41);
    assert_eq!(store.advance_version(3).await.unwrap(), 42);
    assert_eq!(
        store.commit(put("a", "a2", Some(1))).await.unwrap().version,
        43
    );
    assert_eq!(
        store.commit(put("a", "a3", Some(2))).await.unwrap().version,
        44
    );
    assert_eq!(postgres::prune_history(&raw).await.unwrap(), 44);
    let rows: i64 = raw
        .query_one("SELECT count(*) FROM record_history", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1, "superseded history pruned");
    for from in [0, 1, 42, 43] {
        let changes = store.changes_since(from, &[]).await.unwrap();
        assert_eq!(changes.version, 44, "from {from}");
        assert_eq!(changes.records.len(), 1, "from {from}");
        assert_eq!(changes.records[0].doc.as_deref(), Some("a3"));
    }
    assert!(store
        .changes_since(44, &[])
        .await
        .unwrap()
        .records
        .is_empty());
    drop(store);
    drop_database(&url).await;
}
