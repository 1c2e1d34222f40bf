//! Market writes: purchases per second and their latency at 100 concurrent market clients,
//! on each store (SQLite, and PostgreSQL when one answers on 127.0.0.1:5432).
//!
//! Decision it informs: whether the control plane's write path (docs/control-plane.md: a
//! follower cache per replica, one transaction per write whose statements decide conflicts)
//! keeps up with a market's write rate, what durability (fsync per acknowledged write) costs
//! on each store, and whether replicas add throughput (no global lock: the store is the
//! limit). PostgreSQL runs with 1 and with 3 replicas on one database (clients spread
//! round-robin over them), with PostgreSQL's own count of transactions committed in the
//! database (`pg_stat_database.xact_commit`, reads included) per purchase: read before and
//! 1.5 s after the run (backends report it at most once a second). Run:
//! `cargo bench --bench market_writes` (PURCHASES=N per client, default 20; STORES=sqlite or
//! STORES=postgres runs one store only; REPLICAS=1,3 the PostgreSQL replica counts, in order).

use std::sync::Arc;
use std::time::{Duration, Instant};

use marketgate::control::ControlPlane;
use marketgate::shutdown::ShutdownTrigger;
use serde_json::json;

#[path = "support/market.rs"]
mod market;

use market::{control_config, listed_group, Api, MARKET_TOKEN, POSTGRES_ADMIN_URL};

const CLIENTS: usize = 100;

/// PostgreSQL's count of transactions committed in `database` so far (`None`: not PostgreSQL).
async fn xact_commit(admin: Option<(&tokio_postgres::Client, &str)>) -> Option<i64> {
    let (client, database) = admin?;
    client
        .batch_execute("SELECT pg_stat_clear_snapshot()")
        .await
        .ok()?;
    let row = client
        .query_one(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = $1",
            &[&database],
        )
        .await
        .ok()?;
    Some(row.get(0))
}

async fn run(
    store: &str,
    database_url: &str,
    per_client: usize,
    replicas: usize,
    admin: Option<(&tokio_postgres::Client, &str)>,
) {
    let config = control_config(database_url, "bench");
    let (trigger, shutdown) = ShutdownTrigger::new();
    let mut apis = Vec::new();
    for _ in 0..replicas {
        let cp = ControlPlane::open(&config)
            .await
            .expect("control plane opens");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(marketgate::control::serve(listener, cp, shutdown.clone()));
        apis.push(Arc::new(Api::new(addr)));
    }
    let gid = Arc::new(listed_group(&apis[0], "bench", "bench.market.local").await);

    let commits_0 = xact_commit(admin).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (api, gid) = (apis[c % replicas].clone(), gid.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_client);
            for n in 0..per_client {
                let body = json!({"order_id": format!("order-{c}-{n}"), "group_id": *gid,
                    "start_time": "1700000000", "expire_time": "4102444800",
                    "req_quota": "1000", "order_type": "1"});
                let sent = Instant::now();
                let (status, answer) = api
                    .send(
                        "POST",
                        "/v1/buyer-p/apigw/instances/bench/market/api-groups/purchase",
                        MARKET_TOKEN,
                        &format!("buyer-{c}"),
                        body,
                    )
                    .await;
                assert_eq!(status, 201, "{answer}");
                latencies.push(sent.elapsed());
            }
            latencies
        }));
    }
    let mut latencies: Vec<Duration> = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed();
    let per_purchase = match commits_0 {
        Some(before) => {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let after = xact_commit(admin).await.unwrap_or(before);
            format!("{:.1}", (after - before) as f64 / latencies.len() as f64)
        }
        None => "-".to_owned(),
    };
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "| {store} | {replicas} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {per_purchase} |",
        latencies.len(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3,
    );
    trigger.fire();
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this as a smoke test.
    let measuring = std::env::args().any(|a| a == "--bench");
    let per_client: usize = match std::env::var("PURCHASES").ok().and_then(|v| v.parse().ok()) {
        Some(n) => n,
        None if measuring => 20,
        None => 1,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        println!("| store | replicas | purchases | purchases/s | p50 ms | p99 ms | max ms | xact_commit/purchase |");
        println!("|---|---|---|---|---|---|---|---|");
        let dir = tempfile::tempdir().unwrap();
        let sqlite = format!("sqlite://{}", dir.path().join("bench.db").display());
        let wanted = |store: &str| std::env::var("STORES").map_or(true, |s| s.contains(store));
        if wanted("sqlite") {
            run("SQLite (WAL, synchronous=FULL)", &sqlite, per_client, 1, None).await;
        }
        if !wanted("postgres") {
            return;
        }
        match tokio_postgres::connect(POSTGRES_ADMIN_URL, tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                let replica_counts: Vec<usize> = match std::env::var("REPLICAS") {
                    Ok(list) => list.split(',').filter_map(|n| n.trim().parse().ok()).collect(),
                    Err(_) => vec![1, 3],
                };
                for replicas in replica_counts {
                    let name = format!("mg_bench_{}_{replicas}", std::process::id());
                    client
                        .execute(&format!("CREATE DATABASE {name}"), &[])
                        .await
                        .unwrap();
                    let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
                    let store = "PostgreSQL 15 (local, default fsync)";
                    run(store, &url, per_client, replicas, Some((&client, &name))).await;
                    let _ = client
                        .execute(&format!("DROP DATABASE {name} WITH (FORCE)"), &[])
                        .await;
                }
            }
            Err(_) => println!("PostgreSQL not reachable on 127.0.0.1:5432: skipped"),
        }
    });
}
