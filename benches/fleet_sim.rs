//! A simulated fleet: many lease clients in one process against control replicas on one
//! PostgreSQL database, under steady traffic, counting what the store really does
//! (`pg_stat_database.xact_commit`) against the capacity model of docs/capacity.md.
//!
//! Decision it informs: whether the store's load follows proxies, not calls (issue 14 item 7:
//! a lease exchange is one transaction whatever it carries, and its interval stretches with
//! lease size), what a fleet of a given size costs the store in transactions per second, and
//! how long an exchange takes as a proxy sees it.
//!
//! Each simulated proxy is the real thing minus its sockets for buyers: a `Gateway` in leased
//! mode with its own data directory, a snapshot holding the purchases it serves, and the real
//! `LeaseClient` exchanging over HTTP (`POST /v1/leases` through an `Uplink` naming every
//! replica, as `proxy.control_urls` does). Traffic takes calls from its quota cells as the
//! handler does (take; when dry, wait for a refill; note the usage), evenly over each second.
//!
//! Run (optimised; the thin profile on a shared machine):
//! `cargo build --profile thin --bench fleet_sim && target/thin/deps/fleet_sim-* --bench`.
//! Environment: `PROXIES` (default 1000), `PURCHASES` (10000), `SERVED_BY` (proxies serving
//! each purchase, 2), `RATE` (calls/s of each purchase on each proxy serving it, 5),
//! `REPLICAS` (3), `WARMUP_SECS` (20), `SECONDS` (60 measured), `PROXY_DIRS` (where the
//! proxies' data directories go: `/dev/shm` where there is one, see [`proxy_dirs`]).
//!
//! Besides the table it says where an exchange's time goes: the time inside the replica
//! (request head to answer head), how late the simulation's own runtime wakes a timer (the
//! proxies, the replicas and the traffic share its threads), and what the database's
//! backends were doing, sampled from `pg_stat_activity` (waiting for a row lock, for the WAL
//! flush, or idle in a transaction waiting for the replica's next statement).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use marketgate::config::Config;
use marketgate::control::ControlPlane;
use marketgate::gateway::leasing::{
    HttpLeaseService, LeaseClient, LeaseService, LeaseServiceError,
};
use marketgate::gateway::quota::QuotaMode;
use marketgate::gateway::uplink::Uplink;
use marketgate::gateway::Gateway;
use marketgate::lease::{LeaseExchange, LeaseReply};
use marketgate::shutdown::{Shutdown, ShutdownTrigger};
use serde_json::json;

#[path = "support/market.rs"]
mod market;

use market::{control_config, listed_group, Api, ADMIN_TOKEN, MARKET_TOKEN, POSTGRES_ADMIN_URL};

/// Concurrent market clients while the purchases are made.
const BUYERS: usize = 16;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Where the simulated proxies keep their data directories: `PROXY_DIRS`, else `/dev/shm`
/// where there is one. A real proxy fsyncs its lease state after every exchange on a disk of
/// its own; 1,000 simulated proxies fsyncing on the machine's one disk, the store's, would
/// queue the store's WAL flushes behind them (measured: BENCHMARKS.md, "the simulated fleet:
/// where an exchange's time goes"). On tmpfs an fsync costs nothing, as another machine's
/// disk costs the store nothing.
fn proxy_dirs() -> std::path::PathBuf {
    match std::env::var_os("PROXY_DIRS") {
        Some(dir) => dir.into(),
        None if std::path::Path::new("/dev/shm").is_dir() => "/dev/shm".into(),
        None => std::env::temp_dir(),
    }
}

fn proxy_config(dir: &std::path::Path, node: usize, urls: &[String]) -> Config {
    let list = urls
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        r#"data_dir = "{}"
[admin]
token = "{ADMIN_TOKEN}"
[gateway]
quota_journal_block = 100000
[proxy]
node_id = "sim-proxy-{node}"
control_urls = [{list}]
control_token = "{ADMIN_TOKEN}"
"#,
        dir.display()
    );
    Config::from_toml(&text, Vec::new()).expect("proxy config is valid")
}

/// The lease service with each exchange timed, as the proxy sees it.
struct Timed {
    inner: HttpLeaseService,
    took: Arc<Mutex<Vec<Duration>>>,
    failed: Arc<AtomicU64>,
}

#[async_trait::async_trait]
impl LeaseService for Timed {
    async fn exchange(&self, exchange: LeaseExchange) -> Result<LeaseReply, LeaseServiceError> {
        let started = Instant::now();
        let reply = self.inner.exchange(exchange).await;
        match &reply {
            Ok(_) => self.took.lock().unwrap().push(started.elapsed()),
            Err(_) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        reply
    }
}

async fn xact_commit(client: &tokio_postgres::Client, database: &str) -> i64 {
    client
        .query_one(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = $1",
            &[&database],
        )
        .await
        .unwrap()
        .get(0)
}

/// Takes calls from `cells` at `rate` calls/s each, spread over each second, as the handler
/// does: take; when dry and a refill may come, ask for one and try once more; note the usage.
async fn traffic(
    gateway: Gateway,
    cells: Vec<Arc<marketgate::gateway::quota::QuotaCell>>,
    rate: u64,
    served: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    shutdown: Shutdown,
) {
    const TICKS_PER_SEC: u64 = 10;
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / TICKS_PER_SEC));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.clone().wait() => return,
        }
        // `rate` calls a second in whole calls per tick, the remainders carried.
        let per_tick = (ticks + 1) * rate / TICKS_PER_SEC - ticks * rate / TICKS_PER_SEC;
        ticks += 1;
        for cell in &cells {
            for _ in 0..per_tick {
                let mut taken = cell.take().await.unwrap_or(false);
                if !taken && cell.may_refill() {
                    gateway
                        .quota()
                        .wait_for_refill(cell, Duration::from_millis(500))
                        .await;
                    taken = cell.take().await.unwrap_or(false);
                }
                if taken {
                    gateway.quota().note_usage(cell);
                    served.fetch_add(1, Ordering::Relaxed);
                } else {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Times each `POST /v1/leases` inside the replica (from the request's head read to the
/// answer's head), to tell the replica's share of an exchange from the HTTP client's.
async fn time_exchange(
    axum::extract::State(handled): axum::extract::State<Arc<Mutex<Vec<Duration>>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let exchange = request.uri().path() == "/v1/leases";
    let started = Instant::now();
    let response = next.run(request).await;
    if exchange {
        handled.lock().unwrap().push(started.elapsed());
    }
    response
}

/// How late the simulation's own runtime wakes a task due every 10 ms: what an exchange
/// waits for a worker thread of this process, whatever the store does.
async fn runtime_lag(lags: Arc<Mutex<Vec<Duration>>>, shutdown: Shutdown) {
    const PERIOD: Duration = Duration::from_millis(10);
    loop {
        let due = Instant::now() + PERIOD;
        tokio::select! {
            _ = tokio::time::sleep_until(due.into()) => {}
            _ = shutdown.clone().wait() => return,
        }
        lags.lock()
            .unwrap()
            .push(Instant::now().saturating_duration_since(due));
    }
}

/// Samples what the database's backends are doing every 20 ms (`pg_stat_activity`: state
/// and wait event), counted by kind: where the store's time goes while the fleet runs.
async fn backend_waits(
    database: String,
    counts: Arc<Mutex<HashMap<String, u64>>>,
    shutdown: Shutdown,
) {
    let Ok((client, connection)) =
        tokio_postgres::connect(POSTGRES_ADMIN_URL, tokio_postgres::NoTls).await
    else {
        return;
    };
    tokio::spawn(connection);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.clone().wait() => return,
        }
        let Ok(rows) = client
            .query(
                "SELECT coalesce(state, '-') || ' / ' || coalesce(wait_event_type, 'CPU') || ':' \
                 || coalesce(wait_event, '-') || CASE WHEN query LIKE '%FOR UPDATE%' \
                 THEN ' (ledger lock)' WHEN query LIKE 'INSERT INTO ledgers%' THEN ' (ledger write)' \
                 WHEN query = 'COMMIT' THEN ' (commit)' ELSE '' END, count(*) \
                 FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid() \
                 AND backend_type = 'client backend' GROUP BY 1",
                &[&database],
            )
            .await
        else {
            continue;
        };
        let mut counts = counts.lock().unwrap();
        for row in rows {
            *counts.entry(row.get(0)).or_default() += row.get::<_, i64>(1) as u64;
        }
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    // `cargo test --all-targets` runs this as a smoke test: a tiny fleet for a few seconds.
    let scale =
        |name: &str, bench: u64, smoke: u64| env(name, if measuring { bench } else { smoke });
    let proxies = scale("PROXIES", 1000, 4) as usize;
    let purchases = scale("PURCHASES", 10_000, 8) as usize;
    let served_by = scale("SERVED_BY", 2, 2) as usize;
    let rate = scale("RATE", 5, 5);
    let replicas = scale("REPLICAS", 3, 2) as usize;
    let warmup = Duration::from_secs(scale("WARMUP_SECS", 20, 2));
    let measured = Duration::from_secs(scale("SECONDS", 60, 3));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let Ok((admin, connection)) =
            tokio_postgres::connect(POSTGRES_ADMIN_URL, tokio_postgres::NoTls).await
        else {
            println!("PostgreSQL not reachable on 127.0.0.1:5432: fleet simulation skipped");
            return;
        };
        tokio::spawn(connection);
        let database = format!("mg_fleet_sim_{}", std::process::id());
        admin.execute(&format!("CREATE DATABASE {database}"), &[]).await.unwrap();
        let url = format!("postgres://postgres@127.0.0.1:5432/{database}");
        let config = control_config(&url, "sim");
        let (trigger, shutdown) = ShutdownTrigger::new();

        // The control replicas: market API and admin listener (lease exchanges) each.
        let handled: Arc<Mutex<Vec<Duration>>> = Arc::default();
        let mut apis = Vec::new();
        let mut admin_urls = Vec::new();
        let mut planes = Vec::new();
        for _ in 0..replicas {
            let cp = ControlPlane::open(&config).await.expect("control plane opens");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(marketgate::control::serve(listener, cp.clone(), shutdown.clone()));
            let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            admin_urls.push(format!("http://{}", admin_listener.local_addr().unwrap()));
            let router = cp
                .admin_router(cp.spawn_subscriptions(shutdown.clone()))
                .layer(axum::middleware::from_fn_with_state(
                    handled.clone(),
                    time_exchange,
                ));
            cp.spawn_lease_expiry(shutdown.clone());
            let stop = shutdown.clone();
            tokio::spawn(async move {
                axum::serve(admin_listener, router)
                    .with_graceful_shutdown(stop.wait())
                    .await
                    .unwrap()
            });
            apis.push(Arc::new(Api::new(addr)));
            planes.push(cp);
        }

        // The market: one listed group, `purchases` purchases by distinct buyers.
        let setup = Instant::now();
        let gid = Arc::new(listed_group(&apis[0], "sim", "sim.market.local").await);
        let mut buyers = Vec::new();
        for b in 0..BUYERS {
            let (api, gid) = (apis[b % replicas].clone(), gid.clone());
            buyers.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                for n in (b..purchases).step_by(BUYERS) {
                    let body = json!({"order_id": format!("sim-{n}"), "group_id": *gid,
                        "start_time": "1700000000", "expire_time": "4102444800",
                        "req_quota": "1000000000", "order_type": "1"});
                    let answer = loop {
                        let (status, answer) = api
                            .send("POST", "/v1/buyer-p/apigw/instances/sim/market/api-groups/purchase",
                                  MARKET_TOKEN, &format!("buyer-{n}"), body.clone())
                            .await;
                        match status {
                            201 => break answer,
                            // An overloaded store says so (a busy shared machine): the market
                            // retries the same order after `Retry-After`, as a market would.
                            503 => tokio::time::sleep(Duration::from_secs(1)).await,
                            _ => panic!("{status} {answer}"),
                        }
                    };
                    ids.push((n, answer["purchase_id"].as_str().unwrap().to_owned()));
                }
                ids
            }));
        }
        let mut bought = Vec::with_capacity(purchases);
        for buyer in buyers {
            bought.extend(buyer.await.unwrap());
        }
        bought.sort();
        let bought_in = setup.elapsed();

        // The fleet: proxy p serves purchases p*k .. p*k+k (mod `purchases`), k chosen so
        // that each purchase is served by `served_by` proxies.
        let snapshot = planes[0].snapshot().await;
        let per_proxy = (purchases * served_by).div_ceil(proxies).max(1);
        let by_id: HashMap<&str, &marketgate::snapshot::Purchase> =
            snapshot.purchases.iter().map(|p| (p.id.as_str(), p)).collect();
        let dirs = tempfile::tempdir_in(proxy_dirs()).unwrap();
        let took: Arc<Mutex<Vec<Duration>>> = Arc::default();
        let failed = Arc::new(AtomicU64::new(0));
        let served = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let (fleet_trigger, fleet_shutdown) = ShutdownTrigger::new();
        let mut clients = Vec::new();
        for p in 0..proxies {
            let dir = dirs.path().join(format!("p{p}"));
            std::fs::create_dir_all(&dir).unwrap();
            let config = proxy_config(&dir, p, &admin_urls);
            let gateway = Gateway::open_with_quota(&config, QuotaMode::Leased).unwrap();
            let mine: Vec<&marketgate::snapshot::Purchase> = (0..per_proxy)
                .map(|i| by_id[bought[(p * per_proxy + i) % purchases].1.as_str()])
                .collect();
            let apps: std::collections::HashSet<&str> = mine.iter().map(|m| m.app_id.as_str()).collect();
            let mut own = snapshot.clone();
            own.purchases = mine.iter().map(|m| (*m).clone()).collect();
            own.apps.retain(|a| apps.contains(a.id.as_str()));
            gateway.apply_snapshot(own).expect("the proxy takes its snapshot");
            let cells: Vec<_> = mine
                .iter()
                .map(|m| gateway.quota().get(&m.id).expect("a cell per purchase"))
                .collect();
            let uplink = Arc::new(Uplink::new(
                // Each proxy starts on another replica, as a load balancer would spread them.
                (0..replicas).map(|r| admin_urls[(p + r) % replicas].clone()).collect(),
                ADMIN_TOKEN,
                None,
            ));
            let service = Arc::new(Timed {
                inner: HttpLeaseService::new(uplink),
                took: took.clone(),
                failed: failed.clone(),
            });
            let client = Arc::new(LeaseClient::new(gateway.clone(), service));
            let runner = client.clone();
            let stop = fleet_shutdown.clone();
            tokio::spawn(async move { runner.run(stop).await });
            tokio::spawn(traffic(
                gateway,
                cells,
                rate,
                served.clone(),
                refused.clone(),
                fleet_shutdown.clone(),
            ));
            clients.push(client);
        }
        let fleet_in = setup.elapsed() - bought_in;

        // Warm up (leases granted, rates learned), then measure.
        tokio::time::sleep(warmup).await;
        took.lock().unwrap().clear();
        handled.lock().unwrap().clear();
        let lags: Arc<Mutex<Vec<Duration>>> = Arc::default();
        let waits: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        let (probe_trigger, probe_shutdown) = ShutdownTrigger::new();
        tokio::spawn(runtime_lag(lags.clone(), probe_shutdown.clone()));
        tokio::spawn(backend_waits(database.clone(), waits.clone(), probe_shutdown));
        let (served_0, refused_0, failed_0) = (
            served.load(Ordering::Relaxed),
            refused.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
        );
        let commits_0 = xact_commit(&admin, &database).await;
        let started = Instant::now();
        tokio::time::sleep(measured).await;
        let commits = xact_commit(&admin, &database).await - commits_0;
        let elapsed = started.elapsed().as_secs_f64();
        probe_trigger.fire();
        let mut exchanges = std::mem::take(&mut *took.lock().unwrap());
        exchanges.sort();
        let mut in_replica = std::mem::take(&mut *handled.lock().unwrap());
        in_replica.sort();
        let mut lags = std::mem::take(&mut *lags.lock().unwrap());
        lags.sort();
        let mut waits: Vec<(String, u64)> = waits.lock().unwrap().drain().collect();
        waits.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        let calls = served.load(Ordering::Relaxed) - served_0;
        let refusals = refused.load(Ordering::Relaxed) - refused_0;
        let failures = failed.load(Ordering::Relaxed) - failed_0;
        fleet_trigger.fire();
        let per_sec = exchanges.len() as f64 / elapsed;
        println!(
            "fleet: {proxies} proxies x {per_proxy} purchases each ({purchases} purchases, each \
             served by {served_by}), {rate} calls/s per purchase per proxy, {replicas} replicas; \
             setup: {purchases} purchases in {:.1} s, fleet up in {:.1} s; measured {elapsed:.1} s \
             after {} s of warm-up",
            bought_in.as_secs_f64(),
            fleet_in.as_secs_f64(),
            warmup.as_secs()
        );
        println!(
            "| proxies | purchases | calls/s served | refused | exchanges/s | per proxy/s | store xact_commit/s | exchange p50 ms | p99 ms | max ms | failed |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        println!(
            "| {proxies} | {purchases} | {:.0} | {refusals} | {per_sec:.0} | {:.2} | {:.0} | {:.1} | {:.1} | {:.1} | {failures} |",
            calls as f64 / elapsed,
            per_sec / proxies as f64,
            commits as f64 / elapsed,
            pct(&exchanges, 0.50).as_secs_f64() * 1e3,
            pct(&exchanges, 0.99).as_secs_f64() * 1e3,
            exchanges.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        );
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "where an exchange's time goes: in the replica (request head to answer head) p50 \
             {:.1} / p99 {:.1} / max {:.1} ms over {} exchanges; the simulation's runtime wakes \
             a 10 ms timer late by p50 {:.1} / p99 {:.1} / max {:.1} ms",
            ms(pct(&in_replica, 0.50)),
            ms(pct(&in_replica, 0.99)),
            ms(in_replica.last().copied().unwrap_or_default()),
            in_replica.len(),
            ms(pct(&lags, 0.50)),
            ms(pct(&lags, 0.99)),
            ms(lags.last().copied().unwrap_or_default()),
        );
        let samples: u64 = waits.iter().map(|(_, n)| n).sum();
        println!("store backends sampled every 20 ms (state / wait event: share of {samples} backend samples):");
        for (what, n) in &waits {
            println!("  {what}: {:.1}%", *n as f64 * 100.0 / samples.max(1) as f64);
        }
        drop(clients);
        trigger.fire();
        drop(planes);
        let _ = admin
            .execute(&format!("DROP DATABASE {database} WITH (FORCE)"), &[])
            .await;
    });
}
