//! Request throttling policies (issue 13) end to end over real sockets: the Huawei v2
//! throttling API on the control plane, the policy in the snapshot, and the proxy's
//! throttling phase (429 APIG.0308, `Retry-After`, `X-Apig-RateLimit-*` in debug mode, no
//! bought call taken by a throttled one).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{json, Value};

use crate::support::control::*;
use crate::support::gateway::{request, signed_as, Answer, Buyer};
use crate::support::planes::{call, Planes};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Sleeps until at least `margin` is left of the current `window_ms` window, so that a short
/// burst falls in one window.
async fn early_in_window(window_ms: u64, margin: u64) {
    let into = now_ms() % window_ms;
    if window_ms - into < margin {
        tokio::time::sleep(Duration::from_millis(window_ms - into + 5)).await;
    }
}

/// Creates a policy; returns its id.
async fn create_policy(seller: &Api, body: Value) -> String {
    let created = seller
        .post(&format!("{}/throttles", mgmt(SELLER_PROJECT)), body)
        .await;
    expect_status("create policy", &created, 201);
    created.1["id"].as_str().unwrap().to_owned()
}

/// Binds `policy` to every published API of `group` not yet bound to it (found through the
/// unbound list, as a console does).
async fn bind_group(seller: &Api, policy: &str, group: &str) {
    let base = mgmt(SELLER_PROJECT);
    let unbound = seller
        .get(&format!(
            "{base}/throttle-bindings/unbinded-apis?throttle_id={policy}&group_id={group}"
        ))
        .await;
    expect_status("unbound apis", &unbound, 200);
    let publish_ids: Vec<Value> = unbound.1["apis"]
        .as_array()
        .unwrap()
        .iter()
        .map(|api| api["publish_id"].clone())
        .collect();
    assert!(!publish_ids.is_empty(), "{}", unbound.1);
    let bound = seller
        .post(
            &format!("{base}/throttle-bindings"),
            json!({"strategy_id": policy, "publish_ids": publish_ids}),
        )
        .await;
    expect_status("bind", &bound, 201);
}

/// The buyer's purchase of `group` as the market API shows it.
async fn purchase_of(planes: &Planes, key: &str) -> Value {
    let listed = planes
        .client(MARKET_TOKEN)
        .as_domain(BUYER_DOMAIN)
        .get(&format!("{}/purchases", market_base(BUYER_PROJECT)))
        .await;
    expect_status("purchases", &listed, 200);
    listed.1["purchases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["app_key"] == key)
        .cloned()
        .unwrap_or_else(|| panic!("no purchase with {key}: {}", listed.1))
}

fn assert_throttled(answer: &Answer, dimension: &str, limit: u64, time: &str) {
    assert_eq!(answer.status, 429, "{:?}", answer.body);
    assert_eq!(answer.code(), "APIG.0308");
    assert_eq!(
        answer.json()["error_msg"],
        format!(
            "The throttling threshold has been reached: policy {dimension} over ratelimit, limit:{limit}, time:{time}"
        )
    );
    let retry: u64 = answer.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
}

/// 10 calls a second per app, 64 clients calling as fast as they can for about 3.5 s: every
/// whole second admits exactly 10 (counted from both ends: calls surely inside the second are
/// at most 10, calls possibly inside it at least 10), the rest are 429 APIG.0308 with
/// `Retry-After`, and the purchase's `quota_used` counts the admitted calls only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_a_second_per_app_admits_exactly_ten_each_second_under_64_clients() {
    let planes = Planes::start(1).await;
    let domain = "paced.market.test";
    let group = planes.listed_group("paced_group", domain).await;
    let (key, secret) = planes.buy(&group, "paced-order", 1_000_000).await;
    let seller = planes.client(SELLER_TOKEN);
    let policy = create_policy(
        &seller,
        json!({"name": "ten_per_second", "api_call_limits": 1000, "app_call_limits": 10,
               "time_interval": 1, "time_unit": "SECOND", "type": 1}),
    )
    .await;
    bind_group(&seller, &policy, &group).await;
    planes.converged().await;

    let buyer = planes.proxies[0].buyer();
    // In debug mode the headers say what is left.
    early_in_window(1000, 300).await;
    let debug = buyer
        .send({
            let mut r = signed_as(
                &key,
                &secret,
                request("GET", domain, "/hello", Bytes::new()),
            );
            r.headers_mut()
                .insert("x-apig-mode", "debug".parse().unwrap());
            r
        })
        .await;
    assert_eq!(debug.status, 200, "{:?}", debug.body);
    let header = |name: &str| {
        debug
            .headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    assert!(
        header("x-apig-ratelimit-app").is_some_and(|v| v.ends_with(",limit:10,time:1 second")),
        "{:?}",
        debug.headers
    );
    assert!(header("x-apig-ratelimit-api").is_some_and(|v| v.contains(",limit:1000,")));
    assert_eq!(header("x-apig-ratelimit-ip"), None);
    tokio::time::sleep(Duration::from_millis(1000 - now_ms() % 1000)).await;

    let until = now_ms() + 3_500;
    let (key, secret) = (Arc::new(key), Arc::new(secret));
    let clients: Vec<_> = (0..64)
        .map(|_| {
            let (buyer, key, secret) = (buyer.clone(), key.clone(), secret.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while now_ms() < until {
                    let sent = now_ms();
                    let answer = call(&buyer, domain, &key, &secret).await;
                    seen.push((sent, now_ms(), answer));
                }
                seen
            })
        })
        .collect();
    let mut answers = Vec::new();
    for client in clients {
        answers.extend(client.await.unwrap());
    }
    let admitted: Vec<(u64, u64)> = answers
        .iter()
        .filter(|(_, _, a)| a.status == 200)
        .map(|(sent, answered, _)| (*sent, *answered))
        .collect();
    // The proxy is leased: a call whose app allotment is spent is refused for the app limit;
    // rarely, one whose API allotment (100 at a time) was not refilled within the 500 ms wait
    // on this busy machine is refused naming the API limit (docs/throttling.md).
    let mut refused_api = 0;
    for (_, _, answer) in answers.iter().filter(|(_, _, a)| a.status != 200) {
        if answer.json()["error_msg"]
            .as_str()
            .unwrap_or("")
            .contains("policy api")
        {
            assert_throttled(answer, "api", 1000, "1 second");
            refused_api += 1;
        } else {
            assert_throttled(answer, "app", 10, "1 second");
        }
    }
    eprintln!("{refused_api} refused naming the API limit (allotment not refilled in time)");
    let first = answers.iter().map(|(s, _, _)| s / 1000).min().unwrap();
    let last = answers.iter().map(|(_, a, _)| a / 1000).max().unwrap();
    let mut report = BTreeMap::new();
    for second in first + 1..last {
        let surely = admitted
            .iter()
            .filter(|(s, a)| s / 1000 == second && a / 1000 == second)
            .count();
        let possibly = admitted
            .iter()
            .filter(|(s, a)| s / 1000 <= second && second <= a / 1000)
            .count();
        report.insert(second, (surely, possibly));
        assert!(
            surely <= 10,
            "second {second}: {surely} admitted: {report:?}"
        );
        assert!(
            possibly >= 10,
            "second {second}: only {possibly}: {report:?}"
        );
    }
    // Demand above the limit in every window the run touched: 10 each, the last perhaps
    // not reached before the clients stopped.
    let seconds = (last - first + 1) as usize;
    assert!(
        (10 * (seconds - 1)..=10 * seconds).contains(&admitted.len()),
        "{} admitted in {seconds} windows",
        admitted.len()
    );
    assert!(
        answers.len() > admitted.len() * 3,
        "the clients did press: {} answers",
        answers.len()
    );
    eprintln!(
        "{} calls, {} admitted over {seconds} windows; per second (surely, possibly): {report:?}",
        answers.len(),
        admitted.len()
    );

    // Throttled calls took nothing from the purchase: what it used is what was admitted
    // (the debug call included), once the proxy has reported.
    let served = admitted.len() as u64 + 1;
    let mut used = 0;
    for _ in 0..400 {
        used = purchase_of(&planes, &key).await["quota_used"]
            .as_u64()
            .unwrap();
        if used >= served {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(used, served, "quota_used counts admitted calls only");
    let metrics = crate::support::gateway::admin_get(planes.proxies[0].admin, "/metrics", true)
        .await
        .body;
    let metrics = String::from_utf8_lossy(&metrics);
    let throttled = (answers.len() - admitted.len()) as u64;
    assert!(
        metrics.contains(&format!(
            "marketgate_throttled_total{{group=\"{group}\",policy=\"{policy}\"}} {throttled}"
        )),
        "{metrics}"
    );
}

/// A per-IP limit refuses the sixth call from one address whatever app makes it; a shared
/// (type 2) policy counts two APIs together; an APP exception lifts one app above the app
/// limit; unbinding lifts the policy.
#[tokio::test]
async fn ip_limits_shared_policies_and_app_exceptions() {
    let planes = Planes::start(1).await;
    let seller = planes.client(SELLER_TOKEN);
    let base = mgmt(SELLER_PROJECT);
    let domain = "limits.market.test";
    let group = planes.listed_group("limits_group", domain).await;
    // A second published API in the group: GET /second.
    let second = seller
        .post(
            &format!("{base}/apis"),
            json!({"group_id": group, "name": "limits_second", "type": 1,
                   "req_protocol": "HTTP", "req_method": "GET", "req_uri": "/second",
                   "auth_type": "APP", "backend_type": "MOCK",
                   "mock_info": {"result_content": "second"}}),
        )
        .await;
    expect_status("second api", &second, 201);
    let published = seller
        .post(
            &format!("{base}/apis/action"),
            json!({"action": "online", "env_id": "DEFAULT_ENVIRONMENT_RELEASE_ID",
                   "api_id": second.1["id"]}),
        )
        .await;
    expect_status("publish second", &published, 201);
    let (key_a, secret_a) = planes.buy(&group, "limits-order-a", 1_000).await;
    let (key_b, secret_b) = planes.buy(&group, "limits-order-b", 1_000).await;
    let buyer = planes.proxies[0].buyer();
    let get = |buyer: &Buyer, path: &'static str, key: &str, secret: &str| {
        let r = signed_as(key, secret, request("GET", domain, path, Bytes::new()));
        let buyer = buyer.clone();
        async move { buyer.send(r).await }
    };

    // Per IP: 5 an hour from one address, across both buyers' apps.
    let policy = create_policy(
        &seller,
        json!({"name": "per_ip", "api_call_limits": 100, "ip_call_limits": 5,
               "time_interval": 1, "time_unit": "HOUR"}),
    )
    .await;
    bind_group(&seller, &policy, &group).await;
    planes.converged().await;
    early_in_window(3_600_000, 10_000).await;
    for n in 0..5 {
        let (key, secret) = if n % 2 == 0 {
            (&key_a, &secret_a)
        } else {
            (&key_b, &secret_b)
        };
        assert_eq!(
            get(&buyer, "/hello", key, secret).await.status,
            200,
            "call {n}"
        );
    }
    assert_throttled(
        &get(&buyer, "/hello", &key_b, &secret_b).await,
        "ip",
        5,
        "1 hour",
    );
    // Exclusive: the other API has its own counters.
    assert_eq!(get(&buyer, "/second", &key_a, &secret_a).await.status, 200);
    let deleted = seller.delete(&format!("{base}/throttles/{policy}")).await;
    expect_status("delete policy", &deleted, 204);

    // Shared: 6 an hour over both APIs together.
    let shared = create_policy(
        &seller,
        json!({"name": "shared_pair", "api_call_limits": 6, "time_interval": 1,
               "time_unit": "HOUR", "type": 2}),
    )
    .await;
    bind_group(&seller, &shared, &group).await;
    planes.converged().await;
    let mut admitted = 0;
    for n in 0..8 {
        let path = if n % 2 == 0 { "/hello" } else { "/second" };
        let answer = get(&buyer, path, &key_a, &secret_a).await;
        if answer.status == 200 {
            admitted += 1;
        } else {
            assert_throttled(&answer, "api", 6, "1 hour");
        }
    }
    assert_eq!(admitted, 6, "a shared policy counts both APIs together");
    let deleted = seller.delete(&format!("{base}/throttles/{shared}")).await;
    expect_status("delete shared", &deleted, 204);

    // An APP exception: 2 an hour per app, 5 for buyer A's app.
    let per_app = create_policy(
        &seller,
        json!({"name": "per_app", "api_call_limits": 100, "app_call_limits": 2,
               "time_interval": 1, "time_unit": "HOUR"}),
    )
    .await;
    let app_a = purchase_of(&planes, &key_a).await["app_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let special = seller
        .post(
            &format!("{base}/throttles/{per_app}/throttle-specials"),
            json!({"object_type": "APP", "object_id": app_a, "call_limits": 5}),
        )
        .await;
    expect_status("special", &special, 201);
    bind_group(&seller, &per_app, &group).await;
    planes.converged().await;
    let count = |key: String, secret: String| {
        let buyer = buyer.clone();
        async move {
            let mut ok = 0;
            for _ in 0..8 {
                let answer = get(&buyer, "/hello", &key, &secret).await;
                if answer.status == 200 {
                    ok += 1;
                }
            }
            ok
        }
    };
    assert_eq!(
        count(key_a.clone(), secret_a.clone()).await,
        5,
        "the exception's limit"
    );
    assert_eq!(
        count(key_b.clone(), secret_b.clone()).await,
        2,
        "the policy's app limit"
    );

    // Unbinding lifts the policy (within a second of the 2xx).
    let bound = seller
        .get(&format!(
            "{base}/throttle-bindings/binded-apis?throttle_id={per_app}"
        ))
        .await;
    expect_status("bound apis", &bound, 200);
    let ids: Vec<Value> = bound.1["apis"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["throttle_apply_id"].clone())
        .collect();
    assert_eq!(ids.len(), 2);
    let unbound = seller
        .put(
            &format!("{base}/throttle-bindings?action=delete"),
            json!({"throttle_bindings": ids}),
        )
        .await;
    expect_status("batch unbind", &unbound, 200);
    assert_eq!(unbound.1["success_count"], 2);
    let started = std::time::Instant::now();
    let mut lifted = false;
    while started.elapsed() < Duration::from_secs(1) {
        if get(&buyer, "/hello", &key_b, &secret_b).await.status == 200 {
            lifted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(lifted, "an unbound policy is lifted within 1 s");
}

/// Huawei's validation on the throttling API: each 4xx names the field and the rule.
#[tokio::test]
async fn throttling_api_refuses_bad_input_naming_field_and_rule() {
    let planes = Planes::start(0).await;
    let seller = planes.client(SELLER_TOKEN);
    let base = mgmt(SELLER_PROJECT);
    let cases = [
        (
            json!({"name": "p1", "api_call_limits": 10, "time_interval": 1, "time_unit": "SECOND"}),
            "name",
        ),
        (
            json!({"name": "policy_a", "time_interval": 1, "time_unit": "SECOND"}),
            "api_call_limits",
        ),
        (
            json!({"name": "policy_a", "api_call_limits": 10, "user_call_limits": 11,
                "time_interval": 1, "time_unit": "SECOND"}),
            "user_call_limits",
        ),
        (
            json!({"name": "policy_a", "api_call_limits": 10, "user_call_limits": 5,
                "app_call_limits": 6, "time_interval": 1, "time_unit": "SECOND"}),
            "app_call_limits",
        ),
        (
            json!({"name": "policy_a", "api_call_limits": 10, "ip_call_limits": 11,
                "time_interval": 1, "time_unit": "SECOND"}),
            "ip_call_limits",
        ),
        (
            json!({"name": "policy_a", "api_call_limits": 10, "time_interval": 0,
                "time_unit": "SECOND"}),
            "time_interval",
        ),
        (
            json!({"name": "policy_a", "api_call_limits": 10, "time_interval": 1,
                "time_unit": "WEEK"}),
            "time_unit",
        ),
        (
            json!({"name": "policy_a", "api_call_limits": 10, "time_interval": 1,
                "time_unit": "SECOND", "type": 3}),
            "type",
        ),
    ];
    for (body, field) in cases {
        let answer = seller
            .post(&format!("{base}/throttles"), body.clone())
            .await;
        expect_error(&format!("{body}"), &answer, 400, "APIG.2012");
        let msg = answer.1["error_msg"].as_str().unwrap();
        assert!(
            msg.starts_with(&format!(
                "Invalid parameter value,parameterName:{field}. {field} "
            )),
            "{msg}"
        );
    }
    let wrong_type = seller
        .post(
            &format!("{base}/throttles"),
            json!({"name": "policy_a", "api_call_limits": "ten"}),
        )
        .await;
    expect_error("string limit", &wrong_type, 400, "APIG.2000");
    assert!(wrong_type.1["error_msg"]
        .as_str()
        .unwrap()
        .contains("api_call_limits"));
    let ok = json!({"name": "policy_a", "api_call_limits": 10, "time_interval": 1,
                    "time_unit": "SECOND"});
    create_policy(&seller, ok.clone()).await;
    let again = seller.post(&format!("{base}/throttles"), ok).await;
    expect_error("same name", &again, 400, "APIG.3204");
    let missing = seller
        .get(&format!("{base}/throttles/no-such-policy"))
        .await;
    expect_error("no policy", &missing, 404, "APIG.3005");
    let unbind = seller
        .delete(&format!("{base}/throttle-bindings/no-such-binding"))
        .await;
    expect_error("no binding", &unbind, 404, "APIG.3010");
}

/// Three proxies and one control plane, an app limit of 100 a minute, every proxy's clients
/// pressing well above it for three whole minutes (`THROTTLE_FLEET_MINUTES` to change): each
/// minute the fleet admits at most 100 (allotments: the sum granted per window never passes
/// the limit) and at least 90 (the limit is shared, not split).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_proxies_hold_an_app_limit_of_100_a_minute_together() {
    let minutes: u64 = std::env::var("THROTTLE_FLEET_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(3);
    let planes = Planes::start(3).await;
    let domain = "fleet-paced.market.test";
    let group = planes.listed_group("fleet_paced", domain).await;
    let (key, secret) = planes.buy(&group, "fleet-paced-order", 1_000_000).await;
    let seller = planes.client(SELLER_TOKEN);
    let policy = create_policy(
        &seller,
        json!({"name": "hundred_a_minute", "api_call_limits": 100000, "app_call_limits": 100,
               "time_interval": 1, "time_unit": "MINUTE"}),
    )
    .await;
    bind_group(&seller, &policy, &group).await;
    planes.converged().await;

    // From the next whole minute, for `minutes` minutes: two clients per proxy, each calling
    // every 100 ms (60 calls a second against 100 a minute).
    let start = (now_ms() / 60_000 + 1) * 60_000;
    let until = start + minutes * 60_000;
    tokio::time::sleep(Duration::from_millis(start - now_ms())).await;
    let (key, secret) = (Arc::new(key), Arc::new(secret));
    let mut clients = Vec::new();
    for proxy in &planes.proxies {
        for _ in 0..2 {
            let (buyer, key, secret) = (proxy.buyer(), key.clone(), secret.clone());
            clients.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                while now_ms() < until {
                    tick.tick().await;
                    let sent = now_ms();
                    let answer = call(&buyer, domain, &key, &secret).await;
                    seen.push((sent, now_ms(), answer.status.as_u16()));
                }
                seen
            }));
        }
    }
    let mut answers = Vec::new();
    for client in clients {
        answers.extend(client.await.unwrap());
    }
    let mut report = Vec::new();
    for minute in 0..minutes {
        let (from, to) = (start + minute * 60_000, start + (minute + 1) * 60_000);
        let inside = |t: u64| (from..to).contains(&t);
        let surely = answers
            .iter()
            .filter(|(s, a, status)| *status == 200 && inside(*s) && inside(*a))
            .count();
        let possibly = answers
            .iter()
            .filter(|(s, a, status)| *status == 200 && *s < to && *a >= from)
            .count();
        let calls = answers.iter().filter(|(s, _, _)| inside(*s)).count();
        report.push((minute, calls, surely, possibly));
    }
    eprintln!("(minute, calls, admitted surely in it, admitted possibly in it): {report:?}");
    for (minute, calls, surely, possibly) in &report {
        assert!(
            *calls > 1_000,
            "minute {minute}: only {calls} calls: {report:?}"
        );
        assert!(
            *surely <= 100,
            "minute {minute}: {surely} admitted: {report:?}"
        );
        assert!(
            *possibly >= 90,
            "minute {minute}: {possibly} admitted: {report:?}"
        );
    }
    let refused: Vec<u16> = answers
        .iter()
        .map(|(_, _, status)| *status)
        .filter(|status| *status != 200 && *status != 429)
        .collect();
    assert!(refused.is_empty(), "only 200 and 429: {refused:?}");
}

/// `POST /v1/throttle/allotments` on a control plane's admin listener, as a proxy sends it:
/// the calls granted.
async fn allot(admin: std::net::SocketAddr, node: &str, want: Value) -> u64 {
    let request = hyper::Request::post(format!(
        "http://{admin}{}",
        marketgate::throttle_allotment::PATH
    ))
    .header(
        "authorization",
        format!("Bearer {}", crate::support::gateway::ADMIN_TOKEN),
    )
    .header("content-type", "application/json")
    .body(http_body_util::Full::new(Bytes::from(
        json!({"node_id": node, "wants": [want]}).to_string(),
    )))
    .unwrap();
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let response = client.request(request).await.expect("the replica answers");
    let status = response.status();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let reply: Value = serde_json::from_slice(&body).unwrap();
    reply["grants"][0]["granted"].as_u64().unwrap()
}

/// The allotment ledger on PostgreSQL, shared by two control-plane replicas (issue 13: exact
/// across the fleet, across control replicas too). First the ledger alone: 40 exchanges
/// raced over both replicas' admin listeners for one counter and window, 7 calls each
/// against a limit of 100, are granted exactly 100 together (each grant decided with the row
/// locked, `FOR UPDATE`; without it two replicas read the same total and both add to it).
/// Then end to end: one proxy on each replica, eight clients on each pressing an app limit of
/// 20 a second for four seconds: every second the two proxies together admit at most 20, and
/// the limit is reached (demand is far above it). PostgreSQL only (SQLite is for one
/// process); skipped, saying so, when it is unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_allotments_on_postgresql_hold_the_limit_across_two_control_replicas() {
    let backends = Backend::all().await;
    let Some(postgres) = backends.iter().find(|b| matches!(b, Backend::Postgres)) else {
        return;
    };
    let first = Planes::start_on(postgres, &["proxy-a"]).await;
    let second = first.replica(&["proxy-b"]).await;

    // The ledger: a day's window, far from its end.
    const DAY_MS: u64 = 86_400_000;
    early_in_window(DAY_MS, 60_000).await;
    let window = now_ms() / DAY_MS;
    let asks: Vec<_> = (0..40)
        .map(|n| {
            let admin = if n % 2 == 0 {
                first.admin
            } else {
                second.admin
            };
            tokio::spawn(allot(
                admin,
                if n % 2 == 0 { "proxy-a" } else { "proxy-b" },
                json!({"counter": "raced/api", "window": window, "window_ms": DAY_MS,
                       "limit": 100, "calls": 7}),
            ))
        })
        .collect();
    let mut grants = Vec::new();
    for ask in asks {
        grants.push(ask.await.unwrap());
    }
    assert_eq!(
        grants.iter().sum::<u64>(),
        100,
        "the replicas granted {grants:?}"
    );
    assert!(grants.iter().all(|g| *g <= 7), "{grants:?}");

    // End to end: a policy made on one replica, served by both replicas' proxies.
    let domain = "pg-paced.market.test";
    let group = first.listed_group("pg_paced", domain).await;
    let (key, secret) = first.buy(&group, "pg-paced-order", 1_000_000).await;
    let seller = first.client(SELLER_TOKEN);
    let policy = create_policy(
        &seller,
        json!({"name": "twenty_a_second", "api_call_limits": 100000, "app_call_limits": 20,
               "time_interval": 1, "time_unit": "SECOND", "type": 1}),
    )
    .await;
    bind_group(&seller, &policy, &group).await;
    first.converged().await;
    second.converged().await;

    tokio::time::sleep(Duration::from_millis(1000 - now_ms() % 1000)).await;
    let until = now_ms() + 4_000;
    let (key, secret) = (Arc::new(key), Arc::new(secret));
    let mut clients = Vec::new();
    for proxy in first.proxies.iter().chain(&second.proxies) {
        for _ in 0..8 {
            let (buyer, key, secret) = (proxy.buyer(), key.clone(), secret.clone());
            clients.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                while now_ms() < until {
                    let sent = now_ms();
                    let answer = call(&buyer, domain, &key, &secret).await;
                    seen.push((sent, now_ms(), answer.status.as_u16()));
                }
                seen
            }));
        }
    }
    let mut answers = Vec::new();
    for client in clients {
        answers.extend(client.await.unwrap());
    }
    let other: Vec<u16> = answers
        .iter()
        .map(|(_, _, status)| *status)
        .filter(|status| *status != 200 && *status != 429)
        .collect();
    assert!(other.is_empty(), "only 200 and 429: {other:?}");
    let first_second = answers.iter().map(|(s, _, _)| s / 1000).min().unwrap();
    let last_second = answers.iter().map(|(_, a, _)| a / 1000).max().unwrap();
    let mut report = BTreeMap::new();
    for second in first_second..=last_second {
        let surely = answers
            .iter()
            .filter(|(s, a, status)| *status == 200 && s / 1000 == second && a / 1000 == second)
            .count();
        let calls = answers
            .iter()
            .filter(|(s, _, _)| s / 1000 == second)
            .count();
        report.insert(second, (calls, surely));
    }
    eprintln!("per second (calls, admitted surely in it): {report:?}");
    for (second, (_, surely)) in &report {
        assert!(
            *surely <= 20,
            "second {second}: {surely} admitted: {report:?}"
        );
    }
    let admitted = answers.iter().filter(|(_, _, s)| *s == 200).count();
    eprintln!("{admitted} admitted of {} calls", answers.len());
    assert!(
        admitted >= 20 * 3,
        "{admitted} admitted in four seconds of demand far above 20 a second: {report:?}"
    );
}
