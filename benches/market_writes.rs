//! Market writes: purchases per second and their latency at 100 concurrent market clients,
//! on each store (SQLite, and PostgreSQL when one answers on 127.0.0.1:5432).
//!
//! Decision it informs: whether the control plane's write path (docs/control-plane.md: a
//! follower cache per replica, one transaction per write whose statements decide conflicts)
//! keeps up with a market's write rate, what durability (fsync per acknowledged write) costs
//! on each store, and whether replicas add throughput (no global lock: the store is the
//! limit). PostgreSQL runs with 1 and with 3 replicas on one database (clients spread
//! round-robin over them). Run: `cargo bench --bench market_writes` (PURCHASES=N per client,
//! default 20).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use marketgate::config::Config;
use marketgate::control::ControlPlane;
use marketgate::shutdown::ShutdownTrigger;
use serde_json::{json, Value};

const CLIENTS: usize = 100;
const MARKET_TOKEN: &str = "bench-market-token";
const SELLER_TOKEN: &str = "bench-seller-token";
const POSTGRES_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

struct Api {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl Api {
    async fn send(
        &self,
        method: &str,
        path: &str,
        token: &str,
        domain: &str,
        body: Value,
    ) -> (u16, Value) {
        let request = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("x-auth-token", token)
            .header("x-domain-id", domain)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let response = self.client.request(request).await.unwrap();
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }
}

fn config(database_url: &str) -> Config {
    let text = format!(
        r#"instance_id = "bench"
database_url = "{database_url}"
[admin]
token = "bench-admin-token"
[log]
level = "warn"
[[control.tokens]]
token = "{MARKET_TOKEN}"
domain_id = "market"
project_id = "market"
role = "market"
[[control.tokens]]
token = "{SELLER_TOKEN}"
domain_id = "seller-d"
project_id = "seller-p"
role = "tenant"
"#
    );
    Config::from_toml(&text, Vec::new()).expect("bench config is valid")
}

/// A seller group with one sellable API, listed on the market: its id.
async fn listed_group(api: &Api) -> String {
    let v2 = "/v2/seller-p/apigw/instances/bench";
    let (s, group) = api
        .send(
            "POST",
            &format!("{v2}/api-groups"),
            SELLER_TOKEN,
            "seller-d",
            json!({"name": "bench_group"}),
        )
        .await;
    assert_eq!(s, 201, "{group}");
    let gid = group["id"].as_str().unwrap().to_owned();
    let (s, created) = api
        .send(
            "POST",
            &format!("{v2}/apis"),
            SELLER_TOKEN,
            "seller-d",
            json!({
            "group_id": gid, "name": "bench_api", "type": 1, "req_protocol": "HTTP",
            "req_method": "GET", "req_uri": "/x", "auth_type": "APP", "backend_type": "MOCK",
            "mock_info": {"result_content": "ok"}}),
        )
        .await;
    assert_eq!(s, 201, "{created}");
    let (s, published) = api
        .send("POST", &format!("{v2}/apis/action"), SELLER_TOKEN, "seller-d", json!({
            "action": "online", "env_id": "DEFAULT_ENVIRONMENT_RELEASE_ID", "api_id": created["id"]}))
        .await;
    assert_eq!(s, 201, "{published}");
    let (s, listed) = api
        .send(
            "PUT",
            &format!("/v1/seller-p/apigw/instances/bench/market/api-groups/onsell/{gid}"),
            MARKET_TOKEN,
            "seller-d",
            json!({"url_domain": "bench.market.local"}),
        )
        .await;
    assert_eq!(s, 201, "{listed}");
    gid
}

async fn run(store: &str, database_url: &str, per_client: usize, replicas: usize) {
    let config = config(database_url);
    let (trigger, shutdown) = ShutdownTrigger::new();
    let mut apis = Vec::new();
    for _ in 0..replicas {
        let cp = ControlPlane::open(&config)
            .await
            .expect("control plane opens");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(marketgate::control::serve(listener, cp, shutdown.clone()));
        apis.push(Arc::new(Api {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: format!("http://{addr}"),
        }));
    }
    let gid = Arc::new(listed_group(&apis[0]).await);

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
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "| {store} | {replicas} | {} | {:.0} | {:.1} | {:.1} | {:.1} |",
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
        println!("| store | replicas | purchases | purchases/s | p50 ms | p99 ms | max ms |");
        println!("|---|---|---|---|---|---|---|");
        let dir = tempfile::tempdir().unwrap();
        let sqlite = format!("sqlite://{}", dir.path().join("bench.db").display());
        run("SQLite (WAL, synchronous=FULL)", &sqlite, per_client, 1).await;
        match tokio_postgres::connect(POSTGRES_ADMIN_URL, tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                for replicas in [1, 3] {
                    let name = format!("mg_bench_{}_{replicas}", std::process::id());
                    client
                        .execute(&format!("CREATE DATABASE {name}"), &[])
                        .await
                        .unwrap();
                    let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
                    let store = "PostgreSQL 15 (local, default fsync)";
                    run(store, &url, per_client, replicas).await;
                    let _ = client
                        .execute(&format!("DROP DATABASE {name} WITH (FORCE)"), &[])
                        .await;
                }
            }
            Err(_) => println!("PostgreSQL not reachable on 127.0.0.1:5432: skipped"),
        }
    });
}
