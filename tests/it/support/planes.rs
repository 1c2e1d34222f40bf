//! Both planes in one test: a control plane (market + management API, admin listener,
//! subscriptions) and N proxies, every listener on 127.0.0.1:0 in this process. The proxies
//! subscribe to the control plane (`proxy.control_urls`) and lease their quota from it exactly
//! as `marketgate proxy` does (`gateway::run_proxy_with`); no control-plane config names them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use marketgate::config::Config;
use marketgate::control::subscriptions::Subscriptions;
use marketgate::control::ControlPlane;
use marketgate::gateway::{Gateway, Listeners};
use marketgate::shutdown::ShutdownTrigger;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use super::control::{
    config_toml, expect_status, market_base, mgmt, Api, Auth, Backend, BUYER_DOMAIN, BUYER_PROJECT,
    MARKET_TOKEN, SELLER_DOMAIN, SELLER_PROJECT, SELLER_TOKEN,
};
use super::gateway::{request, signed_as, Answer, Buyer, ADMIN_TOKEN};

/// How long a test waits for the planes to agree before it fails.
pub const CONVERGE: Duration = Duration::from_secs(10);

/// One proxy: a gateway serving buyers and its admin API, subscribed to `control`.
pub struct Proxy {
    pub node: String,
    pub gateway: Gateway,
    pub buyers: SocketAddr,
    /// Its buyers' TLS listener, when `[gateway] tls_listen` was given.
    pub buyers_tls: Option<SocketAddr>,
    /// Its admin listener (the operators' `PUT`/`PATCH /v1/snapshot`).
    pub admin: SocketAddr,
    control: Vec<SocketAddr>,
    _dir: Arc<tempfile::TempDir>,
    trigger: ShutdownTrigger,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// A proxy named `node` with an empty data dir, subscribed to the control planes whose
    /// admin listeners are `control` (in that order), with `extra` TOML in its `[proxy]`.
    pub async fn start(node: &str, control: &[SocketAddr], extra: &str) -> Proxy {
        Self::start_with(node, control, "", extra).await
    }

    /// [`Proxy::start`] with `gateway` TOML keys in its `[gateway]` table too (a TLS
    /// listener: `tls_listen`, `tls_cert`, `tls_key`).
    pub async fn start_with(
        node: &str,
        control: &[SocketAddr],
        gateway: &str,
        extra: &str,
    ) -> Proxy {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let urls: Vec<String> = control.iter().map(|a| format!("'http://{a}'")).collect();
        let text = format!(
            "data_dir = '{}'\n[gateway]\nlisten = '127.0.0.1:0'\nworkers = 1\n{gateway}\n\
             [admin]\nlisten = '127.0.0.1:0'\ntoken = '{ADMIN_TOKEN}'\n\
             [proxy]\nnode_id = '{node}'\ncontrol_urls = [{}]\n{extra}",
            dir.path().display(),
            urls.join(", ")
        );
        let config = Config::from_toml(&text, Vec::new()).unwrap();
        let gateway = Gateway::open(&config).unwrap();
        let listeners = Listeners::bind(&config).await.unwrap();
        let buyers = listeners.buyers.local_addr().unwrap();
        let buyers_tls = listeners.buyers.tls_addr().map(|a| a.unwrap());
        let admin = listeners.admin.local_addr().unwrap();
        let (trigger, shutdown) = ShutdownTrigger::new();
        let g = gateway.clone();
        let task = tokio::spawn(async move {
            marketgate::gateway::run_proxy_with(g, listeners, shutdown)
                .await
                .unwrap()
        });
        Proxy {
            node: node.to_owned(),
            gateway,
            buyers,
            buyers_tls,
            admin,
            control: control.to_vec(),
            _dir: dir,
            trigger,
            task,
        }
    }

    /// Stops it cleanly (drained, leases given back): gone for good.
    pub async fn stop(self) {
        self.trigger.fire();
        self.task.await.unwrap();
    }

    /// Stops it cleanly and starts a new proxy of the same name with an empty data dir: a
    /// machine replaced, or a disk lost.
    pub async fn restart_empty(self) -> Proxy {
        let (node, control) = (self.node.clone(), self.control.clone());
        self.stop().await;
        Proxy::start(&node, &control, "").await
    }

    pub fn version(&self) -> Option<u64> {
        self.gateway.snapshot_version()
    }

    pub fn buyer(&self) -> Buyer {
        Buyer::new(self.buyers)
    }
}

/// A control plane with its admin listener, and proxies subscribed to it.
pub struct Planes {
    pub cp: ControlPlane,
    /// The market and management API.
    pub control: SocketAddr,
    /// The control plane's admin listener.
    pub admin: SocketAddr,
    pub subscriptions: Subscriptions,
    pub proxies: Vec<Proxy>,
    /// Its store (`sqlite://…`, or a PostgreSQL database replicas share).
    pub database_url: String,
    _trigger: ShutdownTrigger,
    _dir: tempfile::TempDir,
}

impl Planes {
    /// One control plane on a fresh SQLite store and `n` proxies `proxy-1` … `proxy-n`.
    pub async fn start(n: usize) -> Planes {
        Self::start_with(n, "").await
    }

    /// [`Planes::start`] with `extra` TOML keys in the control plane's `[control]` table.
    pub async fn start_with(n: usize, extra: &str) -> Planes {
        let dir = tempfile::tempdir().unwrap();
        let database_url = format!("sqlite://{}", dir.path().join("marketgate.db").display());
        let nodes: Vec<String> = (1..=n).map(|i| format!("proxy-{i}")).collect();
        Self::open(dir, database_url, &nodes, extra).await
    }

    /// A control plane on a fresh database of `backend` (PostgreSQL: one that replicas can
    /// share, [`Planes::replica`]) and proxies named `nodes`.
    pub async fn start_on(backend: &Backend, nodes: &[&str]) -> Planes {
        let dir = tempfile::tempdir().unwrap();
        let database_url = backend.fresh_database(dir.path()).await;
        let nodes: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
        Self::open(dir, database_url, &nodes, "").await
    }

    /// Another control-plane replica on this one's database (PostgreSQL), with its own
    /// listeners, and proxies named `nodes` subscribed to it alone.
    pub async fn replica(&self, nodes: &[&str]) -> Planes {
        let dir = tempfile::tempdir().unwrap();
        let nodes: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
        Self::open(dir, self.database_url.clone(), &nodes, "").await
    }

    async fn open(
        dir: tempfile::TempDir,
        database_url: String,
        nodes: &[String],
        extra: &str,
    ) -> Planes {
        let toml = config_toml(&database_url, "127.0.0.1:0").replace(
            "token = \"admin-token\"",
            &format!("token = \"{ADMIN_TOKEN}\""),
        );
        let toml = toml.replacen("[control]\n", &format!("[control]\n{extra}"), 1);
        let config = Config::from_toml(&toml, Vec::new()).expect("test config is valid");
        let cp = ControlPlane::open(&config)
            .await
            .expect("control plane opens");
        let (trigger, shutdown) = ShutdownTrigger::new();
        let control_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let control = control_listener.local_addr().unwrap();
        let admin = admin_listener.local_addr().unwrap();
        tokio::spawn(marketgate::control::serve(
            control_listener,
            cp.clone(),
            shutdown.clone(),
        ));
        let subscriptions = cp.spawn_subscriptions(shutdown.clone());
        cp.spawn_lease_expiry(shutdown.clone());
        let router = cp.admin_router(subscriptions.clone());
        tokio::spawn(async move {
            axum::serve(admin_listener, router)
                .with_graceful_shutdown(shutdown.wait())
                .await
        });
        let mut proxies = Vec::new();
        for node in nodes {
            proxies.push(Proxy::start(node, &[admin], "").await);
        }
        Planes {
            cp,
            control,
            admin,
            subscriptions,
            proxies,
            database_url,
            _trigger: trigger,
            _dir: dir,
        }
    }

    /// Adds a proxy named `node`, subscribed to this control plane.
    pub async fn add_proxy(&mut self, node: &str) {
        let proxy = Proxy::start(node, &[self.admin], "").await;
        self.proxies.push(proxy);
    }

    pub fn client(&self, token: &str) -> Api {
        Api::new(self.control, Auth::Token(token.to_owned()))
    }

    /// Waits until every proxy serves the control plane's current version and has acked it
    /// (polled again, with the control plane's content hash); returns the version.
    pub async fn converged(&self) -> u64 {
        let version = self.cp.version();
        let deadline = Instant::now() + CONVERGE;
        loop {
            let held: Vec<Option<u64>> = self.proxies.iter().map(Proxy::version).collect();
            let in_touch = self.subscriptions.in_touch();
            let acked = self.proxies.iter().all(|proxy| {
                in_touch.iter().any(|p| {
                    p.node_id == proxy.node
                        && p.acked_version == Some(version)
                        && p.content == "match"
                })
            });
            if acked && held.iter().all(|v| *v == Some(version)) {
                return version;
            }
            assert!(
                Instant::now() < deadline,
                "proxies hold {held:?}, the control plane is at {version}: {in_touch:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A seller's group with one sellable MOCK API (`GET /hello` answers `mocked`), listed on
    /// the market at `domain`. Returns the group id.
    pub async fn listed_group(&self, name: &str, domain: &str) -> String {
        let api = json!({"name": format!("{name}_api"), "type": 1, "req_protocol": "HTTP",
                         "req_method": "GET", "req_uri": "/hello", "auth_type": "APP",
                         "backend_type": "MOCK", "mock_info": {"result_content": "mocked"}});
        self.listed_group_with(name, domain, api).await
    }

    /// A seller's group with the API `api` (a v2 `ApiCreate` body without its `group_id`),
    /// published and listed on the market at `domain`. Returns the group id.
    pub async fn listed_group_with(&self, name: &str, domain: &str, mut api: Value) -> String {
        let seller = self.client(SELLER_TOKEN);
        let base = mgmt(SELLER_PROJECT);
        let group = seller
            .post(&format!("{base}/api-groups"), json!({"name": name}))
            .await;
        expect_status("group", &group, 201);
        let gid = group.1["id"].as_str().unwrap().to_owned();
        api["group_id"] = json!(gid);
        let api = seller.post(&format!("{base}/apis"), api).await;
        expect_status("api", &api, 201);
        let publish = seller
            .post(
                &format!("{base}/apis/action"),
                json!({"action": "online", "env_id": "DEFAULT_ENVIRONMENT_RELEASE_ID",
                       "api_id": api.1["id"]}),
            )
            .await;
        expect_status("publish", &publish, 201);
        let onsell = self
            .client(MARKET_TOKEN)
            .as_domain(SELLER_DOMAIN)
            .put(
                &format!("{}/api-groups/onsell/{gid}", market_base(SELLER_PROJECT)),
                json!({"url_domain": domain}),
            )
            .await;
        expect_status("onsell", &onsell, 201);
        gid
    }

    /// The market buys `calls` calls of `gid` for the buyer: (app_key, app_secret).
    pub async fn buy(&self, gid: &str, order: &str, calls: u64) -> (String, String) {
        let bought = self
            .client(MARKET_TOKEN)
            .as_domain(BUYER_DOMAIN)
            .post(
                &format!("{}/api-groups/purchase", market_base(BUYER_PROJECT)),
                json!({"order_id": order, "group_id": gid, "start_time": "1700000000",
                       "expire_time": "4102444800", "req_quota": calls.to_string(),
                       "order_type": "1"}),
            )
            .await;
        expect_status("purchase", &bought, 201);
        (
            bought.1["app_key"].as_str().unwrap().to_owned(),
            bought.1["app_secret"].as_str().unwrap().to_owned(),
        )
    }

    /// The market delists `gid` (answers 204).
    pub async fn delist(&self, gid: &str) {
        let delist = self
            .client(MARKET_TOKEN)
            .as_domain(SELLER_DOMAIN)
            .delete(&format!(
                "{}/api-groups/delist/{gid}",
                market_base(SELLER_PROJECT)
            ))
            .await;
        expect_status("delist", &delist, 204);
    }

    /// Creates an empty API group: a one-entity change, small enough to go as a delta.
    pub async fn small_change(&self, name: &str) {
        let seller = self.client(SELLER_TOKEN);
        let group = seller
            .post(
                &format!("{}/api-groups", mgmt(SELLER_PROJECT)),
                json!({"name": name}),
            )
            .await;
        expect_status("small change", &group, 201);
    }
}

/// Waits until `condition` holds (checked every 5 ms); fails naming `what` after [`CONVERGE`].
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + CONVERGE;
    while !condition() {
        assert!(Instant::now() < deadline, "not within {CONVERGE:?}: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A buyer's signed `GET /hello` on `domain`.
pub async fn call(buyer: &Buyer, domain: &str, key: &str, secret: &str) -> Answer {
    buyer
        .send(signed_as(
            key,
            secret,
            request("GET", domain, "/hello", Bytes::new()),
        ))
        .await
}

/// Calls `domain` through `buyer` until the answer is 403 APIG.0306 (delisted); returns the
/// instant that answer arrived. Fails after [`CONVERGE`]. Until then every call is served,
/// or answered 503 APIG.0606 (calls of the purchase held by other proxies and not moved to
/// this one within the refill wait: "retry shortly", which a poller as fast as this one meets
/// on a busy machine; never 405, the purchase has calls left).
pub async fn first_refusal(buyer: Buyer, domain: String, key: String, secret: String) -> Instant {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let answer = call(&buyer, &domain, &key, &secret).await;
        let at = Instant::now();
        if answer.status == 403 && answer.code() == "APIG.0306" {
            return at;
        }
        let retry = answer.status == 503 && answer.code() == "APIG.0606";
        assert!(
            answer.status == 200 || retry,
            "{domain}: served until refused as delisted: {} {:?}",
            answer.status,
            answer.body
        );
        assert!(at < deadline, "{domain}: not refused after {CONVERGE:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// An admin request with the token (or without), any method, JSON body; status and JSON.
pub async fn admin_call(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let mut builder = http::Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"));
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let response = client
        .request(
            builder
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .unwrap(),
        )
        .await
        .expect("the admin listener answers");
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, value)
}

/// The admin token header, for [`admin_call`].
pub const WITH_TOKEN: &[(&str, &str)] = &[("authorization", "Bearer test-admin-token")];

/// Percentile `p` (0..=100) of sorted `values`, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
