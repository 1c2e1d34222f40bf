//! Heap allocations per served request: a counting global allocator around a real gateway
//! on loopback (a hyper backend, the gateway's accept loop on a current-thread runtime of its
//! own, one keep-alive client), sequential requests.
//!
//! Decision it informs: what the served path allocates beyond what hyper needs (request id,
//! backend URI, header values, boxed bodies), so that each cut is counted, not guessed. The
//! allocator counts the whole process, so the same requests are also sent straight to the
//! backend and that count is subtracted: what is left is the gateway's own share (its hyper
//! server and client included). Results: BENCHMARKS.md.
//!
//! Run: `cargo bench --bench allocations` (add `--profile dev` for a quick count; the
//! figures are nearly the same).

use std::alloc::System;
use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use marketgate::config::Config;
use marketgate::gateway::Gateway;
use marketgate::shutdown::{Shutdown, ShutdownTrigger};
use marketgate::signing::{self, Payload, RequestParts};
use marketgate::snapshot::wire::{
    Api, App, Backend, Group, MarketState, Purchase, PurchaseState, Snapshot,
};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Requests measured per row (after as many again to warm up).
const REQUESTS: usize = 5_000;
const KEY: &str = "alloc-bench-key";
const SECRET: &str = "alloc-bench-secret";
const MARKET_HOST: &str = "market.alloc.bench";
const PLAIN_HOST: &str = "plain.alloc.bench";

fn api(id: &str, uri: &str, auth: &str, backend: SocketAddr) -> Api {
    Api {
        id: id.into(),
        name: id.into(),
        api_type: 1,
        req_protocol: "HTTP".into(),
        req_method: "GET".into(),
        req_uri: uri.into(),
        match_mode: "NORMAL".into(),
        auth_type: auth.into(),
        app_code_auth: false,
        backend: Backend::Http {
            req_protocol: "HTTP".into(),
            req_method: "GET".into(),
            req_uri: "/".into(),
            url_domain: backend.to_string(),
            timeout_ms: 5000,
        },
    }
}

fn market(backend: SocketAddr) -> Snapshot {
    Snapshot {
        version: 1,
        groups: vec![Group {
            id: "g1".into(),
            name: "bench".into(),
            sl_domain: PLAIN_HOST.into(),
            url_domain: Some(MARKET_HOST.into()),
            market_state: MarketState::OnSale,
            apis: vec![
                api("enforced", "/enforced", "APP", backend),
                api("plain", "/plain", "NONE", backend),
            ],
        }],
        apps: vec![App {
            id: "app1".into(),
            app_key: KEY.into(),
            app_secret: SECRET.into(),
            app_codes: vec![],
            creator: "MARKET".into(),
        }],
        purchases: vec![Purchase {
            id: "p1".into(),
            group_id: "g1".into(),
            app_id: "app1".into(),
            state: PurchaseState::Active,
            start_time: 0,
            expire_time: i64::MAX,
            quota_limit: Some(1_000_000_000_000),
            quota_used: 0,
        }],
        ..Snapshot::default()
    }
}

/// A backend answering `200` with a 64-byte JSON body, as the load script's nginx does.
async fn backend(listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|_req: Request<Incoming>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                    br#"{"status":"ok","service":"backend","payload":"0123456789abcdef"}"#,
                ))))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Runs `future` on a current-thread runtime on a thread of its own.
fn on_thread<F>(name: &str, future: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime")
                .block_on(future)
        })
        .expect("a thread");
}

/// Sends `count` requests with `headers` to `addr` on one keep-alive connection.
async fn send(addr: SocketAddr, path: &str, headers: &[(String, String)], count: usize) {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    for _ in 0..count {
        let mut request = Request::builder().uri(path);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let response = sender
            .send_request(request.body(Full::new(Bytes::new())).unwrap())
            .await
            .expect("an answer");
        assert_eq!(response.status(), 200, "the bench request is admitted");
        let _ = response.into_body().collect().await;
    }
}

/// Allocations per request: `count` requests to `addr`, after as many to warm up.
fn allocations(
    client: &tokio::runtime::Runtime,
    addr: SocketAddr,
    path: &str,
    headers: &[(String, String)],
) -> f64 {
    client.block_on(send(addr, path, headers, REQUESTS));
    let region = Region::new(GLOBAL);
    client.block_on(send(addr, path, headers, REQUESTS));
    region.change().allocations as f64 / REQUESTS as f64
}

fn signed_headers() -> Vec<(String, String)> {
    let date = signing::format_sdk_date(time::OffsetDateTime::now_utc());
    let mut headers = http::HeaderMap::new();
    headers.insert("host", MARKET_HOST.parse().unwrap());
    headers.insert("x-sdk-date", date.parse().unwrap());
    let parts = RequestParts {
        method: "GET",
        path: "/enforced",
        query: None,
        headers: &headers,
        authority: None,
        payload: Payload::Body(b""),
    };
    let authorization =
        signing::sign(KEY, SECRET.as_bytes(), &parts, &["host", "x-sdk-date"]).unwrap();
    vec![
        ("host".into(), MARKET_HOST.into()),
        ("x-sdk-date".into(), date),
        ("authorization".into(), authorization),
    ]
}

fn main() {
    let backend_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    backend_listener.set_nonblocking(true).unwrap();
    let backend_addr = backend_listener.local_addr().unwrap();
    on_thread("backend", async move {
        backend(tokio::net::TcpListener::from_std(backend_listener).unwrap()).await
    });

    let dir = tempfile::tempdir().unwrap();
    let config = Config::from_toml(
        &format!(
            "data_dir = '{}'\n[admin]\ntoken = 'alloc-bench-token'\n[log]\nlevel = 'warn'\n",
            dir.path().display()
        ),
        Vec::new(),
    )
    .unwrap();
    let gateway = Gateway::open(&config).unwrap();
    gateway.apply_snapshot(market(backend_addr)).unwrap();
    let gateway_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    gateway_listener.set_nonblocking(true).unwrap();
    let gateway_addr = gateway_listener.local_addr().unwrap();
    let (_trigger, shutdown): (ShutdownTrigger, Shutdown) = ShutdownTrigger::new();
    {
        let gateway = gateway.clone();
        on_thread("gateway", async move {
            let listener = tokio::net::TcpListener::from_std(gateway_listener).unwrap();
            gateway.serve_buyers(listener, shutdown).await
        });
    }

    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let plain = [("host".to_owned(), PLAIN_HOST.to_owned())];
    let signed = signed_headers();
    let direct = allocations(&client, backend_addr, "/", &plain);
    let through_plain = allocations(&client, gateway_addr, "/plain", &plain);
    let through_signed = allocations(&client, gateway_addr, "/enforced", &signed);
    println!("allocations per request ({REQUESTS} sequential requests on one connection):");
    println!("  client -> backend directly:                 {direct:.2}");
    println!(
        "  through the gateway, plain (NONE auth):     {through_plain:.2} (gateway's own: {:.2})",
        through_plain - direct
    );
    println!(
        "  through the gateway, HMAC-signed + quota:   {through_signed:.2} (gateway's own: {:.2})",
        through_signed - direct
    );
}
