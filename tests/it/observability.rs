//! What an operator reads is true: `marketgate serve` as a real process, its JSON log read
//! back. The access log's `quota_left` and `/v1/usage`'s `left` are the purchase's calls left,
//! equal to the buyer's view, and the proxy's lease balance has its own name (`lease_left`).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;

use crate::support::control::{
    bought_group, config_toml, market_base, Api, Auth, BUYER_DOMAIN, BUYER_PROJECT, MARKET_TOKEN,
};
use crate::support::gateway::{admin_get, request, signed_as, Backend, Buyer, ADMIN_TOKEN};
use crate::support::process::Process;

const DOMAIN: &str = "left.example.com";
const READY: &str = "marketgate serve: both planes listening";
/// How long the purchase may take to reach the data plane, or a usage report the ledger.
const WITHIN: Duration = Duration::from_secs(10);
/// Calls bought; several times the smallest lease, so that a lease balance and the
/// purchase's calls left differ.
const BOUGHT: u64 = 100;
/// Calls made after the first one answered.
const MORE_CALLS: u64 = 4;

fn write_config(dir: &Path) -> std::path::PathBuf {
    let db = dir.join("marketgate.db");
    let toml = format!(
        "data_dir = '{}'\n{}[gateway]\nlisten = '127.0.0.1:0'\n",
        dir.display(),
        config_toml(&format!("sqlite://{}", db.display()), "127.0.0.1:0").replace(
            "token = \"admin-token\"",
            &format!("token = \"{ADMIN_TOKEN}\"")
        ),
    );
    let path = dir.join("serve.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

async fn call(buyers: SocketAddr, key: &str, secret: &str) -> u16 {
    Buyer::new(buyers)
        .send(signed_as(
            key,
            secret,
            request("GET", DOMAIN, "/call", Bytes::new()),
        ))
        .await
        .status
        .as_u16()
}

/// The access log's records of answered calls of `purchase_id`, in order.
fn served_lines(serve: &Process, purchase_id: &str) -> Vec<Value> {
    serve
        .records()
        .into_iter()
        .filter(|r| r["target"] == "access")
        .map(|r| r["fields"].clone())
        .filter(|f| f["purchase_id"] == purchase_id && f["status"] == 200)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_left_in_the_log_and_usage_are_the_purchases_under_leases() {
    let backend = Backend::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let serve = Process::start("serve", &write_config(dir.path()), READY).await;
    let (buyers, control, admin) = (
        serve.addr("buyers"),
        serve.addr("control"),
        serve.addr("admin"),
    );
    let bought = bought_group(control, backend.addr, DOMAIN, BOUGHT).await;

    // The first call answered once the purchase reached the data plane (refusals take none).
    let deadline = Instant::now() + WITHIN;
    while call(buyers, &bought.key, &bought.secret).await != 200 {
        assert!(
            Instant::now() < deadline,
            "the purchase never reached the data plane"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..MORE_CALLS {
        assert_eq!(call(buyers, &bought.key, &bought.secret).await, 200);
    }
    let made = 1 + MORE_CALLS;

    // Each answered call's line says the purchase's calls left after it.
    let deadline = Instant::now() + WITHIN;
    let lines = loop {
        let lines = served_lines(&serve, &bought.purchase_id);
        if lines.len() as u64 == made {
            break lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} access lines of {made}",
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let logged: Vec<Option<u64>> = lines.iter().map(|l| l["quota_left"].as_u64()).collect();
    let expected: Vec<Option<u64>> = (1..=made).map(|n| Some(BOUGHT - n)).collect();
    assert_eq!(logged, expected, "quota_left per call: {lines:#?}");
    let last = lines.last().unwrap();
    let lease_left = last["lease_left"]
        .as_u64()
        .expect("a leased call logs lease_left");
    assert!(
        lease_left < BOUGHT - made,
        "the lease balance is its own number: {last}"
    );

    // The buyer's view, once the usage reached the ledger, says the same.
    let market = Api::new(control, Auth::Token(MARKET_TOKEN.into())).as_domain(BUYER_DOMAIN);
    let view_path = format!(
        "{}/purchases/{}",
        market_base(BUYER_PROJECT),
        bought.purchase_id
    );
    let deadline = Instant::now() + WITHIN;
    let view = loop {
        let (status, view) = market.get(&view_path).await;
        assert_eq!(status, 200, "{view}");
        if view["quota_used"].as_u64() == Some(made) {
            break view;
        }
        assert!(
            Instant::now() < deadline,
            "the ledger never saw {made} calls: {view}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(view["quota_left"].as_u64(), Some(BOUGHT - made), "{view}");

    let usage = admin_get(admin, "/v1/usage", true).await.json();
    let mine = usage["purchases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["purchase_id"] == bought.purchase_id.as_str())
        .unwrap_or_else(|| panic!("no usage for the purchase: {usage}"))
        .clone();
    assert_eq!(mine["left"], view["quota_left"], "{mine} against {view}");
    // The lease may have been refilled since the last call: its own number, within the rest.
    let lease_now = mine["lease_left"]
        .as_u64()
        .expect("a leased purchase has lease_left");
    assert!(lease_now <= BOUGHT - made, "{mine}");
    assert_eq!(mine["leased"], true, "{mine}");
}
