//! Control-plane test harness: a `ControlPlane` on a real socket (127.0.0.1:0) over a fresh
//! SQLite file or a fresh PostgreSQL database, and a small JSON client that speaks to it with
//! tokens or SDK-HMAC signatures.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use marketgate::config::Config;
use marketgate::control::ControlPlane;
use marketgate::shutdown::ShutdownTrigger;
use serde_json::Value;

pub const INSTANCE: &str = "inst-1";
pub const MARKET_TOKEN: &str = "market-token";
pub const SELLER_TOKEN: &str = "seller-token";
pub const BUYER_TOKEN: &str = "buyer-token";
pub const SELLER_DOMAIN: &str = "seller-d";
pub const SELLER_PROJECT: &str = "seller-p";
pub const BUYER_DOMAIN: &str = "buyer-d";
pub const BUYER_PROJECT: &str = "buyer-p";
pub const SELLER_AK: &str = "SELLERAK00000001";
pub const SELLER_SK: &str = "seller-secret-key";

/// Where the store lives.
#[derive(Debug, Clone)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// URL of the PostgreSQL server the tests use (CI and every session: trust auth).
pub const POSTGRES_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

impl Backend {
    /// SQLite always; PostgreSQL when reachable (else says clearly that it was skipped).
    pub async fn all() -> Vec<Backend> {
        let url = std::env::var("MARKETGATE_TEST_POSTGRES").unwrap_or(POSTGRES_ADMIN_URL.into());
        let reachable = tokio::time::timeout(
            std::time::Duration::from_secs(3),
            tokio_postgres::connect(&url, tokio_postgres::NoTls),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        if reachable {
            drop_stale_databases(&url).await;
            vec![Backend::Sqlite, Backend::Postgres]
        } else {
            eprintln!(
                "PostgreSQL not reachable at {url}: the PostgreSQL half of this test was SKIPPED"
            );
            vec![Backend::Sqlite]
        }
    }

    /// A fresh, empty database: its `database_url`.
    pub async fn fresh_database(&self, dir: &std::path::Path) -> String {
        match self {
            Backend::Sqlite => format!("sqlite://{}", dir.join("marketgate.db").display()),
            Backend::Postgres => {
                let url =
                    std::env::var("MARKETGATE_TEST_POSTGRES").unwrap_or(POSTGRES_ADMIN_URL.into());
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .expect("postgres connects");
                tokio::spawn(conn);
                let name = format!(
                    "mg_{}_{}{}",
                    time::OffsetDateTime::now_utc().unix_timestamp(),
                    run_tag(),
                    &uuid::Uuid::new_v4().simple().to_string()[..12]
                );
                client
                    .batch_execute(&format!("CREATE DATABASE {name}"))
                    .await
                    .expect("create database");
                let base = url.rsplit_once('/').map(|(b, _)| b).unwrap_or(&url);
                format!("{base}/{name}")
            }
        }
    }
}

/// Waits (polling, at most 10 s) until some session of `client`'s database waits for a lock:
/// a statement that reached a lock another session holds. Panics with `what` otherwise.
pub async fn a_session_waits_for_a_lock(client: &tokio_postgres::Client, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let waiting: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// The run's tag in database names (`MG_TEST_RUN`, lower-case letters and digits only), set
/// by `tests/run.sh` so that it drops this run's databases when it ends, and nobody else's.
fn run_tag() -> String {
    std::env::var("MG_TEST_RUN")
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Test databases older than this are dropped by later runs, in seconds.
const STALE_DATABASE_SECS: i64 = 3600;

/// Drops test databases (`mg_{epoch}_{id}`) left by runs over an hour ago; parallel tests'
/// fresh databases are never touched.
async fn drop_stale_databases(url: &str) {
    let Ok((client, conn)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await else {
        return;
    };
    tokio::spawn(conn);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let Ok(rows) = client
        .query(
            "SELECT datname FROM pg_database WHERE datname LIKE 'mg\\_%'",
            &[],
        )
        .await
    else {
        return;
    };
    for row in rows {
        let name: String = row.get(0);
        let created = name
            .split('_')
            .nth(1)
            .and_then(|secs| secs.parse::<i64>().ok());
        if created.is_some_and(|secs| now - secs > STALE_DATABASE_SECS) {
            let _ = client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
        }
    }
}

/// The TOML of a test config on `database_url`.
pub fn config_toml(database_url: &str, listen: &str) -> String {
    format!(
        r#"instance_id = "{INSTANCE}"
database_url = "{database_url}"
[control]
listen = "{listen}"
[[control.tokens]]
token = "{MARKET_TOKEN}"
domain_id = "market"
project_id = "market"
role = "market"
[[control.tokens]]
token = "{SELLER_TOKEN}"
domain_id = "{SELLER_DOMAIN}"
project_id = "{SELLER_PROJECT}"
role = "tenant"
[[control.tokens]]
token = "{BUYER_TOKEN}"
domain_id = "{BUYER_DOMAIN}"
project_id = "{BUYER_PROJECT}"
role = "tenant"
[[control.credentials]]
access_key = "{SELLER_AK}"
secret_key = "{SELLER_SK}"
domain_id = "{SELLER_DOMAIN}"
project_id = "{SELLER_PROJECT}"
role = "tenant"
[admin]
listen = "127.0.0.1:0"
token = "admin-token"
[log]
format = "json"
"#
    )
}

/// Writes `dir/serve.toml` for a `marketgate serve` on free loopback ports with `data_dir`
/// `data` and a SQLite store in it (the test tokens, the gateway's admin token), then `extra`
/// (whole sections); returns its path.
pub fn write_serve_config(
    dir: &std::path::Path,
    data: &std::path::Path,
    extra: &str,
) -> std::path::PathBuf {
    let db = data.join("marketgate.db");
    let toml = format!(
        "data_dir = '{}'\n{}[gateway]\nlisten = '127.0.0.1:0'\n{extra}",
        data.display(),
        config_toml(&format!("sqlite://{}", db.display()), "127.0.0.1:0").replace(
            "token = \"admin-token\"",
            &format!("token = \"{}\"", crate::support::gateway::ADMIN_TOKEN)
        ),
    );
    let path = dir.join("serve.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

/// A session of its own on `database_url` that has run `BEGIN; {locking}` and holds what it
/// locked until the caller sends `ROLLBACK`: a store stalled by a held row lock.
pub async fn holding_locks(database_url: &str, locking: &str) -> tokio_postgres::Client {
    let (holder, conn) = tokio_postgres::connect(database_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    holder
        .batch_execute(&format!("BEGIN; {locking}"))
        .await
        .unwrap();
    holder
}

/// A control plane serving on 127.0.0.1:0.
pub struct Control {
    pub addr: SocketAddr,
    pub cp: ControlPlane,
    pub database_url: String,
    trigger: ShutdownTrigger,
    _dir: std::sync::Arc<tempfile::TempDir>,
}

impl Control {
    pub async fn start(backend: &Backend) -> Control {
        let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
        let url = backend.fresh_database(dir.path()).await;
        Self::open(url, dir).await
    }

    async fn open(database_url: String, dir: std::sync::Arc<tempfile::TempDir>) -> Control {
        Self::open_with(database_url, dir, "").await
    }

    /// A control plane on a fresh database with `control_keys` (TOML lines) added to its
    /// `[control]` table, e.g. the store's timeouts.
    pub async fn start_with(backend: &Backend, control_keys: &str) -> Control {
        let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
        let url = backend.fresh_database(dir.path()).await;
        Self::open_with(url, dir, control_keys).await
    }

    /// A control plane on `database_url` as it is (a database the test made itself, e.g. on
    /// a private PostgreSQL server), with `control_keys` added to its `[control]` table.
    pub async fn on_database(database_url: &str, control_keys: &str) -> Control {
        let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
        Self::open_with(database_url.to_owned(), dir, control_keys).await
    }

    async fn open_with(
        database_url: String,
        dir: std::sync::Arc<tempfile::TempDir>,
        control_keys: &str,
    ) -> Control {
        let toml = config_toml(&database_url, "127.0.0.1:0").replacen(
            "[control]\n",
            &format!("[control]\n{control_keys}\n"),
            1,
        );
        let config = Config::from_toml(&toml, Vec::new()).expect("test config is valid");
        let cp = ControlPlane::open(&config)
            .await
            .expect("control plane opens");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (trigger, shutdown) = ShutdownTrigger::new();
        tokio::spawn(marketgate::control::serve(listener, cp.clone(), shutdown));
        Control {
            addr,
            cp,
            database_url,
            trigger,
            _dir: dir,
        }
    }

    /// Another replica on the same database (PostgreSQL: one control plane, many processes).
    pub async fn replica(&self) -> Control {
        Self::open(self.database_url.clone(), self._dir.clone()).await
    }

    /// Stops this one and opens a new one on the same database.
    pub async fn restart(self) -> Control {
        self.trigger.fire();
        let Control {
            database_url, _dir, ..
        } = self;
        Self::open(database_url, _dir).await
    }

    pub fn client(&self, token: &str) -> Api {
        Api::new(self.addr, Auth::Token(token.to_owned()))
    }

    pub fn signed_client(&self, ak: &str, sk: &str) -> Api {
        Api::new(self.addr, Auth::Signed(ak.to_owned(), sk.to_owned()))
    }
}

#[derive(Clone)]
pub enum Auth {
    Token(String),
    Signed(String, String),
    None,
}

/// A JSON client of the control API.
#[derive(Clone)]
pub struct Api {
    pub addr: SocketAddr,
    pub auth: Auth,
    pub domain: Option<String>,
    client: HyperClient<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

/// `/v2/{project}/apigw/instances/inst-1`
pub fn mgmt(project: &str) -> String {
    format!("/v2/{project}/apigw/instances/{INSTANCE}")
}

/// `/v1/{project}/apigw/instances/inst-1/market`
pub fn market_base(project: &str) -> String {
    format!("/v1/{project}/apigw/instances/{INSTANCE}/market")
}

impl Api {
    pub fn new(addr: SocketAddr, auth: Auth) -> Api {
        Api {
            addr,
            auth,
            domain: None,
            client: HyperClient::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// The same client sending `X-Domain-Id: domain`.
    pub fn as_domain(&self, domain: &str) -> Api {
        Api {
            domain: Some(domain.to_owned()),
            ..self.clone()
        }
    }

    /// Sends a request; returns the status and the JSON body (`Null` when empty).
    pub async fn send(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let (status, body, _) = self.send_full(method, path, body).await;
        (status, body)
    }

    /// Like [`Api::send`], with the answer's headers.
    pub async fn send_full(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value, http::HeaderMap) {
        let body = body
            .map(|b| serde_json::to_vec(&b).unwrap())
            .unwrap_or_default();
        let host = self.addr.to_string();
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("http://{host}{path}"))
            .header("host", &host)
            .header("content-type", "application/json");
        if let Some(domain) = &self.domain {
            request = request.header("x-domain-id", domain);
        }
        let mut request = request.body(Full::new(Bytes::from(body.clone()))).unwrap();
        match &self.auth {
            Auth::Token(token) => {
                request
                    .headers_mut()
                    .insert("x-auth-token", token.parse().unwrap());
            }
            Auth::Signed(ak, sk) => {
                let date = marketgate::signing::format_sdk_date(time::OffsetDateTime::now_utc());
                request
                    .headers_mut()
                    .insert("x-sdk-date", date.parse().unwrap());
                let (path_only, query) = match path.split_once('?') {
                    Some((p, q)) => (p, Some(q)),
                    None => (path, None),
                };
                let parts = marketgate::signing::RequestParts {
                    method,
                    path: path_only,
                    query,
                    headers: request.headers(),
                    authority: None,
                    payload: marketgate::signing::Payload::Body(&body),
                };
                let value = marketgate::signing::sign(
                    ak,
                    sk.as_bytes(),
                    &parts,
                    &["host", "x-sdk-date", "content-type"],
                )
                .unwrap();
                request
                    .headers_mut()
                    .insert("authorization", value.parse().unwrap());
            }
            Auth::None => {}
        }
        let response = self.client.request(request).await.expect("request is sent");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let has_request_id = headers.contains_key("x-request-id");
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        if status >= 400 {
            assert!(has_request_id, "an error answer carries X-Request-Id");
        }
        (status, value, headers)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.send("GET", path, None).await
    }
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send("POST", path, Some(body)).await
    }
    pub async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.send("PUT", path, Some(body)).await
    }
    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.send("DELETE", path, None).await
    }
}

/// Asserts status and APIG error code of an answer, naming the step.
#[track_caller]
pub fn expect_error(step: &str, answer: &(u16, Value), status: u16, code: &str) {
    assert_eq!(answer.0, status, "{step}: {}", answer.1);
    assert_eq!(answer.1["error_code"], code, "{step}: {}", answer.1);
    assert!(
        !answer.1["error_msg"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "{step}: the error names what was wrong"
    );
}

/// A 400 APIG.2012 naming `field` and saying `rule` (a fragment of the rule's words), inside
/// Huawei's message.
#[track_caller]
pub fn expect_rule(step: &str, answer: &(u16, Value), field: &str, rule: &str) {
    expect_error(step, answer, 400, "APIG.2012");
    let msg = answer.1["error_msg"].as_str().unwrap_or_default();
    assert!(
        msg.starts_with(&format!("Invalid parameter value,parameterName:{field}. ")),
        "{step}: names the field {field}: {msg}"
    );
    assert!(
        msg.contains(rule),
        "{step}: states the rule {rule:?}: {msg}"
    );
}

#[track_caller]
pub fn expect_status(step: &str, answer: &(u16, Value), status: u16) {
    assert_eq!(answer.0, status, "{step}: {}", answer.1);
}

/// A seller's group with one sellable API (public, APP, HTTP backend, published to RELEASE).
pub async fn sellable_group(seller: &Api, name: &str) -> (String, String) {
    let (status, group) = seller
        .post(
            &format!("{}/api-groups", mgmt(SELLER_PROJECT)),
            serde_json::json!({"name": name}),
        )
        .await;
    assert_eq!(status, 201, "{group}");
    let group_id = group["id"].as_str().unwrap().to_owned();
    let (status, api) = seller
        .post(
            &format!("{}/apis", mgmt(SELLER_PROJECT)),
            serde_json::json!({
                "group_id": group_id, "name": format!("{name}_api"), "type": 1,
                "req_protocol": "HTTP", "req_method": "GET", "req_uri": "/users/{id}",
                "auth_type": "APP", "backend_type": "HTTP",
                "backend_api": {"url_domain": "127.0.0.1:9", "req_protocol": "HTTP",
                                "req_method": "GET", "req_uri": "/u/{id}", "timeout": 5000}
            }),
        )
        .await;
    assert_eq!(status, 201, "{api}");
    let api_id = api["id"].as_str().unwrap().to_owned();
    let (status, record) = seller
        .post(
            &format!("{}/apis/action", mgmt(SELLER_PROJECT)),
            serde_json::json!({"action": "online", "env_id": "DEFAULT_ENVIRONMENT_RELEASE_ID", "api_id": api_id}),
        )
        .await;
    assert_eq!(status, 201, "{record}");
    (group_id, api_id)
}

/// The control plane's current snapshot, checked with the data plane's own validator: what
/// the control plane builds, every proxy must accept.
pub async fn served(control: &Control) -> marketgate::snapshot::Snapshot {
    let snapshot = control.cp.snapshot().await;
    if snapshot.version > 0 {
        if let Err(e) = marketgate::snapshot::validate::validate(&snapshot) {
            panic!("the data plane refuses the snapshot: {e:?}\n{snapshot:#?}");
        }
    }
    snapshot
}

/// What the market's purchase answered: the buyer's APP for a listed group.
pub struct Bought {
    pub group_id: String,
    pub purchase_id: String,
    pub key: String,
    pub secret: String,
}

/// On the control API at `control`: a seller's group with one API, `GET /call` forwarding to
/// `backend`'s `/backend`, published and listed on the market at `domain`; then the buyer's
/// purchase (order `shared-order`) of `quota` calls of it.
pub async fn bought_group(
    control: SocketAddr,
    backend: SocketAddr,
    domain: &str,
    quota: u64,
) -> Bought {
    let seller = Api::new(control, Auth::Token(SELLER_TOKEN.into()));
    let base = mgmt(SELLER_PROJECT);
    let group = seller
        .post(
            &format!("{base}/api-groups"),
            serde_json::json!({"name": "shared_group"}),
        )
        .await;
    expect_status("group", &group, 201);
    let group_id = group.1["id"].as_str().unwrap().to_owned();
    let api = seller
        .post(
            &format!("{base}/apis"),
            serde_json::json!({"group_id": group_id, "name": "shared_api", "type": 1,
                   "req_protocol": "HTTP", "req_method": "GET", "req_uri": "/call",
                   "auth_type": "APP", "backend_type": "HTTP",
                   "backend_api": {"url_domain": backend.to_string(),
                                   "req_protocol": "HTTP", "req_method": "GET",
                                   "req_uri": "/backend", "timeout": 5000}}),
        )
        .await;
    expect_status("api", &api, 201);
    let publish = seller
        .post(
            &format!("{base}/apis/action"),
            serde_json::json!({"action": "online", "env_id": "DEFAULT_ENVIRONMENT_RELEASE_ID",
                   "api_id": api.1["id"]}),
        )
        .await;
    expect_status("publish", &publish, 201);
    let market = Api::new(control, Auth::Token(MARKET_TOKEN.into()));
    let onsell = market
        .as_domain(SELLER_DOMAIN)
        .put(
            &format!(
                "{}/api-groups/onsell/{group_id}",
                market_base(SELLER_PROJECT)
            ),
            serde_json::json!({"url_domain": domain}),
        )
        .await;
    expect_status("onsell", &onsell, 201);
    let bought = market
        .as_domain(BUYER_DOMAIN)
        .post(
            &format!("{}/api-groups/purchase", market_base(BUYER_PROJECT)),
            serde_json::json!({"order_id": "shared-order", "group_id": group_id,
                   "start_time": "1700000000", "expire_time": "4102444800",
                   "req_quota": quota.to_string(), "order_type": "1"}),
        )
        .await;
    expect_status("purchase", &bought, 201);
    let field = |name: &str| bought.1[name].as_str().unwrap().to_owned();
    Bought {
        group_id,
        purchase_id: field("purchase_id"),
        key: field("app_key"),
        secret: field("app_secret"),
    }
}
