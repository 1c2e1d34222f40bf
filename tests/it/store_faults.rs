//! Store faults are clear and bounded (PostgreSQL): a control plane whose store is stalled by
//! a held row lock, or unreachable (its database closed to connections and every session of
//! it terminated), answers 503 with `Retry-After` and a retryable APIG body within its
//! timeouts, never 500 and never a hang; `/readyz` says so; nothing is half-written; and it
//! recovers by itself once the store is back. Uses its own test database only: the shared
//! PostgreSQL server is never stopped. Skipped, saying so, without PostgreSQL.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tower::ServiceExt;

use crate::support::control::{
    bought_group, holding_locks, mgmt, Api, Backend, Control, POSTGRES_ADMIN_URL, SELLER_PROJECT,
    SELLER_TOKEN,
};

/// The store limits under test, in milliseconds: small, so that the test is quick.
const LOCK_TIMEOUT_MS: u64 = 300;
const STATEMENT_TIMEOUT_MS: u64 = 1_000;
const POOL_WAIT_MS: u64 = 500;
/// The longest any answer may take while the store is stalled or gone: the store's own
/// bound (pool wait + two statement timeouts) plus scheduling slack on a busy machine.
const ANSWER_WITHIN: Duration =
    Duration::from_millis(POOL_WAIT_MS + 2 * STATEMENT_TIMEOUT_MS + 1_500);
/// How long recovery may take once the store is back.
const RECOVER_WITHIN: Duration = Duration::from_secs(15);

async fn admin_client() -> tokio_postgres::Client {
    let url = std::env::var("MARKETGATE_TEST_POSTGRES").unwrap_or(POSTGRES_ADMIN_URL.into());
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("postgres connects");
    tokio::spawn(conn);
    client
}

fn database_name(url: &str) -> String {
    url.rsplit('/').next().unwrap().to_owned()
}

/// A write (create a group), timed; asserts the store's 503 and returns how long it took.
async fn refused_write(seller: &Api, name: &str) -> Duration {
    let started = Instant::now();
    let (status, body, headers) = seller
        .send_full(
            "POST",
            &format!("{}/api-groups", mgmt(SELLER_PROJECT)),
            Some(json!({"name": name})),
        )
        .await;
    let took = started.elapsed();
    assert_eq!(status, 503, "{body}");
    retryable(&body, &headers);
    took
}

fn retryable(body: &Value, headers: &http::HeaderMap) {
    assert_eq!(body["error_code"], "APIG.9999", "{body}");
    assert!(
        body["error_msg"].as_str().unwrap().contains("retry"),
        "the body says to retry: {body}"
    );
    assert!(headers.contains_key("retry-after"), "Retry-After is sent");
}

async fn readyz(control: &Control) -> u16 {
    let subscriptions = control
        .cp
        .spawn_subscriptions(marketgate::shutdown::Shutdown::never());
    let router = control.cp.admin_router(subscriptions);
    let request = http::Request::get("/readyz")
        .body(axum::body::Body::empty())
        .unwrap();
    router.oneshot(request).await.unwrap().status().as_u16()
}

async fn groups(seller: &Api) -> (u16, Value) {
    seller
        .get(&format!("{}/api-groups", mgmt(SELLER_PROJECT)))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_faults_answer_503_within_the_timeouts_and_recover() {
    let Some(backend) = Backend::all()
        .await
        .into_iter()
        .find(|b| matches!(b, Backend::Postgres))
    else {
        return;
    };
    let control = Control::start_with(
        &backend,
        &format!(
            "store_lock_timeout_ms = {LOCK_TIMEOUT_MS}\n\
             store_statement_timeout_ms = {STATEMENT_TIMEOUT_MS}\n\
             store_pool_wait_ms = {POOL_WAIT_MS}"
        ),
    )
    .await;
    let seller = control.client(SELLER_TOKEN);
    let (status, _) = seller
        .post(
            &format!("{}/api-groups", mgmt(SELLER_PROJECT)),
            json!({"name": "before_faults"}),
        )
        .await;
    assert_eq!(status, 201);
    let (_, before) = groups(&seller).await;

    // 1. A stalled store: another session holds a lock every versioned commit needs (its
    // last statement inserts into `versions`).
    let name = database_name(&control.database_url);
    let holder = holding_locks(&control.database_url, "LOCK TABLE versions IN SHARE MODE").await;
    let took = refused_write(&seller, "while_locked").await;
    assert!(took < ANSWER_WITHIN, "answered in {took:?}");
    // Reads and the readiness check do not wait for row locks.
    assert_eq!(groups(&seller).await, (200, before.clone()));
    assert_eq!(readyz(&control).await, 200);
    holder.batch_execute("ROLLBACK").await.unwrap();
    let (status, _) = seller
        .post(
            &format!("{}/api-groups", mgmt(SELLER_PROJECT)),
            json!({"name": "while_locked"}),
        )
        .await;
    assert_eq!(status, 201, "the same write, once the lock is gone");
    let (_, before) = groups(&seller).await;

    // 2. An unreachable store: its database refuses connections, its sessions are ended.
    let admin = admin_client().await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {name} ALLOW_CONNECTIONS false; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
        ))
        .await
        .unwrap();
    let took = refused_write(&seller, "while_down").await;
    assert!(took < ANSWER_WITHIN, "answered in {took:?}");
    let started = Instant::now();
    let (status, body, headers) = seller
        .send_full("GET", &format!("{}/api-groups", mgmt(SELLER_PROJECT)), None)
        .await;
    assert!(started.elapsed() < ANSWER_WITHIN);
    assert_eq!(status, 503, "a read that cannot catch up says so: {body}");
    retryable(&body, &headers);
    assert_eq!(readyz(&control).await, 503);

    // 3. Back: recovery without a restart, and nothing of the refused writes was written.
    admin
        .batch_execute(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
        .await
        .unwrap();
    let deadline = Instant::now() + RECOVER_WITHIN;
    while readyz(&control).await != 200 {
        assert!(Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(groups(&seller).await, (200, before));
    let (status, _) = seller
        .post(
            &format!("{}/api-groups", mgmt(SELLER_PROJECT)),
            json!({"name": "after_faults"}),
        )
        .await;
    assert_eq!(status, 201, "writes work again");
}

/// A lease exchange whose ledger row another session holds locked answers "unavailable"
/// within the lock timeout, and its hand-begun transaction (`BEGIN` pipelined with the row
/// lock) ends with it: with ONE pooled connection, the exchanges after it succeed (a
/// connection handed back inside its aborted transaction would fail every later statement)
/// and the ledger holds exactly what they granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_faults_a_stalled_lease_exchange_leaves_its_connection_clean() {
    let backends = Backend::all().await;
    let Some(backend) = backends.iter().find(|b| matches!(b, Backend::Postgres)) else {
        println!("PostgreSQL not reachable: skipped");
        return;
    };
    let control = Control::start_with(
        backend,
        &format!("store_lock_timeout_ms = {LOCK_TIMEOUT_MS}\nstore_pool_size = 1"),
    )
    .await;
    // The purchase's backend is never called: leases only.
    let unused = "127.0.0.1:9".parse().unwrap();
    let bought = bought_group(control.addr, unused, "stall.market.local", 1_000).await;
    let want = |calls: u64| {
        serde_json::from_value::<marketgate::lease::LeaseExchange>(json!({
            "node_id": "stalled-proxy",
            "wants": [{"purchase_id": bought.purchase_id, "calls": calls}],
        }))
        .unwrap()
    };
    let mut granted = 0;
    let first = control
        .cp
        .exchange_leases(want(100))
        .await
        .expect("a first exchange");
    granted += first.grants[0].granted;

    let holder = holding_locks(
        &control.database_url,
        &format!(
            "SELECT doc FROM ledgers WHERE purchase_id = '{}' FOR UPDATE",
            bought.purchase_id
        ),
    )
    .await;
    let started = Instant::now();
    let stalled = control.cp.exchange_leases(want(100)).await;
    assert!(
        matches!(
            stalled,
            Err(marketgate::control::ControlError::StoreUnavailable(_))
        ),
        "{stalled:?}"
    );
    assert!(started.elapsed() < ANSWER_WITHIN, "{:?}", started.elapsed());
    holder.batch_execute("ROLLBACK").await.unwrap();

    for _ in 0..3 {
        let reply = control
            .cp
            .exchange_leases(want(10))
            .await
            .expect("an exchange after the stall, on the same connection");
        granted += reply.grants[0].granted;
    }
    let ledger = control.cp.ledger(&bought.purchase_id).await.unwrap();
    assert!(
        granted > 100,
        "the exchanges after the stall were granted calls"
    );
    assert_eq!(ledger.leases["stalled-proxy"].held, granted);
    assert!(ledger.used + granted <= 1_000);
}
