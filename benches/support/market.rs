//! What the benches that drive the control plane's market API share (`#[path]`-included by
//! `market_writes` and `fleet_sim`): the control plane's config, a JSON client of the market
//! and management API, and a seller's group listed on the market.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use marketgate::config::Config;
use serde_json::{json, Value};

pub const MARKET_TOKEN: &str = "bench-market-token";
pub const SELLER_TOKEN: &str = "bench-seller-token";
pub const ADMIN_TOKEN: &str = "bench-admin-token";
pub const POSTGRES_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A control plane of instance `instance` on `database_url`, with a market token and a
/// seller's (project `seller-p`) token.
pub fn control_config(database_url: &str, instance: &str) -> Config {
    let text = format!(
        r#"instance_id = "{instance}"
database_url = "{database_url}"
[admin]
token = "{ADMIN_TOKEN}"
[log]
level = "warn"
[[control.tokens]]
token = "{MARKET_TOKEN}"
domain_id = "market"
project_id = "market"
role = "market"
[[control.tokens]]
token = "{SELLER_TOKEN}"
domain_id = "seller-d"
project_id = "seller-p"
role = "tenant"
"#
    );
    Config::from_toml(&text, Vec::new()).expect("bench config is valid")
}

/// A JSON client of one control plane's market and management API.
pub struct Api {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl Api {
    pub fn new(addr: std::net::SocketAddr) -> Api {
        Api {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: format!("http://{addr}"),
        }
    }

    pub async fn send(
        &self,
        method: &str,
        path: &str,
        token: &str,
        domain: &str,
        body: Value,
    ) -> (u16, Value) {
        let request = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("x-auth-token", token)
            .header("x-domain-id", domain)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let response = self.client.request(request).await.unwrap();
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }
}

/// A seller group with one sellable API, listed on the market at `url_domain`: its id.
pub async fn listed_group(api: &Api, instance: &str, url_domain: &str) -> String {
    let v2 = format!("/v2/seller-p/apigw/instances/{instance}");
    let (s, group) = api
        .send(
            "POST",
            &format!("{v2}/api-groups"),
            SELLER_TOKEN,
            "seller-d",
            json!({"name": "bench_group"}),
        )
        .await;
    assert_eq!(s, 201, "{group}");
    let gid = group["id"].as_str().unwrap().to_owned();
    let (s, created) = api
        .send(
            "POST",
            &format!("{v2}/apis"),
            SELLER_TOKEN,
            "seller-d",
            json!({
            "group_id": gid, "name": "bench_api", "type": 1, "req_protocol": "HTTP",
            "req_method": "GET", "req_uri": "/x", "auth_type": "APP", "backend_type": "MOCK",
            "mock_info": {"result_content": "ok"}}),
        )
        .await;
    assert_eq!(s, 201, "{created}");
    let (s, published) = api
        .send("POST", &format!("{v2}/apis/action"), SELLER_TOKEN, "seller-d", json!({
            "action": "online", "env_id": "DEFAULT_ENVIRONMENT_RELEASE_ID", "api_id": created["id"]}))
        .await;
    assert_eq!(s, 201, "{published}");
    let (s, listed) = api
        .send(
            "PUT",
            &format!("/v1/seller-p/apigw/instances/{instance}/market/api-groups/onsell/{gid}"),
            MARKET_TOKEN,
            "seller-d",
            json!({"url_domain": url_domain}),
        )
        .await;
    assert_eq!(s, 201, "{listed}");
    gid
}
