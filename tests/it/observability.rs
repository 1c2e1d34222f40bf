//! What an operator reads is true: `marketgate serve` as a real process, its JSON log read
//! back. The access log's `quota_left` and `/v1/usage`'s `left` are the purchase's calls left,
//! equal to the buyer's view, and the proxy's lease balance has its own name (`lease_left`);
//! every market and management request leaves one access line and a count by route.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};

use crate::support::control::{
    bought_group, config_toml, market_base, mgmt, write_serve_config, Api, Auth, BUYER_DOMAIN,
    BUYER_PROJECT, MARKET_TOKEN, SELLER_PROJECT, SELLER_TOKEN,
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
    let serve = Process::start(
        "serve",
        &write_serve_config(dir.path(), dir.path(), ""),
        READY,
    )
    .await;
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
    // The group is named in the log line, and by marketgate_group_info for its metrics.
    assert_eq!(last["group_name"], "shared_group", "{last}");
    let metrics = admin_get(admin, "/metrics", true).await;
    let info = format!(
        "marketgate_group_info{{group=\"{}\",name=\"shared_group\"}} 1",
        last["group_id"].as_str().unwrap()
    );
    assert!(
        String::from_utf8_lossy(&metrics.body).contains(&info),
        "{info} is not in /metrics"
    );
    let lease_left = last["lease_left"]
        .as_u64()
        .expect("a leased call logs lease_left");
    assert!(
        lease_left < BOUGHT - made,
        "the lease balance is its own number: {last}"
    );

    // The buyer's view says the same, read once: in one process every call answered is in
    // the ledger a read sees (docs/quota-leases.md, "When a call shows in the ledger").
    let market = Api::new(control, Auth::Token(MARKET_TOKEN.into())).as_domain(BUYER_DOMAIN);
    let view_path = format!(
        "{}/purchases/{}",
        market_base(BUYER_PROJECT),
        bought.purchase_id
    );
    let (status, view) = market.get(&view_path).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["quota_used"].as_u64(), Some(made), "{view}");
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

    // A refused caller's line names the rule that failed and the key it used, no secret.
    // (Counted from here: a call made before the purchase reached the data plane may have
    // been refused 401 too.)
    let refused_lines = || -> Vec<Value> {
        serve
            .records()
            .into_iter()
            .filter(|r| r["target"] == "access" && r["fields"]["status"] == 401)
            .map(|r| r["fields"].clone())
            .collect()
    };
    let before = refused_lines().len();
    assert_eq!(call(buyers, &bought.key, "not-the-secret").await, 401);
    assert_eq!(call(buyers, "no-such-key", "whatever-secret").await, 401);
    let deadline = Instant::now() + WITHIN;
    let refused = loop {
        let refused = refused_lines().split_off(before);
        if refused.len() == 2 {
            break refused;
        }
        assert!(Instant::now() < deadline, "{} refused lines", refused.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let rules: Vec<(&str, &str)> = refused
        .iter()
        .map(|l| {
            (
                l["app_key"].as_str().unwrap_or(""),
                l["auth_rule"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        rules,
        vec![
            (bought.key.as_str(), "the signature does not match"),
            ("no-such-key", "unknown app key"),
        ],
        "{refused:#?}"
    );
    let logged = format!("{:?}", serve.records());
    assert!(!logged.contains(&bought.secret) && !logged.contains("not-the-secret"));
}

/// `marketgate serve` is one process: the buyer's view (the market's row 12, one purchase or
/// the list) read right after a call's answer shows that call, every time. (Before, the lease
/// client reported it after the answer: up to about 20 ms later in a debug build at load 5-10,
/// and README's quickstart, on a busier machine, read 0 calls used.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_is_in_the_buyers_view_as_soon_as_it_is_answered() {
    /// Calls made, each followed at once by a read of the view.
    const CALLS: u64 = 40;
    let backend = Backend::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let serve = Process::start(
        "serve",
        &write_serve_config(dir.path(), dir.path(), ""),
        READY,
    )
    .await;
    let (buyers, control) = (serve.addr("buyers"), serve.addr("control"));
    let bought = bought_group(control, backend.addr, DOMAIN, BOUGHT).await;
    let market = Api::new(control, Auth::Token(MARKET_TOKEN.into())).as_domain(BUYER_DOMAIN);
    let one = format!(
        "{}/purchases/{}",
        market_base(BUYER_PROJECT),
        bought.purchase_id
    );
    let list = format!(
        "{}/purchases?group_id={}",
        market_base(BUYER_PROJECT),
        bought.group_id
    );

    // The purchase's first call, once the purchase reached the data plane (refusals take
    // none): the quickstart's case, a call that waited for the purchase's first lease.
    let deadline = Instant::now() + WITHIN;
    while call(buyers, &bought.key, &bought.secret).await != 200 {
        assert!(
            Instant::now() < deadline,
            "the purchase never reached the data plane"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for made in 1..=CALLS {
        if made > 1 {
            assert_eq!(call(buyers, &bought.key, &bought.secret).await, 200);
        }
        // Alternately the purchase and the list it is in, with nothing in between.
        let (status, view) = if made % 2 == 1 {
            market.get(&one).await
        } else {
            let (status, page) = market.get(&list).await;
            (status, page["purchases"][0].clone())
        };
        assert_eq!(status, 200, "{view}");
        assert_eq!(
            (view["quota_used"].as_u64(), view["quota_left"].as_u64()),
            (Some(made), Some(BOUGHT - made)),
            "read right after call {made} was answered: {view}"
        );
    }
}

/// The access log records of the control plane's market and management API.
fn control_lines(process: &Process) -> Vec<Value> {
    process
        .records()
        .into_iter()
        .filter(|r| r["target"] == "control_access")
        .map(|r| r["fields"].clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_control_request_leaves_one_access_line_and_a_metric() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("marketgate.db");
    let config = dir.path().join("control.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = '{}'\n{}",
            dir.path().display(),
            config_toml(&format!("sqlite://{}", db.display()), "127.0.0.1:0").replace(
                "token = \"admin-token\"",
                &format!("token = \"{ADMIN_TOKEN}\"")
            )
        ),
    )
    .unwrap();
    let control = Process::start("control", &config, "control plane listening").await;
    let (addr, admin) = (control.addr("listen"), control.addr("admin"));

    let seller = Api::new(addr, Auth::Token(SELLER_TOKEN.into()));
    let groups = format!("{}/api-groups", mgmt(SELLER_PROJECT));
    let short = seller.post(&groups, json!({"name": "ab"})).await;
    assert_eq!(short.0, 400, "{}", short.1);
    let created = seller
        .post(&groups, json!({"name": "observed_group"}))
        .await;
    assert_eq!(created.0, 201, "{}", created.1);
    let stranger = Api::new(addr, Auth::Token("no-such-token".into()));
    assert_eq!(stranger.get(&groups).await.0, 401);
    assert_eq!(seller.get("/v2/nowhere").await.0, 404);

    let deadline = Instant::now() + WITHIN;
    let lines = loop {
        let lines = control_lines(&control);
        if lines.len() >= 4 {
            break lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} control access lines: {lines:#?}",
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(lines.len(), 4, "one line per request: {lines:#?}");
    let template = "/v2/{project_id}/apigw/instances/{instance_id}/api-groups";
    let summary: Vec<(String, String, u64, Option<String>)> = lines
        .iter()
        .map(|l| {
            (
                l["method"].as_str().unwrap().to_owned(),
                l["route"].as_str().unwrap().to_owned(),
                l["status"].as_u64().unwrap(),
                l["error_code"].as_str().map(str::to_owned),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                "POST".into(),
                template.into(),
                400,
                Some("APIG.2012".into())
            ),
            ("POST".into(), template.into(), 201, None),
            ("GET".into(), template.into(), 401, Some("APIG.1002".into())),
            (
                "GET".into(),
                "unmatched".into(),
                404,
                Some("APIG.0101".into())
            ),
        ],
        "{lines:#?}"
    );
    for line in &lines {
        assert!(line["duration_ms"].as_f64().is_some(), "{line}");
        assert!(!line["request_id"].as_str().unwrap().is_empty(), "{line}");
    }
    assert!(
        lines[0]["error"].as_str().unwrap().contains("name"),
        "the 4xx says what was wrong: {}",
        lines[0]
    );
    let logged = format!("{lines:?}");
    assert!(
        !logged.contains("no-such-token"),
        "a credential reached the log"
    );

    let metrics =
        String::from_utf8(admin_get(admin, "/metrics", true).await.body.to_vec()).unwrap();
    for series in [
        format!("marketgate_control_requests_total{{method=\"POST\",route=\"{template}\",status=\"400\"}} 1"),
        format!("marketgate_control_requests_total{{method=\"POST\",route=\"{template}\",status=\"201\"}} 1"),
        format!("marketgate_control_requests_total{{method=\"GET\",route=\"{template}\",status=\"401\"}} 1"),
        "marketgate_control_requests_total{method=\"GET\",route=\"unmatched\",status=\"404\"} 1".to_owned(),
        format!("marketgate_control_request_duration_seconds_count{{method=\"POST\",route=\"{template}\"}} 2"),
    ] {
        assert!(metrics.contains(&series), "no {series} in\n{metrics}");
    }
}
