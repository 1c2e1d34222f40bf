//! One control plane, many replicas (CONTRACT §1): three `ControlPlane`s on one PostgreSQL
//! database, each on its own socket, raced against each other. The store decides every
//! conflict: one purchase per `order_id` with one answer from every replica, one group per
//! `url_domain`, a delist on one replica never undone by another, reads on any replica that
//! show every write acknowledged before them, and version N the same content everywhere.
//! PostgreSQL only (SQLite is for one process); skipped, saying so, when it is unreachable.
//!
//! The real-process version (three `marketgate control` binaries, proxies leasing from
//! different replicas, a `kill -9`) is `cluster_fleet.rs`.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::control::{
    a_session_waits_for_a_lock, expect_error, expect_status, holding_locks, market_base, mgmt,
    sellable_group, served, Backend, Control, BUYER_DOMAIN, BUYER_PROJECT, MARKET_TOKEN,
    SELLER_DOMAIN, SELLER_PROJECT, SELLER_TOKEN,
};

const REPLICAS: usize = 3;
/// How long a replica may take to serve a version another replica committed (the issue's
/// bound is 200 ms p99; this is a test's generous ceiling).
const FOLLOW: Duration = Duration::from_secs(5);

/// Three replicas on one fresh PostgreSQL database, or `None` (skipped) without PostgreSQL.
async fn replicas() -> Option<Vec<Control>> {
    let backends = Backend::all().await;
    let backend = backends.iter().find(|b| matches!(b, Backend::Postgres))?;
    let first = Control::start(backend).await;
    let mut all = Vec::new();
    for _ in 1..REPLICAS {
        all.push(first.replica().await);
    }
    all.insert(0, first);
    Some(all)
}

fn onsell_path(gid: &str) -> String {
    format!("{}/api-groups/onsell/{gid}", market_base(SELLER_PROJECT))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_the_same_order_raced_on_three_replicas_is_one_purchase() {
    let Some(replicas) = replicas().await else {
        return;
    };
    let seller = replicas[0].client(SELLER_TOKEN);
    let (gid, _) = sellable_group(&seller, "raced_group").await;
    // Listed through replica 1, bought through all three at once.
    let listed = replicas[1]
        .client(MARKET_TOKEN)
        .as_domain(SELLER_DOMAIN)
        .put(
            &onsell_path(&gid),
            json!({"url_domain": "raced.example.com"}),
        )
        .await;
    expect_status("onsell on replica 1", &listed, 201);
    let path = format!("{}/api-groups/purchase", market_base(BUYER_PROJECT));
    let body = json!({"order_id": "raced-order", "group_id": gid, "start_time": "1700000000",
                      "expire_time": "4102444800", "req_quota": "10", "order_type": "1"});
    let tasks: Vec<_> = (0..50)
        .map(|n| {
            let market = replicas[n % REPLICAS]
                .client(MARKET_TOKEN)
                .as_domain(BUYER_DOMAIN);
            let (path, body) = (path.clone(), body.clone());
            tokio::spawn(async move { market.post(&path, body).await })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    assert!(answers.iter().all(|a| a.0 == 201), "{answers:?}");
    assert!(
        answers.iter().all(|a| a == &answers[0]),
        "one answer for one order, from every replica: {answers:?}"
    );
    for (n, replica) in replicas.iter().enumerate() {
        let snapshot = served(replica).await;
        assert_eq!(snapshot.purchases.len(), 1, "replica {n}: one purchase");
        assert_eq!(snapshot.apps.len(), 1, "replica {n}: one MARKET app");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_two_groups_onsold_to_one_domain_at_once_one_wins() {
    let Some(replicas) = replicas().await else {
        return;
    };
    let seller = replicas[0].client(SELLER_TOKEN);
    for round in 0..5 {
        let (a, _) = sellable_group(&seller, &format!("left_{round}")).await;
        let (b, _) = sellable_group(&seller, &format!("right_{round}")).await;
        let domain = format!("contested-{round}.example.com");
        let on = |n: usize, gid: String| {
            let market = replicas[n].client(MARKET_TOKEN).as_domain(SELLER_DOMAIN);
            let domain = domain.clone();
            async move {
                market
                    .put(&onsell_path(&gid), json!({"url_domain": domain}))
                    .await
            }
        };
        let (left, right) = tokio::join!(on(1, a.clone()), on(2, b.clone()));
        let mut answers = [left, right];
        answers.sort_by_key(|a| a.0);
        expect_status("the winner", &answers[0], 201);
        expect_error("the loser", &answers[1], 400, "APIG.3305");
        // Every replica serves one group on the domain.
        for replica in &replicas {
            let snapshot = served(replica).await;
            let holders = snapshot
                .groups
                .iter()
                .filter(|g| g.url_domain.as_deref() == Some(domain.as_str()))
                .count();
            assert_eq!(holders, 1, "{domain}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_reads_on_any_replica_show_every_acknowledged_write() {
    let Some(replicas) = replicas().await else {
        return;
    };
    let seller = replicas[0].client(SELLER_TOKEN);
    let (gid, _) = sellable_group(&seller, "ryw_group").await;
    let market = |n: usize, domain: &str| replicas[n].client(MARKET_TOKEN).as_domain(domain);
    expect_status(
        "onsell on replica 0",
        &market(0, SELLER_DOMAIN)
            .put(&onsell_path(&gid), json!({"url_domain": "ryw.example.com"}))
            .await,
        201,
    );
    for n in 0..20 {
        let order = format!("ryw-{n}");
        let bought = market(n % REPLICAS, BUYER_DOMAIN)
            .post(
                &format!("{}/api-groups/purchase", market_base(BUYER_PROJECT)),
                json!({"order_id": order, "group_id": gid, "start_time": "1700000000",
                       "expire_time": "4102444800", "req_quota": "10", "order_type": "1"}),
            )
            .await;
        expect_status("purchase", &bought, 201);
        let id = bought.1["purchase_id"].as_str().unwrap();
        // At once, on the next replica: no waiting for a notification.
        let shown = market((n + 1) % REPLICAS, BUYER_DOMAIN)
            .get(&format!("{}/purchases/{id}", market_base(BUYER_PROJECT)))
            .await;
        expect_status("read on another replica", &shown, 200);
        assert_eq!(shown.1["order_id"], order.as_str());
        assert_eq!(shown.1["quota_left"], 10);
    }
    // The seller's group list on replica 2 shows a group created on replica 1 just now.
    let created = replicas[1]
        .client(SELLER_TOKEN)
        .post(
            &format!("{}/api-groups", mgmt(SELLER_PROJECT)),
            json!({"name": "fresh_group"}),
        )
        .await;
    expect_status("create on replica 1", &created, 201);
    let listed = replicas[2]
        .client(SELLER_TOKEN)
        .get(&format!(
            "{}/api-groups?name=fresh_group",
            mgmt(SELLER_PROJECT)
        ))
        .await;
    expect_status("list on replica 2", &listed, 200);
    assert_eq!(listed.1["total"], 1, "{}", listed.1);
    // And a name taken on replica 1 is taken on replica 2.
    expect_error(
        "the same name on replica 2",
        &replicas[2]
            .client(SELLER_TOKEN)
            .post(
                &format!("{}/api-groups", mgmt(SELLER_PROJECT)),
                json!({"name": "fresh_group"}),
            )
            .await,
        400,
        "APIG.3201",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_a_delist_on_one_replica_is_never_undone_and_versions_agree() {
    let Some(replicas) = replicas().await else {
        return;
    };
    let seller = replicas[0].client(SELLER_TOKEN);
    let (gid, _) = sellable_group(&seller, "delisted_group").await;
    let market = |n: usize| replicas[n].client(MARKET_TOKEN).as_domain(SELLER_DOMAIN);
    expect_status(
        "onsell",
        &market(0)
            .put(
                &onsell_path(&gid),
                json!({"url_domain": "gone.example.com"}),
            )
            .await,
        201,
    );
    // Every replica follows the store on its own (notifications), without being asked.
    let version = replicas[0].cp.version();
    let mut followers: Vec<_> = replicas.iter().map(|r| r.cp.subscribe()).collect();
    for (n, follower) in followers.iter_mut().enumerate() {
        tokio::time::timeout(FOLLOW, follower.wait_for(|v| *v >= version))
            .await
            .unwrap_or_else(|_| panic!("replica {n} never followed to {version}"))
            .unwrap();
    }
    expect_status(
        "delist on replica 1",
        &market(1)
            .delete(&format!(
                "{}/api-groups/delist/{gid}",
                market_base(SELLER_PROJECT)
            ))
            .await,
        204,
    );
    // Replica 2 had the group on sale in its cache: its writes are decided on the store's.
    expect_error(
        "onsell again on replica 2",
        &market(2)
            .put(
                &onsell_path(&gid),
                json!({"url_domain": "gone.example.com"}),
            )
            .await,
        400,
        "APIG.3420",
    );
    expect_error(
        "off-sell on replica 0",
        &market(0).delete(&onsell_path(&gid)).await,
        404,
        "APIG.3016",
    );
    // Version N is the same content on every replica.
    let snapshots: Vec<Value> = {
        let mut all = Vec::new();
        for replica in &replicas {
            let mut s = serde_json::to_value(served(replica).await).unwrap();
            s["generated_at"] = Value::Null;
            all.push(s);
        }
        all
    };
    assert!(
        snapshots.iter().all(|s| s == &snapshots[0]),
        "one version, one content"
    );
    let group = snapshots[0]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["id"] == gid.as_str())
        .unwrap();
    assert_eq!(group["market_state"], "delisted");
    // Versions follow commits: a replica's followers see them without any request to it.
    let deadline = Instant::now() + FOLLOW;
    let latest = replicas.iter().map(|r| r.cp.version()).max().unwrap();
    while replicas.iter().any(|r| r.cp.version() < latest) {
        assert!(
            Instant::now() < deadline,
            "a replica stayed behind {latest}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// No replica-wide lock across a commit: a write stalled in the store (another session holds
/// its record's row lock) leaves every other write and read of the same replica free. Before
/// the cache's lock was released across commits, the second write waited for the first one's
/// commit, so it answered only after the lock timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_a_write_stalled_in_the_store_does_not_stall_its_replica() {
    let backends = Backend::all().await;
    let Some(backend) = backends.iter().find(|b| matches!(b, Backend::Postgres)) else {
        return;
    };
    let control = Control::start_with(backend, "store_lock_timeout_ms = 10000").await;
    let seller = control.client(SELLER_TOKEN);
    let groups = format!("{}/api-groups", mgmt(SELLER_PROJECT));
    let mut ids = Vec::new();
    for name in ["stalled_a", "free_b"] {
        let created = seller.post(&groups, json!({"name": name})).await;
        expect_status("create", &created, 201);
        ids.push(created.1["id"].as_str().unwrap().to_owned());
    }
    let holder = holding_locks(
        &control.database_url,
        &format!(
            "SELECT rev FROM records WHERE kind = 'group' AND id = '{}' FOR UPDATE",
            ids[0]
        ),
    )
    .await;
    let stalled = tokio::spawn({
        let seller = seller.clone();
        let path = format!("{groups}/{}", ids[0]);
        async move {
            seller
                .put(&path, json!({"name": "stalled_a_renamed"}))
                .await
        }
    });
    // Wait until the stalled write is waiting for the row lock in the store.
    a_session_waits_for_a_lock(&holder, "the write never reached the row lock").await;
    // Meanwhile the same replica writes and reads other records.
    let renamed = seller
        .put(
            &format!("{groups}/{}", ids[1]),
            json!({"name": "free_b_renamed"}),
        )
        .await;
    expect_status("a write of another record", &renamed, 200);
    let created = seller.post(&groups, json!({"name": "free_c"})).await;
    expect_status("a new record", &created, 201);
    let listed = seller.get(&groups).await;
    expect_status("a read", &listed, 200);
    assert!(
        !stalled.is_finished(),
        "the stalled write is still waiting for its row lock"
    );
    holder.batch_execute("ROLLBACK").await.unwrap();
    let answered = stalled.await.unwrap();
    expect_status("the stalled write, once the lock is gone", &answered, 200);
    let (_, listed) = seller.get(&groups).await;
    let names: Vec<&str> = listed["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    for name in ["stalled_a_renamed", "free_b_renamed", "free_c"] {
        assert!(names.contains(&name), "{name} in {names:?}");
    }
}

/// Measurement, not a check (run by hand: `cargo test --test it cluster_follow_latency --
/// --ignored --nocapture`): how long after a write's 2xx on replica 0 replicas 1 and 2 announce
/// its version on their own (LISTEN/NOTIFY, no request to them). Prints p50/p99/max.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run by hand, prints percentiles"]
async fn cluster_follow_latency() {
    let Some(replicas) = replicas().await else {
        return;
    };
    let seller = replicas[0].client(SELLER_TOKEN);
    let mut followers: Vec<_> = replicas[1..].iter().map(|r| r.cp.subscribe()).collect();
    let mut lags = Vec::new();
    for n in 0..200 {
        let created = seller
            .post(
                &format!("{}/api-groups", mgmt(SELLER_PROJECT)),
                json!({"name": format!("follow_{n}")}),
            )
            .await;
        let acked = Instant::now();
        expect_status("create", &created, 201);
        let version = replicas[0].cp.version();
        for follower in &mut followers {
            tokio::time::timeout(FOLLOW, follower.wait_for(|v| *v >= version))
                .await
                .expect("followed")
                .unwrap();
            lags.push(acked.elapsed());
        }
    }
    lags.sort();
    let pct = |p: f64| lags[((lags.len() as f64 * p) as usize).min(lags.len() - 1)];
    println!(
        "follow latency over {} (write, replica) pairs: p50 {:?} p99 {:?} max {:?}",
        lags.len(),
        pct(0.50),
        pct(0.99),
        lags.last().unwrap()
    );
}
