//! Scenario helpers for the data-plane tests: a gateway on 127.0.0.1:0 with its own data
//! dir, in-process backends that count what they receive, a market snapshot, and a buyer
//! client that signs with the crate's signer.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use marketgate::config::Config;
use marketgate::gateway::Gateway;
use marketgate::shutdown::ShutdownTrigger;
use marketgate::signing::{self, Payload, RequestParts};
use marketgate::snapshot::*;
use tokio::net::TcpListener;

pub const ADMIN_TOKEN: &str = "test-admin-token";
pub const MARKET: &str = "market.test";
pub const SELLER: &str = "g1.sl.test";
pub const OTHER_MARKET: &str = "other.test";
pub const DELISTED: &str = "delisted.test";
pub const UNLISTED: &str = "unlisted.test";
pub const KEY: &str = "buyer-key-1";
pub const SECRET: &str = "buyer-secret-1";
pub const CODE: &str = "buyer-appcode-1-0123456789";

/// What a backend saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// An in-process backend that counts and records requests.
pub struct Backend {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    _trigger: ShutdownTrigger,
}

impl Backend {
    /// Answers 200 with body `echo` after `delay`.
    pub async fn with_delay(delay: Duration) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (trigger, shutdown) = ShutdownTrigger::new();
        let (h, s) = (hits.clone(), seen.clone());
        tokio::spawn(async move {
            let stop = shutdown.wait();
            tokio::pin!(stop);
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => r.unwrap(),
                    _ = &mut stop => break,
                };
                let (h, s) = (h.clone(), s.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (h, s) = (h.clone(), s.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.unwrap().to_bytes();
                            h.fetch_add(1, Ordering::SeqCst);
                            s.lock().unwrap().push(Seen {
                                method: parts.method.to_string(),
                                uri: parts.uri.to_string(),
                                headers: parts.headers.clone(),
                                body,
                            });
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                                b"echo",
                            ))))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Backend {
            addr,
            hits,
            seen,
            _trigger: trigger,
        }
    }

    pub async fn echo() -> Backend {
        Self::with_delay(Duration::ZERO).await
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("backend saw a request")
    }
}

/// An address where nothing listens (bound, then closed).
pub async fn closed_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

fn api(id: &str, method: &str, uri: &str, backend: Backend_) -> Api {
    Api {
        id: id.into(),
        name: id.into(),
        api_type: 1,
        req_protocol: "BOTH".into(),
        req_method: method.into(),
        req_uri: uri.into(),
        match_mode: "NORMAL".into(),
        auth_type: "APP".into(),
        app_code_auth: true,
        backend: backend.0,
    }
}

/// Wrapper so fixtures read `http_to(addr, "/echo/{id}")`.
pub struct Backend_(pub wire::Backend);

pub fn http_to(addr: SocketAddr, uri: &str, timeout_ms: u64) -> Backend_ {
    Backend_(wire::Backend::Http {
        req_protocol: "HTTP".into(),
        req_method: "ANY".into(),
        req_uri: uri.into(),
        url_domain: addr.to_string(),
        timeout_ms,
    })
}

pub fn app(id: &str, key: &str, secret: &str, codes: &[&str]) -> App {
    App {
        id: id.into(),
        app_key: key.into(),
        app_secret: secret.into(),
        app_codes: codes.iter().map(|c| (*c).to_owned()).collect(),
        creator: "MARKET".into(),
    }
}

pub fn purchase(
    id: &str,
    group: &str,
    app: &str,
    state: PurchaseState,
    quota: Option<u64>,
) -> Purchase {
    Purchase {
        id: id.into(),
        group_id: group.into(),
        app_id: app.into(),
        state,
        start_time: 0,
        expire_time: 4_000_000_000,
        quota_limit: quota,
        quota_used: 0,
    }
}

/// The market of the tests: group g1 on sale at `market.test` with an echo API to
/// `backend`, a MOCK API, a slow-backend API, an unreachable-backend API and a private API;
/// group g2 on sale at `other.test`; g3 delisted; g4 unlisted. App a1 (key `KEY`) bought
/// g1 with `quota` calls; a2 bought g2; a3's purchase of g1 is frozen; a4's expired.
pub fn market(version: u64, backend: SocketAddr, quota: Option<u64>) -> Snapshot {
    let mut private = api(
        "api-private",
        "GET",
        "/v1/private",
        http_to(backend, "/private", 2000),
    );
    private.api_type = 2;
    let mut swa = api(
        "api-mock",
        "ANY",
        "/v1/mock",
        Backend_(wire::Backend::Mock {
            status: 200,
            body: "mocked".into(),
        }),
    );
    swa.match_mode = "SWA".into();
    let g1 = Group {
        id: "g1".into(),
        name: "weather".into(),
        sl_domain: SELLER.into(),
        url_domain: Some(MARKET.into()),
        market_state: MarketState::OnSale,
        apis: vec![
            api(
                "api-echo",
                "ANY",
                "/v1/echo/{id}",
                http_to(backend, "/echo/{id}", 2000),
            ),
            swa,
            private,
            api(
                "api-slow",
                "GET",
                "/v1/slow",
                http_to(backend, "/slow", 2000),
            ),
        ],
    };
    let simple_group = |id: &str, sl: &str, url: &str, state: MarketState| Group {
        id: id.into(),
        name: id.into(),
        sl_domain: sl.into(),
        url_domain: Some(url.into()),
        market_state: state,
        apis: vec![api(
            &format!("api-{id}"),
            "GET",
            "/v1/x",
            http_to(backend, "/x", 2000),
        )],
    };
    let mut expired = purchase("p4", "g1", "a4", PurchaseState::Active, None);
    expired.expire_time = 1;
    Snapshot {
        version,
        generated_at: None,
        groups: vec![
            g1,
            simple_group("g2", "g2.sl.test", OTHER_MARKET, MarketState::OnSale),
            simple_group("g3", "g3.sl.test", DELISTED, MarketState::Delisted),
            simple_group("g4", "g4.sl.test", UNLISTED, MarketState::Unlisted),
        ],
        apps: vec![
            app("a1", KEY, SECRET, &[CODE]),
            app("a2", "buyer-key-2", "buyer-secret-2", &[]),
            app("a3", "buyer-key-3", "buyer-secret-3", &[]),
            app("a4", "buyer-key-4", "buyer-secret-4", &[]),
        ],
        purchases: vec![
            purchase("p1", "g1", "a1", PurchaseState::Active, quota),
            purchase("p2", "g2", "a2", PurchaseState::Active, None),
            purchase("p3", "g1", "a3", PurchaseState::Frozen, None),
            expired,
        ],
        app_auths: vec![],
        certificates: vec![],
        domains: vec![],
        throttling: Default::default(),
    }
}

/// A gateway serving buyers and its admin API on 127.0.0.1:0.
pub struct TestGateway {
    pub gateway: Gateway,
    pub buyers: SocketAddr,
    pub admin: SocketAddr,
    pub dir: Arc<tempfile::TempDir>,
    trigger: Option<ShutdownTrigger>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

pub fn config(dir: &std::path::Path, extra: &str) -> Config {
    let text = format!(
        "data_dir = '{}'\n[admin]\ntoken = '{ADMIN_TOKEN}'\n{extra}",
        dir.display()
    );
    Config::from_toml(&text, Vec::new()).unwrap()
}

impl TestGateway {
    pub async fn start() -> TestGateway {
        Self::start_in(Arc::new(tempfile::tempdir().unwrap()), "").await
    }

    pub async fn with(snapshot: Snapshot) -> TestGateway {
        let gw = Self::start().await;
        gw.gateway.apply_snapshot(snapshot).unwrap();
        gw
    }

    pub async fn start_in(dir: Arc<tempfile::TempDir>, extra: &str) -> TestGateway {
        let config = config(dir.path(), extra);
        let gateway = Gateway::open(&config).unwrap();
        Self::serve(gateway, dir).await
    }

    /// A gateway whose quota is leased (the lease client is the test's to start).
    pub async fn start_leased(dir: Arc<tempfile::TempDir>, extra: &str) -> TestGateway {
        let config = config(dir.path(), extra);
        let gateway =
            Gateway::open_with_quota(&config, marketgate::gateway::quota::QuotaMode::Leased)
                .unwrap();
        Self::serve(gateway, dir).await
    }

    async fn serve(gateway: Gateway, dir: Arc<tempfile::TempDir>) -> TestGateway {
        let buyers_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let buyers = buyers_listener.local_addr().unwrap();
        let admin = admin_listener.local_addr().unwrap();
        let (trigger, shutdown) = ShutdownTrigger::new();
        let mut tasks = Vec::new();
        let g = gateway.clone();
        let s = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            g.serve_buyers(buyers_listener, s).await
        }));
        let router = gateway.admin_router();
        tasks.push(tokio::spawn(async move {
            axum::serve(admin_listener, router)
                .with_graceful_shutdown(shutdown.wait())
                .await
                .unwrap()
        }));
        TestGateway {
            gateway,
            buyers,
            admin,
            dir,
            trigger: Some(trigger),
            tasks,
        }
    }

    /// Stops serving without flushing anything: what a kill -9 leaves on disk.
    pub async fn crash(mut self) -> Arc<tempfile::TempDir> {
        if let Some(trigger) = self.trigger.take() {
            trigger.fire();
        }
        for task in self.tasks.drain(..) {
            task.abort();
        }
        self.dir.clone()
    }

    /// Stops accepting, drains, flushes quota.
    pub async fn stop(mut self) -> Arc<tempfile::TempDir> {
        if let Some(trigger) = self.trigger.take() {
            trigger.fire();
        }
        for task in self.tasks.drain(..) {
            task.await.unwrap();
        }
        self.gateway.flush().unwrap();
        self.dir.clone()
    }
}

/// A buyer's HTTP client.
#[derive(Clone)]
pub struct Buyer {
    client: Client<HttpConnector, Full<Bytes>>,
    pub gateway: SocketAddr,
}

/// A finished response.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    pub fn code(&self) -> String {
        self.json()["error_code"].as_str().unwrap_or("").to_owned()
    }
}

impl Buyer {
    pub fn new(gateway: SocketAddr) -> Buyer {
        Buyer {
            client: Client::builder(TokioExecutor::new()).build_http(),
            gateway,
        }
    }

    /// Sends `request` (its URI a path; `host` goes in the Host header).
    pub async fn send(&self, request: Request<Full<Bytes>>) -> Answer {
        self.try_send(request).await.expect("the gateway answers")
    }

    /// Like [`Buyer::send`], but a gateway that is gone (refused, reset) is an error, not a
    /// panic: for tests that kill one.
    pub async fn try_send(
        &self,
        mut request: Request<Full<Bytes>>,
    ) -> Result<Answer, Box<dyn std::error::Error + Send + Sync>> {
        let path = request.uri().path_and_query().unwrap().as_str().to_owned();
        *request.uri_mut() = format!("http://{}{path}", self.gateway).parse().unwrap();
        let response = self.client.request(request).await?;
        let (parts, body) = response.into_parts();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await?.to_bytes(),
        })
    }

    pub async fn get(&self, host: &str, path: &str) -> Answer {
        self.send(request("GET", host, path, Bytes::new())).await
    }

    pub async fn signed(&self, method: &str, host: &str, path: &str, body: &[u8]) -> Answer {
        self.send(signed_as(
            KEY,
            SECRET,
            request(method, host, path, Bytes::copy_from_slice(body)),
        ))
        .await
    }
}

pub fn request(method: &str, host: &str, path: &str, body: Bytes) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .body(Full::new(body))
        .unwrap()
}

/// Signs a request built by [`request`] with `key`/`secret` (host and x-sdk-date signed).
pub fn signed_as(
    key: &str,
    secret: &str,
    mut request: Request<Full<Bytes>>,
) -> Request<Full<Bytes>> {
    signed_at(key, secret, &mut request, time::OffsetDateTime::now_utc());
    request
}

pub fn signed_at(
    key: &str,
    secret: &str,
    request: &mut Request<Full<Bytes>>,
    at: time::OffsetDateTime,
) {
    let date = signing::format_sdk_date(at);
    request
        .headers_mut()
        .insert("x-sdk-date", date.parse().unwrap());
    let body = futures_body(request);
    let authorization = {
        let parts = RequestParts {
            method: request.method().as_str(),
            path: request.uri().path(),
            query: request.uri().query(),
            headers: request.headers(),
            authority: None,
            payload: Payload::Body(&body),
        };
        signing::sign(key, secret.as_bytes(), &parts, &["host", "x-sdk-date"]).unwrap()
    };
    request
        .headers_mut()
        .insert("authorization", authorization.parse().unwrap());
}

fn futures_body(request: &Request<Full<Bytes>>) -> Bytes {
    // Full<Bytes> holds its bytes; clone and collect synchronously.
    let body = request.body().clone();
    futures_util::FutureExt::now_or_never(body.collect())
        .expect("Full is ready")
        .unwrap()
        .to_bytes()
}

/// Pushes a JSON snapshot to the admin API.
pub async fn push(admin: SocketAddr, body: Vec<u8>, encoding: Option<&str>) -> Answer {
    let mut builder = Request::builder()
        .method("PUT")
        .uri(format!("http://{admin}/v1/snapshot"))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .header("content-type", "application/json");
    if let Some(encoding) = encoding {
        builder = builder.header("content-encoding", encoding);
    }
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let response = client
        .request(builder.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// GET on the admin API, with or without the token.
pub async fn admin_get(admin: SocketAddr, path: &str, token: bool) -> Answer {
    let mut builder = Request::builder().uri(format!("http://{admin}{path}"));
    if token {
        builder = builder.header("x-admin-token", ADMIN_TOKEN);
    }
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let response = client
        .request(builder.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// Writes raw bytes on a fresh connection and returns what came back until close or the
/// first complete response head.
pub async fn raw(gateway: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(gateway).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                if out.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Writes raw bytes and reads one whole answer: its head and a body of its Content-Length
/// (whatever came before EOF, an error or 5 s). For answers the server closes on while the
/// client is still sending (a head past hyper's buffer), where reading to the end may meet a
/// reset.
pub async fn raw_answer(gateway: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(gateway).await.unwrap();
    let _ = stream.write_all(bytes).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if out.len() >= end + 4 + length {
                break;
            }
        }
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Writes raw bytes and reads everything until the gateway closes the connection.
pub async fn raw_until_close(gateway: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(gateway).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the gateway kept the connection open");
    String::from_utf8_lossy(&out).into_owned()
}
