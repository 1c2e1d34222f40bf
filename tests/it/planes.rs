//! The two planes over real sockets: three proxies subscribe to the control plane (no
//! control-plane config names them) and are sent snapshots (full or delta); what the market
//! does is what every proxy decides, within a second.

use std::io::Write as _;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::gateway::{self as gw, admin_get, Backend, TestGateway};
use crate::support::planes::*;

#[tokio::test]
async fn planes_every_proxy_reaches_the_control_version() {
    let planes = Planes::start(3).await;
    // A fresh store starts at version 1, so that even an empty market is a valid snapshot.
    let empty = planes.converged().await;
    assert!(empty >= 1, "first version {empty}");
    for proxy in &planes.proxies {
        assert!(proxy.gateway.is_ready(), "{} is ready", proxy.node);
    }
    planes.small_change("first_change").await;
    let changed = planes.converged().await;
    assert!(changed > empty);
    for proxy in &planes.proxies {
        let snapshot = proxy.gateway.wire_snapshot().unwrap();
        assert_eq!(snapshot.version, changed);
        assert!(
            snapshot.groups.iter().any(|g| g.name == "first_change"),
            "{} has the change",
            proxy.node
        );
    }
}

#[tokio::test]
async fn planes_purchase_is_served_by_every_proxy_and_delist_refused_within_a_second() {
    let planes = Planes::start(3).await;
    let gid = planes.listed_group("shop", "shop.example.com").await;
    let (key, secret) = planes.buy(&gid, "order-1", 1000).await;
    planes.converged().await;
    for proxy in &planes.proxies {
        let answer = call(&proxy.buyer(), "shop.example.com", &key, &secret).await;
        assert_eq!(answer.status, 200, "{}: {:?}", proxy.node, answer.body);
        assert_eq!(&answer.body[..], b"mocked");
    }

    let pollers: Vec<_> = planes
        .proxies
        .iter()
        .map(|p| {
            tokio::spawn(first_refusal(
                p.buyer(),
                "shop.example.com".into(),
                key.clone(),
                secret.clone(),
            ))
        })
        .collect();
    planes.delist(&gid).await;
    let answered = Instant::now();
    for (proxy, poller) in planes.proxies.iter().zip(pollers) {
        let refused = poller.await.unwrap();
        let after = refused.saturating_duration_since(answered);
        eprintln!("{}: delist refused {after:?} after the 204", proxy.node);
        assert!(
            after < Duration::from_secs(1),
            "{}: refused only {after:?} after the delist's 2xx",
            proxy.node
        );
    }
}

#[tokio::test]
async fn planes_deltas_when_current_and_full_snapshots_after_a_restart() {
    let mut planes = Planes::start(3).await;
    planes.converged().await;
    let metrics = planes.cp.subscription_metrics();
    let (deltas, fulls) = (metrics.sent("delta"), metrics.sent("full"));
    assert!(fulls >= 3, "the first snapshot to each proxy is full");

    // Proxies that hold the previous version get a delta.
    planes.small_change("delta_1").await;
    planes.converged().await;
    assert!(
        metrics.sent("delta") >= deltas + 3,
        "one delta per proxy: {} -> {}",
        deltas,
        metrics.sent("delta")
    );
    assert_eq!(
        metrics.sent("full"),
        fulls,
        "no full snapshot while current"
    );

    // A proxy restarted on an empty data dir, with no change since: it asks, and is sent
    // the full snapshot.
    let proxy = planes.proxies.remove(1);
    let restarted = proxy.restart_empty().await;
    planes.proxies.insert(1, restarted);
    planes.converged().await;
    assert!(metrics.sent("full") > fulls, "the empty proxy got it full");
}

#[tokio::test]
async fn planes_a_proxy_serving_other_content_is_seen_and_resynced() {
    let planes = Planes::start(2).await;
    let version = planes.converged().await;
    // Proxy 1 is made to serve, at the next version, other content than the control plane
    // will (as a delta applied on a wrong base would).
    let mut other = (*planes.proxies[0].gateway.wire_snapshot().unwrap()).clone();
    other.version = version + 1;
    other.groups.push(marketgate::snapshot::Group {
        id: "not-on-the-control-plane".into(),
        name: "ghost".into(),
        sl_domain: "ghost.sl.example.com".into(),
        url_domain: None,
        market_state: marketgate::snapshot::MarketState::Unlisted,
        apis: Vec::new(),
    });
    planes.proxies[0].gateway.apply_snapshot(other).unwrap();
    let mismatches = planes.cp.subscription_metrics().mismatches();
    planes.small_change("next").await;
    // Converged means: every proxy acked the version with the control plane's content hash.
    planes.converged().await;
    assert!(planes.cp.subscription_metrics().mismatches() > mismatches);
    let wire = planes.proxies[0].gateway.wire_snapshot().unwrap();
    assert!(wire.groups.iter().all(|g| g.name != "ghost"), "resynced");
    let (_, body) = admin_call(planes.admin, "GET", "/v1/proxies", None, WITH_TOKEN).await;
    let shown = body["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node_id"] == "proxy-1")
        .cloned()
        .unwrap();
    assert!(shown["resyncs"].as_u64().unwrap() >= 1, "{shown}");
    assert_eq!(shown["content"], "match", "{shown}");
}

#[tokio::test]
async fn planes_control_admin_shows_acked_versions_per_proxy() {
    let planes = Planes::start(3).await;
    planes.small_change("acked").await;
    let version = planes.converged().await;
    let (status, body) = admin_call(planes.admin, "GET", "/v1/proxies", None, WITH_TOKEN).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], version);
    let proxies = body["proxies"].as_array().unwrap().clone();
    assert_eq!(proxies.len(), 3, "{body}");
    for (proxy, status) in planes.proxies.iter().zip(&proxies) {
        assert_eq!(status["node_id"], proxy.node.as_str());
        assert_eq!(status["acked_version"], version);
        assert_eq!(status["content"], "match");
        assert_eq!(status["content_hash"], body["hash"]);
        assert_eq!(status["lag_versions"], 0);
        assert!(status["incarnation"]
            .as_str()
            .is_some_and(|i| !i.is_empty()));
        assert!(status["last_seen"].as_str().unwrap().ends_with('Z'));
        assert!(status["last_error"].is_null());
        assert_eq!(status["calls_held"], 0, "no purchase: no leases");
    }

    let (status, body) = admin_call(planes.admin, "GET", "/v1/proxies", None, &[]).await;
    assert_eq!(
        (status, body["error_code"].as_str()),
        (401, Some("APIG.1002"))
    );
    let (status, body) = admin_call(
        planes.admin,
        "GET",
        "/v1/snapshot/version",
        None,
        &[("x-admin-token", "test-admin-token")],
    )
    .await;
    assert_eq!((status, body), (200, json!({ "version": version })));

    let (status, text) = admin_call(planes.admin, "GET", "/metrics", None, WITH_TOKEN).await;
    assert_eq!(status, 200);
    let text = text.as_str().unwrap().to_owned();
    assert!(
        text.contains(&format!("marketgate_control_snapshot_version {version}")),
        "{text}"
    );
    for proxy in &planes.proxies {
        let line = format!(
            "marketgate_proxy_acked_version{{proxy=\"{}\"}} {version}",
            proxy.node
        );
        assert!(text.contains(&line), "{line} in\n{text}");
    }
    assert!(text.contains("marketgate_control_snapshots_sent_total{kind=\"delta\"}"));
    assert!(text.contains("marketgate_control_proxies 3"), "{text}");
    assert!(
        text.contains("# TYPE marketgate_quota_calls_left gauge"),
        "{text}"
    );
    let (status, _) = admin_call(planes.admin, "GET", "/metrics", None, &[]).await;
    assert_eq!(
        status, 401,
        "metrics need the token unless admin.metrics_public"
    );
    assert_eq!(
        admin_call(planes.admin, "GET", "/healthz", None, &[])
            .await
            .0,
        200
    );
    assert_eq!(
        admin_call(planes.admin, "GET", "/readyz", None, &[])
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn planes_control_admin_exchanges_and_releases_leases() {
    let planes = Planes::start(0).await;
    let gid = planes.listed_group("leased", "leased.example.com").await;
    planes.buy(&gid, "order-l", 100).await;
    let purchase = planes.cp.snapshot().await.purchases[0].id.clone();

    let exchange = json!({"node_id": "edge-1", "wants": [{"purchase_id": purchase, "calls": 30}]});
    let (status, reply) = admin_call(
        planes.admin,
        "POST",
        "/v1/leases",
        Some(serde_json::to_vec(&exchange).unwrap()),
        WITH_TOKEN,
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let grant = &reply["grants"][0];
    assert_eq!(grant["purchase_id"], purchase.as_str());
    assert_eq!(grant["held"], 30);
    assert_eq!(grant["unleased"], 70);
    let (_, body) = admin_call(planes.admin, "GET", "/v1/proxies", None, WITH_TOKEN).await;
    assert_eq!(
        body["leases"],
        json!([{"node_id": "edge-1", "purchases": 1, "calls_held": 30}])
    );

    let (status, text) = admin_call(planes.admin, "GET", "/metrics", None, WITH_TOKEN).await;
    assert_eq!(status, 200);
    let line = format!("marketgate_quota_calls_left{{purchase=\"{purchase}\"}} 100");
    assert!(text.as_str().unwrap().contains(&line), "{line} in {text}");

    let bad = json!({"node_id": "edge-1", "wants": [{"purchase_id": purchase, "calls": "x"}]});
    let (status, body) = admin_call(
        planes.admin,
        "POST",
        "/v1/leases",
        Some(serde_json::to_vec(&bad).unwrap()),
        WITH_TOKEN,
    )
    .await;
    assert_eq!(
        (status, body["error_code"].as_str()),
        (400, Some("APIG.2000"))
    );
    assert!(
        body["error_msg"]
            .as_str()
            .unwrap()
            .contains("wants[0].calls"),
        "the bad field is named: {body}"
    );
    let (status, _) = admin_call(
        planes.admin,
        "POST",
        "/v1/leases",
        Some(serde_json::to_vec(&exchange).unwrap()),
        &[],
    )
    .await;
    assert_eq!(status, 401);

    let (status, body) = admin_call(
        planes.admin,
        "POST",
        "/v1/leases/release",
        Some(br#"{"node_id":"edge-1"}"#.to_vec()),
        WITH_TOKEN,
    )
    .await;
    assert_eq!(
        (status, body),
        (200, json!({"node_id": "edge-1", "released": 30}))
    );
    let (status, body) = admin_call(
        planes.admin,
        "POST",
        "/v1/leases/release",
        Some(br#"{"node":"edge-1"}"#.to_vec()),
        WITH_TOKEN,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error_msg"].as_str().unwrap().contains("node"),
        "{body}"
    );
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn push_counter(text: &str, result: &str) -> u64 {
    let prefix = format!("marketgate_snapshot_push_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
}

#[tokio::test]
async fn planes_patch_applies_a_delta_and_refuses_a_wrong_base() {
    let backend = Backend::echo().await;
    let proxy = TestGateway::start().await;
    let v1 = gw::market(1, backend.addr, Some(10));
    let mut v2 = v1.clone();
    v2.version = 2;
    v2.groups[0].market_state = marketgate::snapshot::MarketState::Delisted;
    let delta = marketgate::snapshot::delta::diff(&v1, &v2);
    let patch = |body: Vec<u8>, gzipped: bool| {
        let admin = proxy.admin;
        async move {
            let mut headers = WITH_TOKEN.to_vec();
            if gzipped {
                headers.push(("content-encoding", "gzip"));
            }
            admin_call(admin, "PATCH", "/v1/snapshot", Some(body), &headers).await
        }
    };

    // No snapshot yet: no base for any delta.
    let (status, _) = patch(serde_json::to_vec(&delta).unwrap(), false).await;
    assert_eq!(status, 409);
    proxy.gateway.apply_snapshot(v1.clone()).unwrap();

    // A delta from another version is 409 and changes nothing.
    let mut wrong = delta.clone();
    wrong.from_version = 5;
    wrong.version = 6;
    let (status, body) = patch(gzip(&serde_json::to_vec(&wrong).unwrap()), true).await;
    assert_eq!(
        (status, body["error_code"].as_str()),
        (409, Some("APIG.2000"))
    );
    assert_eq!(proxy.gateway.snapshot_version(), Some(1));
    assert_eq!(*proxy.gateway.wire_snapshot().unwrap(), v1);
    let buyer = gw::Buyer::new(proxy.buyers);
    assert_eq!(
        buyer
            .signed("GET", gw::MARKET, "/v1/mock", b"")
            .await
            .status,
        200
    );

    // A delta that breaks a rule is 400 with the field path, as for PUT.
    let mut invalid = marketgate::snapshot::delta::diff(&v1, &v2);
    invalid.groups[0].apis[0].req_uri = "no-slash".into();
    let (status, body) = patch(serde_json::to_vec(&invalid).unwrap(), false).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error_msg"]
            .as_str()
            .unwrap()
            .contains("groups[0].apis[0].req_uri"),
        "{body}"
    );
    let (status, body) = patch(
        br#"{"from_version":1,"version":2,"groups":[{"id":3}]}"#.to_vec(),
        false,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error_msg"].as_str().unwrap().contains("groups[0]"),
        "{body}"
    );
    assert_eq!(proxy.gateway.snapshot_version(), Some(1));

    // The right base: applied, gzip accepted, and the proxy names itself.
    let (status, body) = patch(gzip(&serde_json::to_vec(&delta).unwrap()), true).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 2);
    assert!(body["node_id"].is_string());
    assert_eq!(*proxy.gateway.wire_snapshot().unwrap(), v2);
    let refused = buyer.signed("GET", gw::MARKET, "/v1/mock", b"").await;
    assert_eq!(
        (refused.status.as_u16(), refused.code()),
        (403, "APIG.0306".into())
    );

    // The same delta again is stale: 409.
    let (status, _) = patch(serde_json::to_vec(&delta).unwrap(), false).await;
    assert_eq!(status, 409);

    let metrics = admin_get(proxy.admin, "/metrics", true).await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    assert_eq!(
        push_counter(&text, "applied"),
        2,
        "v1 by PUT-equivalent, v2 by PATCH"
    );
    assert_eq!(push_counter(&text, "rejected"), 2);
    assert_eq!(push_counter(&text, "stale"), 3);
    assert_eq!(push_counter(&text, "error"), 0);

    // After a restart the snapshot loaded from disk is the base: a delta from it applies.
    let dir = proxy.stop().await;
    let proxy = TestGateway::start_in(dir, "").await;
    assert_eq!(*proxy.gateway.wire_snapshot().unwrap(), v2);
    let mut v3 = v2.clone();
    v3.version = 3;
    v3.purchases[0].quota_used = 4;
    let (status, body) = admin_call(
        proxy.admin,
        "PATCH",
        "/v1/snapshot",
        Some(serde_json::to_vec(&marketgate::snapshot::delta::diff(&v2, &v3)).unwrap()),
        WITH_TOKEN,
    )
    .await;
    assert_eq!((status, &body["version"]), (200, &json!(3)), "{body}");
}

/// Measures how long a delist takes to be refused on each of three proxies, N times (the
/// CONTRACT's "within one second of the 2xx"). `cargo test --release --test it
/// planes_propagation -- --ignored --nocapture`; results in docs/propagation.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run by hand, prints percentiles"]
async fn planes_propagation_delist_to_refusal() {
    // MARKETGATE_PROPAGATION_PROXIES / _ROUNDS: the fleet size and rounds (BENCHMARKS.md).
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let proxies = env("MARKETGATE_PROPAGATION_PROXIES", 3);
    let n = env("MARKETGATE_PROPAGATION_ROUNDS", 50);
    let planes = Planes::start(proxies).await;
    let mut latencies: Vec<Vec<f64>> = vec![Vec::new(); planes.proxies.len()];
    let started = Instant::now();
    for round in 0..n {
        let domain = format!("round{round}.example.com");
        let gid = planes
            .listed_group(&format!("round_{round}"), &domain)
            .await;
        let (key, secret) = planes.buy(&gid, &format!("order-{round}"), 1_000_000).await;
        planes.converged().await;
        let pollers: Vec<_> = planes
            .proxies
            .iter()
            .map(|p| {
                tokio::spawn(first_refusal(
                    p.buyer(),
                    domain.clone(),
                    key.clone(),
                    secret.clone(),
                ))
            })
            .collect();
        // Let every poller get its first 200 in before the delist.
        tokio::time::sleep(Duration::from_millis(20)).await;
        planes.delist(&gid).await;
        let answered = Instant::now();
        for (i, poller) in pollers.into_iter().enumerate() {
            let refused = poller.await.unwrap();
            let ms = if refused >= answered {
                refused.duration_since(answered).as_secs_f64() * 1000.0
            } else {
                0.0 // refused before the 2xx reached the market: counts as immediate
            };
            latencies[i].push(ms);
        }
    }
    println!(
        "delist -> first 403 APIG.0306, {n} rounds, {proxies} proxies, push_debounce {:?}, {:.1} s",
        planes.cp.config().control.push_debounce,
        started.elapsed().as_secs_f64()
    );
    println!("proxy    p50 ms  p90 ms  p99 ms  max ms");
    let mut all = Vec::new();
    for (proxy, values) in planes.proxies.iter().zip(&mut latencies) {
        values.sort_by(f64::total_cmp);
        all.extend(values.iter().copied());
        println!(
            "{:8} {:7.1} {:7.1} {:7.1} {:7.1}",
            proxy.node,
            percentile(values, 50.0),
            percentile(values, 90.0),
            percentile(values, 99.0),
            values[values.len() - 1]
        );
    }
    all.sort_by(f64::total_cmp);
    println!(
        "all      {:7.1} {:7.1} {:7.1} {:7.1}",
        percentile(&all, 50.0),
        percentile(&all, 90.0),
        percentile(&all, 99.0),
        all[all.len() - 1]
    );
    // Every proxy refused the delisted group within a second of the 2xx, every round.
    assert!(all[all.len() - 1] < 1000.0, "a proxy took over a second");
}

#[tokio::test]
async fn planes_proxies_join_by_starting_and_serve_within_a_second() {
    let mut planes = Planes::start(0).await;
    let gid = planes.listed_group("join", "join.example.com").await;
    let (key, secret) = planes.buy(&gid, "order-j", 1_000_000).await;
    for n in 1..=3 {
        let started = Instant::now();
        planes.add_proxy(&format!("joiner-{n}")).await;
        let proxy = planes.proxies.last().unwrap();
        eventually("the new proxy serves", || proxy.gateway.is_ready()).await;
        let ready = started.elapsed();
        assert!(ready < Duration::from_secs(1), "ready after {ready:?}");
        planes.converged().await;
        let proxy = planes.proxies.last().unwrap();
        let answer = call(&proxy.buyer(), "join.example.com", &key, &secret).await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
    }
    planes.converged().await;
    let (_, body) = admin_call(planes.admin, "GET", "/v1/proxies", None, WITH_TOKEN).await;
    assert_eq!(body["proxies"].as_array().unwrap().len(), 3, "{body}");
    // One stopped for good leaves the list (a clean stop says so at once).
    planes.proxies.pop().unwrap().stop().await;
    let (_, body) = admin_call(planes.admin, "GET", "/v1/proxies", None, WITH_TOKEN).await;
    let nodes: Vec<_> = body["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["node_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(nodes, ["joiner-1", "joiner-2"], "{body}");
}

#[tokio::test]
async fn planes_a_silent_proxy_leaves_the_list_after_the_expiry() {
    let planes = Planes::start_with(0, "proxy_expiry_secs = 2\n").await;
    let poll = json!({"node_id": "ghost", "incarnation": "i-1", "version": null});
    let (status, _) = admin_call(
        planes.admin,
        "POST",
        "/v1/snapshot/subscribe",
        Some(serde_json::to_vec(&poll).unwrap()),
        WITH_TOKEN,
    )
    .await;
    assert_eq!(
        status, 200,
        "a proxy with nothing is sent the full snapshot"
    );
    let listed = || {
        planes
            .subscriptions
            .in_touch()
            .iter()
            .any(|p| p.node_id == "ghost")
    };
    assert!(listed());
    // Another incarnation claiming it while it is live is refused, naming both.
    let other = json!({"node_id": "ghost", "incarnation": "i-2", "version": null});
    let (status, body) = admin_call(
        planes.admin,
        "POST",
        "/v1/snapshot/subscribe",
        Some(serde_json::to_vec(&other).unwrap()),
        WITH_TOKEN,
    )
    .await;
    assert_eq!(status, 409, "{body}");
    let message = body["error_msg"].as_str().unwrap();
    assert!(message.contains("i-1") && message.contains("i-2"), "{body}");
    let deadline = Instant::now() + CONVERGE;
    while listed() {
        assert!(Instant::now() < deadline, "never left the list");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn planes_two_proxies_with_one_node_id_one_is_refused() {
    let mut planes = Planes::start(1).await;
    let gid = planes.listed_group("twin", "twin.example.com").await;
    let (key, secret) = planes.buy(&gid, "order-t", 100).await;
    planes.converged().await;
    let first = &planes.proxies[0];
    assert_eq!(
        call(&first.buyer(), "twin.example.com", &key, &secret)
            .await
            .status,
        200
    );
    // A second proxy, own data dir, same node id.
    let twin = Proxy::start(&first.node.clone(), &[planes.admin], "").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!twin.gateway.is_ready(), "the twin is refused snapshots");
    let answer = call(&twin.buyer(), "twin.example.com", &key, &secret).await;
    assert_eq!(
        (answer.status.as_u16(), answer.code().as_str()),
        (503, "APIG.0606")
    );
    let ledger = planes
        .cp
        .ledger(&planes.cp.snapshot().await.purchases[0].id)
        .await
        .unwrap();
    assert!(
        ledger.leases.len() <= 1,
        "one lease, the first proxy's: {ledger:?}"
    );
    // The first keeps serving, and never more than bought across both.
    let mut served = 1;
    while call(
        &planes.proxies[0].buyer(),
        "twin.example.com",
        &key,
        &secret,
    )
    .await
    .status
        == 200
    {
        served += 1;
        assert!(served <= 100, "over-admitted");
    }
    assert_eq!(served, 100);
    twin.stop().await;
    planes.proxies.clear();
}

#[tokio::test]
async fn planes_a_proxy_fails_over_to_the_next_control_url() {
    let planes = Planes::start(0).await;
    let dead = crate::support::process::free_port();
    let proxy = Proxy::start("failover", &[dead, planes.admin], "").await;
    eventually("served through the second URL", || proxy.gateway.is_ready()).await;
    proxy.stop().await;
}

/// Two control replicas on one store: a proxy polling one and a twin with its node id
/// polling the other are one identity, decided by the store (`proxy_nodes`). On SQLite and,
/// when it answers, PostgreSQL.
#[tokio::test]
async fn planes_one_node_id_holds_across_control_replicas() {
    use crate::support::control as ctl;
    use marketgate::feed::Poll;
    for store in ctl::Backend::all().await {
        let dir = tempfile::tempdir().unwrap();
        let database_url = store.fresh_database(dir.path()).await;
        let toml = ctl::config_toml(&database_url, "127.0.0.1:0");
        let config = marketgate::config::Config::from_toml(&toml, Vec::new()).unwrap();
        let (_trigger, shutdown) = marketgate::shutdown::ShutdownTrigger::new();
        let a = marketgate::control::ControlPlane::open(&config)
            .await
            .unwrap();
        let b = marketgate::control::ControlPlane::open(&config)
            .await
            .unwrap();
        let (on_a, on_b) = (
            a.spawn_subscriptions(shutdown.clone()),
            b.spawn_subscriptions(shutdown.clone()),
        );
        let poll = |incarnation: &str| Poll {
            node_id: "edge-1".into(),
            incarnation: incarnation.into(),
            version: None,
            content_hash: None,
            last_error: None,
        };
        let first = tokio::time::timeout(CONVERGE, on_a.poll(&poll("life-1")))
            .await
            .unwrap();
        assert!(first.is_ok(), "{store:?}: {first:?}");
        let twin = tokio::time::timeout(CONVERGE, on_b.poll(&poll("life-2")))
            .await
            .unwrap();
        match twin {
            Err(marketgate::control::ControlError::NodeIdInUse {
                held_by,
                claimed_by,
                ..
            }) => assert_eq!(
                (held_by.as_str(), claimed_by.as_str()),
                ("life-1", "life-2")
            ),
            other => panic!("{store:?}: the twin on the other replica was not refused: {other:?}"),
        }
        // The holder itself is welcome on either replica.
        assert!(on_b.claim("edge-1", "life-1").await.is_ok());
        // A clean stop gives the id up at once, on every replica.
        on_a.leave("edge-1", "life-1").await;
        assert!(on_b.claim("edge-1", "life-2").await.is_ok(), "{store:?}");
    }
}

/// Market writes per second and lease-exchange latency while 1, then 16, subscribers follow
/// the control plane (BENCHMARKS.md, issue 15 "built once"). The subscribers are fake
/// proxies: each long-polls `POST /v1/snapshot/subscribe` and acks what it is sent without
/// compiling it, so that only the control plane's cost of serving them is measured (as the
/// issue's measurement of the old pushers did). Meanwhile 20 market clients buy purchases in a
/// loop and one prober exchanges leases (a report and a want) every 10 ms.
/// `MARKETGATE_WRITES_SECS` (default 10) per fleet size; `cargo test --test it
/// planes_market_writes -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run by hand, prints writes/s and exchange latency"]
async fn planes_market_writes_and_lease_exchanges_by_subscribers() {
    use crate::support::control::{
        expect_status, market_base, BUYER_DOMAIN, BUYER_PROJECT, MARKET_TOKEN,
    };
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let secs: u64 = std::env::var("MARKETGATE_WRITES_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    println!("| subscribers | writes | writes/s | write p50 ms | write p99 ms | exchanges | exchange p50 ms | exchange p99 ms |");
    println!("|---|---|---|---|---|---|---|---|");
    // A B B A: the order of the machine's load drifts counts for neither size.
    for subscribers in [1usize, 16, 16, 1] {
        let planes = Planes::start(0).await;
        let gid = planes.listed_group("writes", "writes.example.com").await;
        planes.buy(&gid, "order-prober", 1_000_000).await;
        let purchase = planes.cp.snapshot().await.purchases[0].id.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(AtomicU64::new(0));
        let mut fakes = Vec::new();
        for n in 0..subscribers {
            let (admin, stop, acks) = (planes.admin, stop.clone(), acks.clone());
            fakes.push(tokio::spawn(async move {
                let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
                    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                        .build_http();
                let (mut version, mut hash): (Option<u64>, Option<String>) = (None, None);
                while !stop.load(Ordering::SeqCst) {
                    let poll = json!({"node_id": format!("fake-{n}"), "incarnation": format!("life-{n}"),
                                      "version": version, "content_hash": hash});
                    let mut request = http::Request::builder()
                        .method("POST")
                        .uri(format!("http://{admin}{}", marketgate::feed::SUBSCRIBE_PATH))
                        .header("content-type", "application/json");
                    for (name, value) in WITH_TOKEN {
                        request = request.header(*name, *value);
                    }
                    let request = request
                        .body(http_body_util::Full::new(bytes::Bytes::from(poll.to_string())))
                        .unwrap();
                    let Ok(response) = client.request(request).await else {
                        return;
                    };
                    let header = |name: &str| {
                        response
                            .headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                    };
                    if response.status() == 200 {
                        version = header(marketgate::feed::VERSION_HEADER).and_then(|v| v.parse().ok());
                        hash = header(marketgate::feed::HASH_HEADER);
                        acks.fetch_add(1, Ordering::SeqCst);
                    }
                    let _ = http_body_util::BodyExt::collect(response.into_body()).await;
                }
            }));
        }
        let prober = {
            let (admin, stop, purchase) = (planes.admin, stop.clone(), purchase.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut since = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let exchange = json!({"node_id": "prober", "incarnation": "prober-life",
                        "reports": [{"purchase_id": purchase, "used": 1, "since": since}],
                        "wants": [{"purchase_id": purchase, "calls": 1, "demand": 10}]});
                    let sent = Instant::now();
                    let (status, body) = admin_call(
                        admin,
                        "POST",
                        "/v1/leases",
                        Some(serde_json::to_vec(&exchange).unwrap()),
                        WITH_TOKEN,
                    )
                    .await;
                    latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                    assert_eq!(status, 200, "{body}");
                    since += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                latencies
            })
        };
        let started = Instant::now();
        let writers: Vec<_> = (0..20)
            .map(|w| {
                let (market, gid) = (
                    planes.client(MARKET_TOKEN).as_domain(BUYER_DOMAIN),
                    gid.clone(),
                );
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut n = 0;
                    while started.elapsed() < Duration::from_secs(secs) {
                        let sent = Instant::now();
                        let bought = market
                            .post(
                                &format!("{}/api-groups/purchase", market_base(BUYER_PROJECT)),
                                json!({"order_id": format!("order-{w}-{n}"), "group_id": gid,
                                       "start_time": "1700000000", "expire_time": "4102444800",
                                       "req_quota": "1000", "order_type": "1"}),
                            )
                            .await;
                        expect_status("purchase", &bought, 201);
                        latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                        n += 1;
                    }
                    latencies
                })
            })
            .collect();
        let mut writes = Vec::new();
        for writer in writers {
            writes.extend(writer.await.unwrap());
        }
        let elapsed = started.elapsed().as_secs_f64();
        stop.store(true, Ordering::SeqCst);
        let mut exchanges = prober.await.unwrap();
        for fake in fakes {
            fake.abort();
        }
        writes.sort_by(f64::total_cmp);
        exchanges.sort_by(f64::total_cmp);
        assert!(
            acks.load(Ordering::SeqCst) > 0,
            "the subscribers were sent versions"
        );
        println!(
            "| {subscribers} | {} | {:.1} | {:.1} | {:.1} | {} | {:.1} | {:.1} |",
            writes.len(),
            writes.len() as f64 / elapsed,
            percentile(&writes, 50.0),
            percentile(&writes, 99.0),
            exchanges.len(),
            percentile(&exchanges, 50.0),
            percentile(&exchanges, 99.0),
        );
    }
}
