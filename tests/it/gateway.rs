//! Data plane over real sockets: every row of CONTRACT §8, snapshot push and persistence,
//! quota exactness and durability, request framing, forwarding headers.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use marketgate::snapshot::{PurchaseState, Snapshot};

use crate::support::gateway::*;

fn body_of(snapshot: &Snapshot) -> Vec<u8> {
    serde_json::to_vec(snapshot).unwrap()
}

#[tokio::test]
async fn no_snapshot_is_503_and_not_ready() {
    let gw = TestGateway::start().await;
    let buyer = Buyer::new(gw.buyers);
    let answer = buyer.get(MARKET, "/v1/echo/1").await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.code(), "APIG.0606");
    assert!(answer.headers.contains_key("x-request-id"));
    assert_eq!(
        answer.json()["request_id"],
        answer.headers["x-request-id"].to_str().unwrap()
    );
    assert_eq!(admin_get(gw.admin, "/readyz", false).await.status, 503);
    assert_eq!(admin_get(gw.admin, "/healthz", false).await.status, 200);
}

#[tokio::test]
async fn a_signed_call_is_forwarded_with_forwarding_headers_and_without_credentials() {
    let backend = Backend::echo().await;
    let gw = TestGateway::with(market(1, backend.addr, Some(10))).await;
    let buyer = Buyer::new(gw.buyers);
    let answer = buyer
        .signed("POST", MARKET, "/v1/echo/42?lang=zh&x=1", b"{\"a\":1}")
        .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(&answer.body[..], b"echo");
    let seen = backend.last();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.uri, "/echo/42?lang=zh&x=1");
    assert_eq!(&seen.body[..], b"{\"a\":1}");
    assert!(!seen.headers.contains_key("authorization"));
    assert!(!seen.headers.contains_key("x-apig-appcode"));
    assert_eq!(seen.headers["x-forwarded-host"], MARKET);
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-request-id"], answer.headers["x-request-id"]);
    assert_eq!(gw.gateway.quota().get("p1").unwrap().used(), 1);
}

#[tokio::test]
async fn app_code_is_accepted_where_enabled_and_refused_over_http_by_default() {
    let backend = Backend::echo().await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let gw = TestGateway::start_in(dir, "[gateway]\nappcode_over_http = true\n").await;
    gw.gateway
        .apply_snapshot(market(1, backend.addr, None))
        .unwrap();
    let buyer = Buyer::new(gw.buyers);
    let mut request = request("GET", MARKET, "/v1/echo/1", Bytes::new());
    request
        .headers_mut()
        .insert("x-apig-appcode", CODE.parse().unwrap());
    assert_eq!(buyer.send(request).await.status, 200);
    assert!(!backend.last().headers.contains_key("x-apig-appcode"));

    let dir = Arc::new(tempfile::tempdir().unwrap());
    let strict = TestGateway::start_in(dir, "").await;
    strict
        .gateway
        .apply_snapshot(market(1, backend.addr, None))
        .unwrap();
    let mut request = self::request("GET", MARKET, "/v1/echo/1", Bytes::new());
    request
        .headers_mut()
        .insert("x-apig-appcode", CODE.parse().unwrap());
    let answer = Buyer::new(strict.buyers).send(request).await;
    assert_eq!(
        (answer.status.as_u16(), answer.code().as_str()),
        (401, "APIG.0303")
    );
}

/// CONTRACT §8, each row at least once, over a socket.
#[tokio::test]
async fn every_row_of_the_error_table() {
    let backend = Backend::echo().await;
    let slow = Backend::with_delay(Duration::from_secs(5)).await;
    let closed = closed_addr().await;
    let mut snapshot = market(1, backend.addr, Some(0));
    // The slow API times out after 200 ms; a second echo API points nowhere.
    if let marketgate::snapshot::Backend::Http {
        url_domain,
        timeout_ms,
        ..
    } = &mut snapshot.groups[0].apis[3].backend
    {
        *url_domain = slow.addr.to_string();
        *timeout_ms = 200;
    }
    snapshot.groups[1].apis[0].backend = http_to(closed, "/x", 2000).0;
    let gw = TestGateway::with(snapshot).await;
    let buyer = Buyer::new(gw.buyers);
    let signed = |key: &str, secret: &str, host: &str, path: &str| {
        signed_as(key, secret, request("GET", host, path, Bytes::new()))
    };

    let mut stale = request("GET", MARKET, "/v1/echo/1", Bytes::new());
    signed_at(
        KEY,
        SECRET,
        &mut stale,
        time::OffsetDateTime::now_utc() - Duration::from_secs(16 * 60),
    );
    let mut tampered = signed(KEY, SECRET, MARKET, "/v1/echo/1");
    *tampered.uri_mut() = "/v1/echo/2".parse().unwrap();

    let cases: Vec<(&str, http::Request<http_body_util::Full<Bytes>>, u16, &str)> = vec![
        (
            "unknown host",
            signed(KEY, SECRET, "nobody.test", "/v1/echo/1"),
            404,
            "APIG.0101",
        ),
        (
            "unlisted group",
            signed(KEY, SECRET, UNLISTED, "/v1/x"),
            404,
            "APIG.0101",
        ),
        (
            "no route",
            signed(KEY, SECRET, MARKET, "/v1/nothing"),
            404,
            "APIG.0101",
        ),
        (
            "private API on the market",
            signed(KEY, SECRET, MARKET, "/v1/private"),
            404,
            "APIG.0101",
        ),
        (
            "no credentials",
            request("GET", MARKET, "/v1/echo/1", Bytes::new()),
            401,
            "APIG.0303",
        ),
        (
            "unknown key",
            signed("nobody", SECRET, MARKET, "/v1/echo/1"),
            401,
            "APIG.0303",
        ),
        ("bad signature", tampered, 401, "APIG.0303"),
        ("expired date", stale, 401, "APIG.0303"),
        (
            "other group's app",
            signed("buyer-key-2", "buyer-secret-2", MARKET, "/v1/echo/1"),
            403,
            "APIG.0304",
        ),
        (
            "delisted",
            signed(KEY, SECRET, DELISTED, "/v1/x"),
            403,
            "APIG.0306",
        ),
        (
            "quota used up",
            signed(KEY, SECRET, MARKET, "/v1/echo/1"),
            405,
            "APIG.0501",
        ),
        (
            "frozen",
            signed("buyer-key-3", "buyer-secret-3", MARKET, "/v1/echo/1"),
            405,
            "APIG.0502",
        ),
        (
            "expired purchase",
            signed("buyer-key-4", "buyer-secret-4", MARKET, "/v1/echo/1"),
            405,
            "APIG.0502",
        ),
        (
            "backend refused",
            signed("buyer-key-2", "buyer-secret-2", OTHER_MARKET, "/v1/x"),
            502,
            "APIG.0201",
        ),
    ];
    for (name, request, status, code) in cases {
        let answer = buyer.send(request).await;
        assert_eq!(
            (answer.status.as_u16(), answer.code().as_str()),
            (status, code),
            "{name}"
        );
        assert!(answer.headers.contains_key("x-request-id"), "{name}");
    }
    assert_eq!(backend.hits(), 0, "nothing reached the backend");

    // Unlimited purchase (p2's group) for the timeout row.
    let mut later = market(2, backend.addr, None);
    if let marketgate::snapshot::Backend::Http {
        url_domain,
        timeout_ms,
        ..
    } = &mut later.groups[0].apis[3].backend
    {
        *url_domain = slow.addr.to_string();
        *timeout_ms = 200;
    }
    gw.gateway.apply_snapshot(later).unwrap();
    let answer = buyer.send(signed(KEY, SECRET, MARKET, "/v1/slow")).await;
    assert_eq!(
        (answer.status.as_u16(), answer.code().as_str()),
        (504, "APIG.0201")
    );

    // Body too large (413) and headers too large (431) and a bad request (400).
    let big = vec![b'x'; 13 * 1024 * 1024];
    let answer = buyer.signed("POST", MARKET, "/v1/echo/1", &big).await;
    assert_eq!(
        (answer.status.as_u16(), answer.code().as_str()),
        (413, "APIG.0201")
    );
    let huge_header = format!(
        "GET /v1/echo/1 HTTP/1.1\r\nHost: {MARKET}\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let head = raw(gw.buyers, huge_header.as_bytes()).await;
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
    // Past `max_header_bytes` (32 KiB) but within hyper's room (`listener::HEAD_ROOM`, 2x):
    // our own 431 and 414, with the APIG body and a request id (hyper's carry neither).
    for (head, status) in [
        (
            format!(
                "GET /v1/echo/1 HTTP/1.1\r\nHost: {MARKET}\r\nX-Big: {}\r\nconnection: close\r\n\r\n",
                "a".repeat(40 * 1024)
            ),
            "431",
        ),
        (
            format!(
                "GET /v1/echo/{} HTTP/1.1\r\nHost: {MARKET}\r\nconnection: close\r\n\r\n",
                "a".repeat(30 * 1024)
            ),
            "414",
        ),
    ] {
        let answer = raw_until_close(gw.buyers, head.as_bytes()).await;
        assert!(answer.starts_with(&format!("HTTP/1.1 {status}")), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("x-request-id: "),
            "{answer}"
        );
        assert!(answer.contains(r#""error_code":"APIG.0201""#), "{answer}");
    }
}

/// CL+TE together, in either order and any case: 400 with our error body (as Envoy and nginx
/// answer; hyper alone would serve it as chunked), nothing forwarded, and a request smuggled
/// behind the body never read. A plain chunked request is still served.
#[tokio::test]
async fn content_length_with_transfer_encoding_is_400() {
    let backend = Backend::echo().await;
    let gw = TestGateway::with(market(1, backend.addr, None)).await;
    let smuggled =
        format!("GET /v1/mock HTTP/1.1\r\nHost: {MARKET}\r\nX-Apig-AppCode: {CODE}\r\n\r\n");
    for lengths in [
        "Content-Length: 5\r\nTransfer-Encoding: chunked",
        "transfer-encoding: chunked\r\nCONTENT-LENGTH: 5",
    ] {
        let attack = format!(
            "POST /v1/mock HTTP/1.1\r\nHost: {MARKET}\r\nX-Apig-AppCode: {CODE}\r\n{lengths}\r\n\r\n0\r\n\r\n{smuggled}"
        );
        let all = raw_until_close(gw.buyers, attack.as_bytes()).await;
        assert_eq!(all.matches("HTTP/1.1 ").count(), 1, "{all}");
        assert!(all.starts_with("HTTP/1.1 400"), "{all}");
        assert!(all.contains(r#""error_code":"APIG.0201""#), "{all}");
        assert!(all.contains("Transfer-Encoding"), "{all}");
        assert!(all.to_ascii_lowercase().contains("x-request-id: "), "{all}");
    }
    assert_eq!(backend.hits(), 0);
    let chunked = format!(
        "POST /v1/echo/1 HTTP/1.1\r\nHost: {MARKET}\r\nX-Apig-AppCode: {CODE}\r\nTransfer-Encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    let answer = raw_until_close(gw.buyers, chunked.as_bytes()).await;
    assert!(!answer.starts_with("HTTP/1.1 400"), "{answer}");
}

/// Heads hyper refuses itself (one it cannot parse, one past its buffer) are answered with
/// our error body and a request id too.
#[tokio::test]
async fn hypers_own_rejections_carry_our_error_body() {
    let backend = Backend::echo().await;
    let gw = TestGateway::with(market(1, backend.addr, None)).await;
    for (head, status) in [
        (
            format!("GET /v1/echo/1 HTTP/1.1\r\nHost: {MARKET}\r\nbad header\r\n\r\n"),
            "400",
        ),
        ("GET /v1/echo/1 HTTP/9.9\r\n\r\n".to_owned(), "400"),
        (
            format!(
                "GET /v1/echo/1 HTTP/1.1\r\nHost: {MARKET}\r\nX-Big: {}\r\n\r\n",
                "a".repeat(80 * 1024)
            ),
            "431",
        ),
    ] {
        let whole = raw_answer(gw.buyers, head.as_bytes()).await;
        assert!(whole.starts_with(&format!("HTTP/1.1 {status}")), "{whole}");
        assert!(
            whole.to_ascii_lowercase().contains("x-request-id: "),
            "{whole}"
        );
        assert!(whole.contains(r#""error_code":"APIG.0201""#), "{whole}");
    }
    assert_eq!(backend.hits(), 0);
}

#[tokio::test]
async fn duplicate_host_and_conflicting_lengths_are_400() {
    let backend = Backend::echo().await;
    let gw = TestGateway::with(market(1, backend.addr, None)).await;
    let dup = format!("GET /v1/echo/1 HTTP/1.1\r\nHost: {MARKET}\r\nHost: {OTHER_MARKET}\r\n\r\n");
    let head = raw(gw.buyers, dup.as_bytes()).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    let two_lengths =
        format!("POST /v1/echo/1 HTTP/1.1\r\nHost: {MARKET}\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab");
    let head = raw(gw.buyers, two_lengths.as_bytes()).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert_eq!(backend.hits(), 0);
}

#[tokio::test]
async fn mock_answers_count_and_debug_headers_show_quota() {
    let backend = Backend::echo().await;
    let gw = TestGateway::with(market(1, backend.addr, Some(5))).await;
    let buyer = Buyer::new(gw.buyers);
    let mut request = signed_as(
        KEY,
        SECRET,
        request("PUT", MARKET, "/v1/mock/any/depth", Bytes::new()),
    );
    request
        .headers_mut()
        .insert("x-apig-mode", "debug".parse().unwrap());
    let answer = buyer.send(request).await;
    assert_eq!(answer.status, 200);
    assert_eq!(&answer.body[..], b"mocked");
    assert_eq!(answer.headers["x-apig-quota-remaining"], "4");
    assert!(answer.headers.contains_key("x-apig-latency"));
}

#[tokio::test]
async fn a_call_that_never_reached_the_backend_is_given_back() {
    let closed = closed_addr().await;
    let gw = TestGateway::with(market(1, closed, Some(3))).await;
    let buyer = Buyer::new(gw.buyers);
    let answer = buyer.signed("GET", MARKET, "/v1/echo/1", b"").await;
    assert_eq!(answer.status, 502);
    assert_eq!(gw.gateway.quota().get("p1").unwrap().used(), 0);
}

#[tokio::test]
async fn seller_domain_admits_authorized_apps_without_quota() {
    let backend = Backend::echo().await;
    let mut snapshot = market(1, backend.addr, Some(0));
    snapshot.app_auths.push(marketgate::snapshot::AppAuth {
        app_id: "a2".into(),
        api_id: "api-private".into(),
    });
    let gw = TestGateway::with(snapshot).await;
    let buyer = Buyer::new(gw.buyers);
    let ok = signed_as(
        "buyer-key-2",
        "buyer-secret-2",
        request("GET", SELLER, "/v1/private", Bytes::new()),
    );
    assert_eq!(buyer.send(ok).await.status, 200);
    let no = signed_as(
        KEY,
        SECRET,
        request("GET", SELLER, "/v1/private", Bytes::new()),
    );
    let answer = buyer.send(no).await;
    assert_eq!(
        (answer.status.as_u16(), answer.code().as_str()),
        (403, "APIG.0304")
    );
}

/// Each bad snapshot is refused with its field path; the last good one keeps serving.
#[tokio::test]
async fn bad_snapshots_are_refused_with_the_field_path_and_change_nothing() {
    let backend = Backend::echo().await;
    let gw = TestGateway::start().await;
    let good = market(5, backend.addr, None);
    let answer = push(gw.admin, body_of(&good), None).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let buyer = Buyer::new(gw.buyers);

    let mut corpus: Vec<(Vec<u8>, &str)> = Vec::new();
    let mut s = market(6, backend.addr, None);
    s.groups[1].id = "g1".into();
    corpus.push((body_of(&s), "groups[1].id"));
    let mut s = market(6, backend.addr, None);
    s.groups[1].url_domain = Some(MARKET.into());
    corpus.push((body_of(&s), "groups[1].url_domain"));
    let mut s = market(6, backend.addr, None);
    s.groups[0].apis[2].req_uri = "/v1/{a+}/b".into();
    corpus.push((body_of(&s), "groups[0].apis[2].req_uri"));
    let mut s = market(6, backend.addr, None);
    s.purchases[1].app_id = "ghost".into();
    corpus.push((body_of(&s), "purchases[1].app_id"));
    let mut s = market(6, backend.addr, None);
    s.purchases[0].group_id = "ghost".into();
    corpus.push((body_of(&s), "purchases[0].group_id"));
    let mut s = market(6, backend.addr, None);
    s.apps[2].app_key = KEY.into();
    corpus.push((body_of(&s), "apps[2].app_key"));
    let mut s = serde_json::to_value(market(6, backend.addr, None)).unwrap();
    s["purchases"][2]["quota_limit"] = serde_json::json!(-5);
    corpus.push((serde_json::to_vec(&s).unwrap(), "purchases[2].quota_limit"));
    let mut s = market(6, backend.addr, None);
    s.groups[0].apis[0].backend = http_to(backend.addr, "/echo/{nope}", 100).0;
    corpus.push((body_of(&s), "groups[0].apis[0].backend.req_uri"));
    let mut s = market(6, backend.addr, None);
    s.groups[2].apis[0].req_method = "FETCH".into();
    corpus.push((body_of(&s), "groups[2].apis[0].req_method"));

    for (body, path) in corpus {
        let answer = push(gw.admin, body, None).await;
        assert_eq!(answer.status, 400, "{path}: {:?}", answer.body);
        let message = answer.json()["error_msg"].as_str().unwrap().to_owned();
        assert!(message.contains(path), "{path} not in {message}");
        assert_eq!(gw.gateway.snapshot_version(), Some(5));
        assert_eq!(
            buyer.signed("GET", MARKET, "/v1/echo/1", b"").await.status,
            200
        );
    }
    // Not greater: 409. Unauthenticated: 401.
    assert_eq!(
        push(gw.admin, body_of(&market(5, backend.addr, None)), None)
            .await
            .status,
        409
    );
    let version = admin_get(gw.admin, "/v1/snapshot/version", true).await;
    assert_eq!(version.json()["version"], 5);
    assert_eq!(
        admin_get(gw.admin, "/v1/snapshot/version", false)
            .await
            .status,
        401
    );
}

#[tokio::test]
async fn compressed_pushes_are_accepted() {
    use std::io::Write;
    let backend = Backend::echo().await;
    let gw = TestGateway::start().await;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&body_of(&market(1, backend.addr, None)))
        .unwrap();
    assert_eq!(
        push(gw.admin, gz.finish().unwrap(), Some("gzip"))
            .await
            .status,
        200
    );
    let zstd = zstd::encode_all(&body_of(&market(2, backend.addr, None))[..], 1).unwrap();
    assert_eq!(push(gw.admin, zstd, Some("zstd")).await.status, 200);
    assert_eq!(gw.gateway.snapshot_version(), Some(2));
    assert_eq!(admin_get(gw.admin, "/readyz", false).await.status, 200);
}

#[tokio::test]
async fn pushes_over_max_snapshot_bytes_are_413_as_sent_or_decompressed() {
    use std::io::Write;
    let backend = Backend::echo().await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let gw = TestGateway::start_in(dir, "[proxy]\nmax_snapshot_bytes = 4096\n").await;
    let small = body_of(&market(1, backend.addr, None));
    assert!(small.len() <= 4096, "the test market fits: {}", small.len());
    assert_eq!(push(gw.admin, small, None).await.status, 200);

    let mut large = market(2, backend.addr, None);
    large.groups[0].name = "x".repeat(5000);
    let large = body_of(&large);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&large).unwrap();
    let gzipped = gz.finish().unwrap();
    assert!(gzipped.len() <= 4096, "compressed it fits as sent");
    for (body, encoding) in [(large, None), (gzipped, Some("gzip"))] {
        let answer = push(gw.admin, body, encoding).await;
        assert_eq!(answer.status, 413, "{encoding:?}: {:?}", answer.body);
        assert_eq!(answer.json()["error_code"], "APIG.2000");
        let message = answer.json()["error_msg"].as_str().unwrap().to_owned();
        assert!(
            message.contains("proxy.max_snapshot_bytes (4096 bytes)"),
            "{message}"
        );
        assert_eq!(gw.gateway.snapshot_version(), Some(1));
    }
}

#[tokio::test]
async fn the_last_good_snapshot_is_served_after_a_restart_and_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let backend = Backend::echo().await;
    let gw = TestGateway::with(market(3, backend.addr, None)).await;
    let dir = gw.stop().await;
    let mode = std::fs::metadata(dir.path().join("snapshot.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let again = TestGateway::start_in(dir, "").await;
    assert_eq!(again.gateway.snapshot_version(), Some(3));
    let answer = Buyer::new(again.buyers)
        .signed("GET", MARKET, "/v1/echo/1", b"")
        .await;
    assert_eq!(answer.status, 200);
}

async fn hammer(buyer: &Buyer, clients: usize, calls_each: usize) -> (u64, u64) {
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let buyer = buyer.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut exhausted) = (0, 0);
            for _ in 0..calls_each {
                let answer = buyer.signed("GET", MARKET, "/v1/echo/1", b"").await;
                match answer.status.as_u16() {
                    200 => ok += 1,
                    405 => exhausted += 1,
                    other => panic!("unexpected {other}: {:?}", answer.body),
                }
            }
            (ok, exhausted)
        }));
    }
    let mut total = (0, 0);
    for task in tasks {
        let (ok, exhausted) = task.await.unwrap();
        total.0 += ok;
        total.1 += exhausted;
    }
    total
}

/// 64 concurrent clients; the backend receives exactly Q calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quota_is_exact_under_concurrency() {
    for quota in [0u64, 1, 1000] {
        let backend = Backend::echo().await;
        let gw = TestGateway::with(market(1, backend.addr, Some(quota))).await;
        let buyer = Buyer::new(gw.buyers);
        let calls_each = (quota as usize / 64) + 3;
        let (ok, exhausted) = hammer(&buyer, 64, calls_each).await;
        assert_eq!(ok, quota, "Q={quota}");
        assert_eq!(backend.hits(), quota, "Q={quota}");
        assert_eq!(ok + exhausted, 64 * calls_each as u64);
    }
}

/// A restart (clean or not) never grants a served call again.
#[tokio::test]
async fn quota_survives_restarts_and_swaps() {
    let backend = Backend::echo().await;
    let gw = TestGateway::with(market(1, backend.addr, Some(10))).await;
    let buyer = Buyer::new(gw.buyers);
    for _ in 0..4 {
        assert_eq!(
            buyer.signed("GET", MARKET, "/v1/echo/1", b"").await.status,
            200
        );
    }
    // A new snapshot keeps the counter.
    gw.gateway
        .apply_snapshot(market(2, backend.addr, Some(10)))
        .unwrap();
    assert_eq!(gw.gateway.quota().get("p1").unwrap().used(), 4);
    // Simulated crash: no flush, the gateway dropped.
    let dir = gw.dir.clone();
    drop(gw);
    let again = TestGateway::start_in(dir, "").await;
    let buyer = Buyer::new(again.buyers);
    let (ok, _) = {
        let mut ok = 0;
        for _ in 0..12 {
            if buyer.signed("GET", MARKET, "/v1/echo/1", b"").await.status == 200 {
                ok += 1;
            }
        }
        (ok, ())
    };
    assert!(
        ok <= 6,
        "at most the 6 unserved calls are granted, got {ok}"
    );
    assert!(backend.hits() <= 10);
    // A clean stop loses nothing.
    let used = again.gateway.quota().get("p1").unwrap().used();
    let dir = again.stop().await;
    let third = TestGateway::start_in(dir, "").await;
    assert_eq!(third.gateway.quota().get("p1").unwrap().used(), used);
}

/// Snapshots swapped under load: no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_swaps_under_load_fail_no_request() {
    let backend = Backend::echo().await;
    let gw = TestGateway::with(market(1, backend.addr, None)).await;
    let buyer = Buyer::new(gw.buyers);
    let load = tokio::spawn({
        let buyer = buyer.clone();
        async move { hammer(&buyer, 16, 40).await }
    });
    for version in 2..=30 {
        let mut snapshot = market(version, backend.addr, None);
        snapshot.purchases[2].state = if version % 2 == 0 {
            PurchaseState::Active
        } else {
            PurchaseState::Frozen
        };
        assert_eq!(push(gw.admin, body_of(&snapshot), None).await.status, 200);
    }
    let (ok, exhausted) = load.await.unwrap();
    assert_eq!((ok, exhausted), (640, 0));
}

#[tokio::test]
async fn metrics_count_by_group_and_outcome_behind_the_token() {
    let backend = Backend::echo().await;
    let gw = TestGateway::with(market(1, backend.addr, Some(1))).await;
    let buyer = Buyer::new(gw.buyers);
    buyer.signed("GET", MARKET, "/v1/echo/1", b"").await;
    buyer.signed("GET", MARKET, "/v1/echo/1", b"").await;
    buyer.get("nobody.test", "/").await;
    assert_eq!(admin_get(gw.admin, "/metrics", false).await.status, 401);
    let text =
        String::from_utf8(admin_get(gw.admin, "/metrics", true).await.body.to_vec()).unwrap();
    assert!(
        text.contains("marketgate_requests_total{group=\"g1\",outcome=\"ok\"} 1"),
        "{text}"
    );
    assert!(text.contains("marketgate_requests_total{group=\"g1\",outcome=\"quota_exhausted\"} 1"));
    assert!(text.contains("marketgate_requests_total{group=\"\",outcome=\"no_route\"} 1"));
    assert!(text.contains("marketgate_snapshot_version 1"));
    let usage = admin_get(gw.admin, "/v1/usage", true).await.json();
    let p1 = usage["purchases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["purchase_id"] == "p1")
        .unwrap()
        .clone();
    assert_eq!(
        (p1["used"].as_u64(), p1["left"].as_u64()),
        (Some(1), Some(0))
    );
}

/// Shutdown stops accepting, lets the call in flight finish, then flushes quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_calls_in_flight() {
    let backend = Backend::with_delay(Duration::from_millis(300)).await;
    let gw = TestGateway::with(market(1, backend.addr, Some(10))).await;
    let buyers = gw.buyers;
    let buyer = Buyer::new(buyers);
    let call = tokio::spawn(async move { buyer.signed("GET", MARKET, "/v1/echo/1", b"").await });
    while backend.hits() == 0 {
        tokio::task::yield_now().await;
    }
    let dir = gw.stop().await;
    assert_eq!(call.await.unwrap().status, 200);
    assert!(tokio::net::TcpStream::connect(buyers).await.is_err());
    let again = TestGateway::start_in(dir, "").await;
    assert_eq!(again.gateway.quota().get("p1").unwrap().used(), 1);
}

#[tokio::test]
async fn long_uris_are_414_and_slow_heads_are_cut_off() {
    let backend = Backend::echo().await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let gw = TestGateway::start_in(dir, "[gateway]\nheader_read_timeout_ms = 200\n").await;
    gw.gateway
        .apply_snapshot(market(1, backend.addr, None))
        .unwrap();
    let answer = Buyer::new(gw.buyers)
        .get(MARKET, &format!("/v1/echo/{}", "a".repeat(9000)))
        .await;
    assert_eq!(
        (answer.status.as_u16(), answer.code().as_str()),
        (414, "APIG.0201")
    );
    // Slowloris: half a request head, then silence; the gateway closes the connection.
    let partial = format!("GET /v1/echo/1 HTTP/1.1\r\nHost: {MARKET}\r\nX-Slow: ");
    let answer = raw_until_close(gw.buyers, partial.as_bytes()).await;
    assert!(!answer.contains("200 OK"), "{answer}");
    assert_eq!(backend.hits(), 0);
}
