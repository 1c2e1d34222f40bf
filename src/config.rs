//! Configuration: one TOML file, every key overridable by `MARKETGATE_SECTION__KEY`.
//!
//! The file form ([`FileConfig`], serde; every key it does not know is found by
//! `serde_ignored` and refused, so the known keys are its fields) is turned into a validated
//! [`Config`] by [`Config::load`] / [`Config::from_toml`]. Every problem found — unknown keys,
//! bad values, missing values — is reported at once in one [`ConfigError`], each naming its
//! key. Defaults are named constants with their unit. `marketgate serve` with no file uses
//! [`Config::builtin`]: loopback listeners, data in `./marketgate-data/` and well-known
//! trial credentials (logged loudly; never for a shared machine).
//!
//! This module does not open sockets or files other than the config file itself.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub const DEFAULT_INSTANCE_ID: &str = "default";
pub const DEFAULT_DATA_DIR: &str = "./marketgate-data";
pub const DEFAULT_GATEWAY_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_CONTROL_LISTEN: &str = "127.0.0.1:8081";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8082";
/// AppCodes are bearer secrets: by default they are accepted over TLS only.
pub const DEFAULT_APPCODE_OVER_HTTP: bool = false;
/// Largest request body the gateway accepts, in bytes (Huawei's signed-body limit).
pub const DEFAULT_MAX_BODY_BYTES: usize = 12 * 1024 * 1024;
/// Largest request head (request line plus headers), in bytes.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 32 * 1024;
/// A client must finish sending its request head within this many milliseconds (slowloris).
pub const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 10_000;
/// Open connections each listener serves at once; past it the idle ones are closed to make
/// room, and a connection that finds no room within `ACCEPT_QUEUE_WAIT_MS` is refused. The
/// buyer listener's is lowered at start to fit the process's open-file limit.
pub const DEFAULT_GATEWAY_MAX_CONNECTIONS: usize = 10_000;
pub const DEFAULT_CONTROL_MAX_CONNECTIONS: usize = 256;
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 64;
/// A connection with no request in flight for this many milliseconds is closed (HTTP/1
/// keep-alive and HTTP/2 alike); it is noticed between one and two such periods.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 60_000;
/// A request body that sends nothing for this many milliseconds is abandoned (400).
pub const DEFAULT_BODY_READ_TIMEOUT_MS: u64 = 30_000;
/// A TLS handshake must finish within this many milliseconds.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// Streams one HTTP/2 connection may have open at once.
pub const DEFAULT_H2_MAX_CONCURRENT_STREAMS: u32 = 256;
/// On SIGTERM, in-flight requests get this many milliseconds to finish.
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 10_000;
/// Failed authentications one peer may make per window on a listener before it is refused
/// (429) for the rest of the window (`crate::auth_guard`); 0 turns the bound off.
pub const DEFAULT_AUTH_FAILURE_LIMIT: u32 = 100;
/// The window of `auth_failure_limit`, in seconds.
pub const DEFAULT_AUTH_FAILURE_WINDOW_SECS: u64 = 10;
/// Allowed distance between `X-Sdk-Date` and the clock, in seconds.
pub const DEFAULT_MAX_CLOCK_SKEW_SECS: u64 = 15 * 60;
/// Gateway worker threads (one current-thread runtime and SO_REUSEPORT socket each); 0 means
/// one per core the process may run on (its CPU affinity), see `gateway::workers`.
pub const DEFAULT_GATEWAY_WORKERS: usize = 0;
/// The most calls of one purchase a proxy reserves ahead in its journal (the most a crash can
/// lose, beyond the calls in flight). Reservations follow the purchase's rate (about 250 ms of
/// its traffic, at least 16 calls), so this cap only binds above ~16k calls/s per purchase.
pub const DEFAULT_QUOTA_JOURNAL_BLOCK: u64 = 4096;
/// The control plane waits this many milliseconds after a change to batch more into one push.
pub const DEFAULT_PUSH_DEBOUNCE_MS: u64 = 50;
/// A quota lease not renewed for this many seconds returns to the ledger.
pub const DEFAULT_LEASE_TTL_SECS: u64 = 300;
/// A proxy asks for leases that cover this many seconds of a purchase's recent traffic, so that
/// it keeps serving that long with every control plane unreachable (docs/quota-leases.md).
pub const DEFAULT_OUTAGE_BUDGET_SECS: u64 = 60;
/// A proxy silent for this many seconds leaves the control plane's `GET /v1/proxies`, and
/// another incarnation may then take its node id.
pub const DEFAULT_PROXY_EXPIRY_SECS: u64 = 60;
/// The smallest and largest lease a proxy asks for, in calls.
pub const DEFAULT_LEASE_MIN_CALLS: u64 = 16;
pub const DEFAULT_LEASE_MAX_CALLS: u64 = 1_000_000;
/// Largest snapshot (or delta) a proxy's admin listener takes, in bytes after decompression:
/// room for a market of about two million purchases (~510 bytes of JSON each).
pub const DEFAULT_MAX_SNAPSHOT_BYTES: usize = 1 << 30;
/// Upstream connections kept idle per backend host.
pub const DEFAULT_UPSTREAM_POOL_IDLE_PER_HOST: usize = 256;
/// Idle upstream connections are closed after this many seconds.
pub const DEFAULT_UPSTREAM_POOL_IDLE_SECS: u64 = 90;

/// Shortest admin token (`[admin] token`, `[[admin.tokens]]`, `[proxy] control_token`).
pub const MIN_ADMIN_TOKEN_CHARS: usize = 8;

/// Trial credentials of [`Config::builtin`]; printed in the README quickstart.
pub const TRIAL_ADMIN_TOKEN: &str = "trial-admin-token";
pub const TRIAL_MARKET_TOKEN: &str = "trial-market-token";
pub const TRIAL_SELLER_TOKEN: &str = "trial-seller-token";
pub const TRIAL_SELLER_DOMAIN: &str = "seller-domain";
pub const TRIAL_SELLER_PROJECT: &str = "seller-project";
pub const TRIAL_SELLER_AK: &str = "TRIALSELLERAK0000001";
pub const TRIAL_SELLER_SK: &str = "trial-seller-secret-key-0001";

/// Who a control-API principal is allowed to act as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A seller or buyer: acts only in its own domain and project.
    Tenant,
    /// The cloud market: may act for any `X-Domain-Id` on the market API.
    Market,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

/// An AK/SK pair that signs control-API requests.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Credential {
    pub access_key: String,
    pub secret_key: String,
    pub domain_id: String,
    pub project_id: String,
    pub role: Role,
}

/// A bearer token for the control API.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Token {
    pub token: String,
    pub domain_id: String,
    pub project_id: String,
    pub role: Role,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    pub tls_listen: Option<SocketAddr>,
    /// Default certificate (PEM) for TLS handshakes whose SNI matches no market domain.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub workers: usize,
    /// Accept `X-Apig-AppCode` over plain HTTP (it is a bearer secret).
    pub appcode_over_http: bool,
    pub max_body_bytes: usize,
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub drain_timeout: Duration,
    pub max_clock_skew: Duration,
    pub quota_journal_block: u64,
    pub upstream_pool_idle_per_host: usize,
    pub upstream_pool_idle: Duration,
    /// Connection limit and timeouts of the buyer listeners (plain and TLS, each).
    pub connections: ConnectionLimits,
    pub tls_handshake_timeout: Duration,
    pub h2_max_concurrent_streams: u32,
}

/// What bounds one listener's connections: how many, and how long each may be silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    /// A request head (and a new connection's first request) must arrive within this.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight this long is closed.
    pub idle_timeout: Duration,
    /// A request body silent this long is abandoned.
    pub body_read_timeout: Duration,
    /// Failed authentications per peer and window before the peer is refused.
    pub auth_failures: crate::auth_guard::AuthFailureLimit,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ControlConfig {
    pub listen: SocketAddr,
    pub credentials: Vec<Credential>,
    pub tokens: Vec<Token>,
    pub push_debounce: Duration,
    pub lease_ttl: Duration,
    /// The store's statement, lock and pool-wait timeouts and pool size (`store_*` keys).
    pub store: crate::control::store::StoreLimits,
    pub connections: ConnectionLimits,
    /// A proxy silent this long leaves `GET /v1/proxies` (its node id is free again).
    pub proxy_expiry: Duration,
}

/// What an admin token may do on the admin listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminRole {
    /// Everything: snapshot pushes (`PUT`/`PATCH /v1/snapshot`), usage, metrics, the proxy
    /// list, and all a proxy may do.
    Operator,
    /// What a proxy needs of a control plane and no more: subscribe to snapshots, exchange
    /// and release leases, read the version. A stolen proxy credential cannot push a
    /// snapshot to the other proxies.
    Proxy,
}

/// One accepted admin token (`[[admin.tokens]]`). Several at once: rotation adds the new
/// token, moves every client to it, then removes the old one, with no restart in between
/// that refuses anyone.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AdminToken {
    pub token: String,
    pub role: AdminRole,
}

/// The admin listener's own certificate, and the CA its clients' certificates must chain to
/// (mutual TLS) when set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// Why an admin request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminRefusal {
    #[error("missing or wrong admin token")]
    Unauthenticated,
    #[error(
        "{what} needs an operator token ([[admin.tokens]] with role = \"operator\", or \
         [admin] token); this token has role proxy, which may only subscribe to snapshots and \
         exchange leases"
    )]
    NotOperator { what: &'static str },
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Every token accepted, with its role: `[[admin.tokens]]`, and `[admin] token` (the
    /// one-token shorthand: an operator token).
    pub tokens: Vec<AdminToken>,
    /// Serve `/metrics` without the admin token.
    pub metrics_public: bool,
    pub connections: ConnectionLimits,
    /// HTTPS on the admin listener (`tls_cert`, `tls_key`, `tls_client_ca`).
    pub tls: Option<AdminTls>,
}

impl AdminConfig {
    /// The role of the admin token a request carries (`Authorization: Bearer <token>` or
    /// `X-Admin-Token: <token>`), compared in constant time with every configured token;
    /// `None` without a configured token. Both planes' admin listeners ask this.
    pub fn role_of(&self, headers: &http::HeaderMap) -> Option<AdminRole> {
        use subtle::ConstantTimeEq;
        let given = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| headers.get("x-admin-token").and_then(|v| v.to_str().ok()))?;
        // Every token is compared (no early exit): the time taken does not say which matched.
        let mut role = None;
        for known in &self.tokens {
            let matches = !known.token.is_empty()
                && bool::from(given.as_bytes().ct_eq(known.token.as_bytes()));
            if matches && role != Some(AdminRole::Operator) {
                role = Some(known.role);
            }
        }
        role
    }

    /// May this request do `what`, which needs `needed`? An operator may do what a proxy may.
    pub fn check(
        &self,
        headers: &http::HeaderMap,
        needed: AdminRole,
        what: &'static str,
    ) -> Result<AdminRole, AdminRefusal> {
        match (self.role_of(headers), needed) {
            (None, _) => Err(AdminRefusal::Unauthenticated),
            (Some(AdminRole::Proxy), AdminRole::Operator) => {
                Err(AdminRefusal::NotOperator { what })
            }
            (Some(role), _) => Ok(role),
        }
    }
}

/// How a proxy checks its control planes' certificates on `https://` control URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlTrust {
    /// Certificates chaining to the CA(s) in this PEM file, for the URL's host name or IP.
    Ca(PathBuf),
    /// Exactly these certificates (lower-case hex SHA-256 of their DER), whatever their issuer.
    Pinned(Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProxyConfig {
    /// This proxy's name in leases and in the control plane's `/v1/proxies`.
    pub node_id: String,
    /// The control planes' admin listeners, tried in order with failover; empty: a proxy
    /// keeps its quota locally and takes snapshots only by `PUT`/`PATCH /v1/snapshot`.
    pub control_urls: Vec<String>,
    /// Leases cover this long of a purchase's recent traffic (serving through an outage).
    pub outage_budget: Duration,
    pub lease_min_calls: u64,
    pub lease_max_calls: u64,
    /// The largest pushed snapshot or delta taken, in bytes after decompression (413 above).
    pub max_snapshot_bytes: usize,
    /// The admin token this proxy presents to its control planes (`[proxy] control_token`,
    /// else the `[admin] token` shorthand); a proxy-role token is enough.
    pub control_token: String,
    /// How `https://` control URLs are trusted (`control_ca` or `control_cert_sha256`).
    pub control_trust: Option<ControlTrust>,
    /// This proxy's certificate and key for mutual TLS with its control planes.
    pub control_identity: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `marketgate=debug`.
    pub level: String,
}

/// The validated configuration every subcommand runs from.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub instance_id: String,
    pub data_dir: PathBuf,
    pub database_url: String,
    pub gateway: GatewayConfig,
    pub control: ControlConfig,
    pub admin: AdminConfig,
    pub proxy: ProxyConfig,
    pub log: LogConfig,
    /// True for [`Config::builtin`]: the trial credentials are in use.
    pub trial_credentials: bool,
}

/// Every problem found in a configuration, each naming its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .problems.join("\n  - "))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

// ---- file form -------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
struct FileConfig {
    instance_id: Option<String>,
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    #[serde(default)]
    gateway: FileGateway,
    #[serde(default)]
    control: FileControl,
    #[serde(default)]
    admin: FileAdmin,
    #[serde(default)]
    proxy: FileProxy,
    #[serde(default)]
    log: FileLog,
}

#[derive(Debug, Default, Deserialize)]
struct FileGateway {
    listen: Option<String>,
    tls_listen: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    workers: Option<usize>,
    appcode_over_http: Option<bool>,
    max_body_bytes: Option<usize>,
    max_header_bytes: Option<usize>,
    header_read_timeout_ms: Option<u64>,
    drain_timeout_ms: Option<u64>,
    max_clock_skew_secs: Option<u64>,
    quota_journal_block: Option<u64>,
    upstream_pool_idle_per_host: Option<usize>,
    upstream_pool_idle_secs: Option<u64>,
    max_connections: Option<usize>,
    idle_timeout_ms: Option<u64>,
    body_read_timeout_ms: Option<u64>,
    auth_failure_limit: Option<u32>,
    auth_failure_window_secs: Option<u64>,
    tls_handshake_timeout_ms: Option<u64>,
    h2_max_concurrent_streams: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
struct FileControl {
    listen: Option<String>,
    #[serde(default)]
    credentials: Vec<Credential>,
    #[serde(default)]
    tokens: Vec<Token>,
    /// Removed (proxies subscribe): kept in the file form only to refuse it with the reason.
    proxies: Option<toml::Value>,
    push_debounce_ms: Option<u64>,
    lease_ttl_secs: Option<u64>,
    store_statement_timeout_ms: Option<u64>,
    store_lock_timeout_ms: Option<u64>,
    store_pool_wait_ms: Option<u64>,
    store_pool_size: Option<usize>,
    max_connections: Option<usize>,
    header_read_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    body_read_timeout_ms: Option<u64>,
    auth_failure_limit: Option<u32>,
    auth_failure_window_secs: Option<u64>,
    proxy_expiry_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct FileAdmin {
    listen: Option<String>,
    token: Option<String>,
    #[serde(default)]
    tokens: Vec<AdminToken>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    metrics_public: Option<bool>,
    max_connections: Option<usize>,
    header_read_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    body_read_timeout_ms: Option<u64>,
    auth_failure_limit: Option<u32>,
    auth_failure_window_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct FileProxy {
    node_id: Option<String>,
    control_url: Option<String>,
    /// Read as any value so that a string or a list of non-strings is refused with the reason.
    control_urls: Option<toml::Value>,
    outage_budget_secs: Option<u64>,
    lease_min_calls: Option<u64>,
    lease_max_calls: Option<u64>,
    max_snapshot_bytes: Option<usize>,
    control_token: Option<String>,
    control_ca: Option<PathBuf>,
    control_cert_sha256: Option<Vec<String>>,
    control_client_cert: Option<PathBuf>,
    control_client_key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
struct FileLog {
    format: Option<LogFormat>,
    level: Option<String>,
}

impl Config {
    /// Reads `path`, applies `MARKETGATE_*` overrides from the process environment, validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            problems: vec![format!("cannot read {}: {e}", path.display())],
        })?;
        Self::from_toml(&text, std::env::vars())
    }

    /// Built-in defaults for `marketgate serve` without `--config`, with environment overrides.
    pub fn builtin() -> Result<Config, ConfigError> {
        let mut config = Self::from_toml("", std::env::vars())?;
        if config.control.credentials.is_empty() && config.control.tokens.is_empty() {
            config.trial_credentials = true;
            config.control.tokens = vec![
                Token {
                    token: TRIAL_MARKET_TOKEN.into(),
                    domain_id: "market".into(),
                    project_id: "market".into(),
                    role: Role::Market,
                },
                Token {
                    token: TRIAL_SELLER_TOKEN.into(),
                    domain_id: TRIAL_SELLER_DOMAIN.into(),
                    project_id: TRIAL_SELLER_PROJECT.into(),
                    role: Role::Tenant,
                },
            ];
            config.control.credentials = vec![Credential {
                access_key: TRIAL_SELLER_AK.into(),
                secret_key: TRIAL_SELLER_SK.into(),
                domain_id: TRIAL_SELLER_DOMAIN.into(),
                project_id: TRIAL_SELLER_PROJECT.into(),
                role: Role::Tenant,
            }];
        }
        if config.admin.tokens.is_empty() {
            config.admin.tokens = vec![AdminToken {
                token: TRIAL_ADMIN_TOKEN.into(),
                role: AdminRole::Operator,
            }];
            config.trial_credentials = true;
        }
        Ok(config)
    }

    /// Parses TOML text, applies overrides from `env` (`MARKETGATE_SECTION__KEY=value`),
    /// validates. An empty text gives the defaults.
    pub fn from_toml(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let mut table: toml::Table = match text.parse() {
            Ok(table) => table,
            Err(e) => {
                return Err(ConfigError {
                    problems: vec![format!("not valid TOML: {e}")],
                })
            }
        };
        let origins = apply_env_overrides(&mut table, env, &mut problems);
        // Every unknown key and every value of the wrong type, not only serde's first: each
        // value of the wrong type is taken out, so the rest still deserializes and is
        // validated below.
        let mut found = Vec::new();
        let file = loose_deserialize(&mut table, &mut found);
        problems.extend(
            found
                .into_iter()
                .map(|(path, problem)| where_from(text, &origins, &path, &problem)),
        );
        let config = Self::validate(file, &mut problems);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems })
        }
    }

    fn validate(file: FileConfig, problems: &mut Vec<String>) -> Config {
        let mut addr = |key: &str, value: Option<String>, default: &str| -> SocketAddr {
            let text = value.unwrap_or_else(|| default.to_owned());
            text.parse().unwrap_or_else(|_| {
                problems.push(format!(
                    "{key}: '{text}' is not an address like 127.0.0.1:8080"
                ));
                default.parse().expect("defaults are valid addresses")
            })
        };
        let gateway_listen = addr(
            "gateway.listen",
            file.gateway.listen,
            DEFAULT_GATEWAY_LISTEN,
        );
        let control_listen = addr(
            "control.listen",
            file.control.listen,
            DEFAULT_CONTROL_LISTEN,
        );
        let admin_listen = addr("admin.listen", file.admin.listen, DEFAULT_ADMIN_LISTEN);
        let tls_listen = file
            .gateway
            .tls_listen
            .map(|t| addr("gateway.tls_listen", Some(t), DEFAULT_GATEWAY_LISTEN));

        let data_dir = file
            .data_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let database_url = file
            .database_url
            .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("marketgate.db").display()));
        if !(database_url.starts_with("sqlite://")
            || database_url.starts_with("postgres://")
            || database_url.starts_with("postgresql://"))
        {
            problems.push(format!(
                "database_url: '{}' must start with sqlite:// or postgres://",
                redact_url(&database_url)
            ));
        }
        if tls_listen.is_some()
            && (file.gateway.tls_cert.is_none() || file.gateway.tls_key.is_none())
        {
            problems.push(
                "gateway.tls_listen: needs gateway.tls_cert and gateway.tls_key (the default certificate)"
                    .into(),
            );
        }
        if file.gateway.tls_cert.is_some() != file.gateway.tls_key.is_some() {
            problems.push("gateway.tls_cert and gateway.tls_key go together".into());
        }
        let positive = |problems: &mut Vec<String>, key: &str, value: u64| {
            if value == 0 {
                problems.push(format!("{key}: must be greater than 0"));
            }
        };
        let max_body_bytes = file
            .gateway
            .max_body_bytes
            .unwrap_or(DEFAULT_MAX_BODY_BYTES);
        positive(problems, "gateway.max_body_bytes", max_body_bytes as u64);
        let max_header_bytes = file
            .gateway
            .max_header_bytes
            .unwrap_or(DEFAULT_MAX_HEADER_BYTES);
        if max_header_bytes < 1024 {
            problems.push("gateway.max_header_bytes: must be at least 1024".into());
        }
        let quota_journal_block = file
            .gateway
            .quota_journal_block
            .unwrap_or(DEFAULT_QUOTA_JOURNAL_BLOCK);
        positive(problems, "gateway.quota_journal_block", quota_journal_block);
        let header_read_timeout_ms = file
            .gateway
            .header_read_timeout_ms
            .unwrap_or(DEFAULT_HEADER_READ_TIMEOUT_MS);
        positive(
            problems,
            "gateway.header_read_timeout_ms",
            header_read_timeout_ms,
        );

        for (i, c) in file.control.credentials.iter().enumerate() {
            if c.access_key.is_empty() || c.secret_key.is_empty() {
                problems.push(format!(
                    "control.credentials[{i}]: access_key and secret_key must not be empty"
                ));
            }
        }
        for (i, t) in file.control.tokens.iter().enumerate() {
            if t.token.len() < 8 {
                problems.push(format!(
                    "control.tokens[{i}].token: must be at least 8 characters"
                ));
            }
        }
        if file.control.proxies.is_some() {
            problems.push(
                "control.proxies: removed: proxies subscribe to the control plane themselves \
                 ([proxy] control_urls on each proxy); delete this table"
                    .into(),
            );
        }
        let control_urls = control_urls(
            file.proxy.control_url.as_deref(),
            file.proxy.control_urls.as_ref(),
            problems,
        );
        let outage_budget_secs = file
            .proxy
            .outage_budget_secs
            .unwrap_or(DEFAULT_OUTAGE_BUDGET_SECS);
        positive(problems, "proxy.outage_budget_secs", outage_budget_secs);
        let proxy_expiry_secs = file
            .control
            .proxy_expiry_secs
            .unwrap_or(DEFAULT_PROXY_EXPIRY_SECS);
        if proxy_expiry_secs < 2 {
            problems.push("control.proxy_expiry_secs: must be at least 2".into());
        }
        let lease_min_calls = file
            .proxy
            .lease_min_calls
            .unwrap_or(DEFAULT_LEASE_MIN_CALLS);
        let lease_max_calls = file
            .proxy
            .lease_max_calls
            .unwrap_or(DEFAULT_LEASE_MAX_CALLS);
        positive(problems, "proxy.lease_min_calls", lease_min_calls);
        if lease_max_calls < lease_min_calls {
            problems.push("proxy.lease_max_calls: must not be below proxy.lease_min_calls".into());
        }
        let max_snapshot_bytes = file
            .proxy
            .max_snapshot_bytes
            .unwrap_or(DEFAULT_MAX_SNAPSHOT_BYTES);
        if max_snapshot_bytes < 1024 {
            problems.push("proxy.max_snapshot_bytes: must be at least 1024".into());
        }
        let store_limits = {
            use crate::control::store as st;
            let ms = |key: &str, value: Option<u64>, default: u64, problems: &mut Vec<String>| {
                let value = value.unwrap_or(default);
                if value == 0 {
                    problems.push(format!("control.{key}: must be greater than 0"));
                }
                Duration::from_millis(value)
            };
            let c = (
                file.control.store_statement_timeout_ms,
                file.control.store_lock_timeout_ms,
                file.control.store_pool_wait_ms,
            );
            let pool_size = file
                .control
                .store_pool_size
                .unwrap_or(st::DEFAULT_POOL_SIZE);
            positive(problems, "control.store_pool_size", pool_size as u64);
            st::StoreLimits {
                statement_timeout: ms(
                    "store_statement_timeout_ms",
                    c.0,
                    st::DEFAULT_STATEMENT_TIMEOUT_MS,
                    problems,
                ),
                lock_timeout: ms(
                    "store_lock_timeout_ms",
                    c.1,
                    st::DEFAULT_LOCK_TIMEOUT_MS,
                    problems,
                ),
                pool_wait: ms(
                    "store_pool_wait_ms",
                    c.2,
                    st::DEFAULT_POOL_WAIT_MS,
                    problems,
                ),
                pool_size,
            }
        };
        let gateway_connections = connection_limits(
            problems,
            "gateway",
            [
                file.gateway.max_connections.map(|n| n as u64),
                Some(header_read_timeout_ms),
                file.gateway.idle_timeout_ms,
                file.gateway.body_read_timeout_ms,
            ],
            [
                file.gateway.auth_failure_limit.map(u64::from),
                file.gateway.auth_failure_window_secs,
            ],
            DEFAULT_GATEWAY_MAX_CONNECTIONS,
        );
        let control_connections = connection_limits(
            problems,
            "control",
            [
                file.control.max_connections.map(|n| n as u64),
                file.control.header_read_timeout_ms,
                file.control.idle_timeout_ms,
                file.control.body_read_timeout_ms,
            ],
            [
                file.control.auth_failure_limit.map(u64::from),
                file.control.auth_failure_window_secs,
            ],
            DEFAULT_CONTROL_MAX_CONNECTIONS,
        );
        let admin_connections = connection_limits(
            problems,
            "admin",
            [
                file.admin.max_connections.map(|n| n as u64),
                file.admin.header_read_timeout_ms,
                file.admin.idle_timeout_ms,
                file.admin.body_read_timeout_ms,
            ],
            [
                file.admin.auth_failure_limit.map(u64::from),
                file.admin.auth_failure_window_secs,
            ],
            DEFAULT_ADMIN_MAX_CONNECTIONS,
        );
        let tls_handshake_timeout_ms = file
            .gateway
            .tls_handshake_timeout_ms
            .unwrap_or(DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS);
        positive(
            problems,
            "gateway.tls_handshake_timeout_ms",
            tls_handshake_timeout_ms,
        );
        let h2_max_concurrent_streams = file
            .gateway
            .h2_max_concurrent_streams
            .unwrap_or(DEFAULT_H2_MAX_CONCURRENT_STREAMS);
        positive(
            problems,
            "gateway.h2_max_concurrent_streams",
            h2_max_concurrent_streams as u64,
        );
        let node_id = file
            .proxy
            .node_id
            .unwrap_or_else(|| default_node_id(&data_dir));
        if node_id.is_empty() {
            problems.push("proxy.node_id: must not be empty".into());
        }
        let admin_token = file.admin.token.unwrap_or_default();
        if !admin_token.is_empty() && admin_token.len() < MIN_ADMIN_TOKEN_CHARS {
            problems.push(format!(
                "admin.token: must be at least {MIN_ADMIN_TOKEN_CHARS} characters"
            ));
        }
        for (i, t) in file.admin.tokens.iter().enumerate() {
            if t.token.len() < MIN_ADMIN_TOKEN_CHARS {
                problems.push(format!(
                    "admin.tokens[{i}].token: must be at least {MIN_ADMIN_TOKEN_CHARS} characters"
                ));
            }
        }
        // The shorthand is an operator token, listed first.
        let admin_tokens: Vec<AdminToken> = (!admin_token.is_empty())
            .then(|| AdminToken {
                token: admin_token.clone(),
                role: AdminRole::Operator,
            })
            .into_iter()
            .chain(file.admin.tokens)
            .collect();
        let admin_tls = match (file.admin.tls_cert, file.admin.tls_key) {
            (Some(cert), Some(key)) => Some(AdminTls {
                cert,
                key,
                client_ca: file.admin.tls_client_ca,
            }),
            (None, None) => {
                if file.admin.tls_client_ca.is_some() {
                    problems.push(
                        "admin.tls_client_ca: needs admin.tls_cert and admin.tls_key (client \
                         certificates are asked for over TLS only)"
                            .into(),
                    );
                }
                None
            }
            _ => {
                problems.push("admin.tls_cert and admin.tls_key go together".into());
                None
            }
        };
        let control_token = file.proxy.control_token.unwrap_or(admin_token);
        if !control_token.is_empty() && control_token.len() < MIN_ADMIN_TOKEN_CHARS {
            problems.push(format!(
                "proxy.control_token: must be at least {MIN_ADMIN_TOKEN_CHARS} characters"
            ));
        }
        let control_trust = control_trust(
            file.proxy.control_ca,
            file.proxy.control_cert_sha256,
            &control_urls,
            problems,
        );
        let control_identity = match (
            file.proxy.control_client_cert,
            file.proxy.control_client_key,
        ) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                problems.push(
                    "proxy.control_client_cert and proxy.control_client_key go together".into(),
                );
                None
            }
        };
        let instance_id = file
            .instance_id
            .unwrap_or_else(|| DEFAULT_INSTANCE_ID.to_owned());
        if instance_id.is_empty() {
            problems.push("instance_id: must not be empty".into());
        }

        Config {
            instance_id,
            data_dir,
            database_url,
            gateway: GatewayConfig {
                listen: gateway_listen,
                tls_listen,
                tls_cert: file.gateway.tls_cert,
                tls_key: file.gateway.tls_key,
                workers: file.gateway.workers.unwrap_or(DEFAULT_GATEWAY_WORKERS),
                appcode_over_http: file
                    .gateway
                    .appcode_over_http
                    .unwrap_or(DEFAULT_APPCODE_OVER_HTTP),
                max_body_bytes,
                max_header_bytes,
                header_read_timeout: Duration::from_millis(header_read_timeout_ms),
                drain_timeout: Duration::from_millis(
                    file.gateway
                        .drain_timeout_ms
                        .unwrap_or(DEFAULT_DRAIN_TIMEOUT_MS),
                ),
                max_clock_skew: Duration::from_secs(
                    file.gateway
                        .max_clock_skew_secs
                        .unwrap_or(DEFAULT_MAX_CLOCK_SKEW_SECS),
                ),
                quota_journal_block,
                upstream_pool_idle_per_host: file
                    .gateway
                    .upstream_pool_idle_per_host
                    .unwrap_or(DEFAULT_UPSTREAM_POOL_IDLE_PER_HOST),
                upstream_pool_idle: Duration::from_secs(
                    file.gateway
                        .upstream_pool_idle_secs
                        .unwrap_or(DEFAULT_UPSTREAM_POOL_IDLE_SECS),
                ),
                connections: gateway_connections,
                tls_handshake_timeout: Duration::from_millis(tls_handshake_timeout_ms),
                h2_max_concurrent_streams,
            },
            control: ControlConfig {
                listen: control_listen,
                credentials: file.control.credentials,
                tokens: file.control.tokens,
                push_debounce: Duration::from_millis(
                    file.control
                        .push_debounce_ms
                        .unwrap_or(DEFAULT_PUSH_DEBOUNCE_MS),
                ),
                lease_ttl: Duration::from_secs(
                    file.control
                        .lease_ttl_secs
                        .unwrap_or(DEFAULT_LEASE_TTL_SECS),
                ),
                store: store_limits,
                connections: control_connections,
                proxy_expiry: Duration::from_secs(proxy_expiry_secs),
            },
            admin: AdminConfig {
                listen: admin_listen,
                tokens: admin_tokens,
                metrics_public: file.admin.metrics_public.unwrap_or(false),
                connections: admin_connections,
                tls: admin_tls,
            },
            proxy: ProxyConfig {
                node_id,
                control_urls,
                outage_budget: Duration::from_secs(outage_budget_secs),
                lease_min_calls,
                lease_max_calls,
                max_snapshot_bytes,
                control_token,
                control_trust,
                control_identity,
            },
            log: LogConfig {
                format: file.log.format.unwrap_or(LogFormat::Text),
                level: {
                    let level = file
                        .log
                        .level
                        .unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_owned());
                    if let Some(problem) = log_level_problem(&level) {
                        problems.push(format!("log.level: '{level}' {problem}"));
                    }
                    level
                },
            },
            trial_credentials: false,
        }
    }

    /// What `marketgate control` needs beyond the file's own rules: an admin token, or no
    /// proxy could subscribe.
    pub fn require_control_tokens(&self) -> Result<(), ConfigError> {
        if self.admin.tokens.is_empty() {
            Err(ConfigError {
                problems: vec![
                    "admin.token or [[admin.tokens]]: required (the planes authenticate to each \
                     other with admin tokens: give proxies a role = \"proxy\" token)"
                        .into(),
                ],
            })
        } else {
            Ok(())
        }
    }

    /// What `marketgate proxy` needs beyond the file's own rules: a token for its control
    /// planes when it has any, else an admin token to be pushed snapshots with.
    pub fn require_proxy_tokens(&self) -> Result<(), ConfigError> {
        let problem = if !self.proxy.control_urls.is_empty() && self.proxy.control_token.is_empty()
        {
            "proxy.control_token (or admin.token): required to subscribe to proxy.control_urls"
        } else if self.proxy.control_urls.is_empty() && self.admin.tokens.is_empty() {
            "admin.token or [[admin.tokens]]: required (a proxy without control_urls is fed by \
             PUT /v1/snapshot with an operator token)"
        } else {
            return Ok(());
        };
        Err(ConfigError {
            problems: vec![problem.into()],
        })
    }
}

/// `[section] max_connections`, `header_read_timeout_ms`, `idle_timeout_ms` and
/// `body_read_timeout_ms` (in that order in `given`), defaulted and checked to be positive.
fn connection_limits(
    problems: &mut Vec<String>,
    section: &str,
    given: [Option<u64>; 4],
    auth: [Option<u64>; 2],
    default_max: usize,
) -> ConnectionLimits {
    let keys = [
        "max_connections",
        "header_read_timeout_ms",
        "idle_timeout_ms",
        "body_read_timeout_ms",
    ];
    let defaults = [
        default_max as u64,
        DEFAULT_HEADER_READ_TIMEOUT_MS,
        DEFAULT_IDLE_TIMEOUT_MS,
        DEFAULT_BODY_READ_TIMEOUT_MS,
    ];
    let mut values = [0u64; 4];
    for i in 0..4 {
        values[i] = given[i].unwrap_or(defaults[i]);
        if values[i] == 0 {
            problems.push(format!("{section}.{}: must be greater than 0", keys[i]));
        }
    }
    ConnectionLimits {
        max_connections: values[0] as usize,
        header_read_timeout: Duration::from_millis(values[1]),
        idle_timeout: Duration::from_millis(values[2]),
        body_read_timeout: Duration::from_millis(values[3]),
        auth_failures: auth_failure_limit(problems, section, auth),
    }
}

/// `[section] auth_failure_limit` (0 turns the bound off) and `auth_failure_window_secs`
/// (positive, at most a day).
fn auth_failure_limit(
    problems: &mut Vec<String>,
    section: &str,
    [limit, window]: [Option<u64>; 2],
) -> crate::auth_guard::AuthFailureLimit {
    let limit = limit.unwrap_or(u64::from(DEFAULT_AUTH_FAILURE_LIMIT));
    let window = window.unwrap_or(DEFAULT_AUTH_FAILURE_WINDOW_SECS);
    if window == 0 || window > 86_400 {
        problems.push(format!(
            "{section}.auth_failure_window_secs: must be between 1 and 86400 (seconds)"
        ));
    }
    crate::auth_guard::AuthFailureLimit {
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
        window: Duration::from_secs(window.clamp(1, 86_400)),
    }
}

/// What is wrong with a URL by which one plane reaches the other's admin listener, if
/// anything: `http://`, or `https://` with `proxy.control_ca` or `control_cert_sha256`.
fn plane_url_problem(url: &str) -> Option<&'static str> {
    if url.starts_with("http://") || url.starts_with("https://") {
        None
    } else {
        Some("must start with http:// or https://")
    }
}

/// `proxy.control_ca` or `proxy.control_cert_sha256` (one of them) when a control URL is
/// `https://`; neither is refused then (there is no system trust store to fall back on), and
/// either without an `https://` URL is refused too (the operator believes in TLS that is not
/// used).
fn control_trust(
    ca: Option<PathBuf>,
    pins: Option<Vec<String>>,
    urls: &[String],
    problems: &mut Vec<String>,
) -> Option<ControlTrust> {
    let https = urls.iter().any(|u| u.starts_with("https://"));
    let trust = match (ca, pins) {
        (Some(_), Some(_)) => {
            problems.push(
                "proxy.control_ca and proxy.control_cert_sha256: give one of them (a CA, or \
                 the pinned certificates)"
                    .into(),
            );
            return None;
        }
        (Some(ca), None) => Some(ControlTrust::Ca(ca)),
        (None, Some(pins)) => {
            let mut good = Vec::new();
            for (i, pin) in pins.iter().enumerate() {
                let pin = pin.trim().to_ascii_lowercase().replace(':', "");
                if pin.len() == 64 && pin.chars().all(|c| c.is_ascii_hexdigit()) {
                    good.push(pin);
                } else {
                    problems.push(format!(
                        "proxy.control_cert_sha256[{i}]: must be the 64 hex digits of a \
                         certificate's SHA-256 (openssl x509 -in cert.pem -outform DER | sha256sum)"
                    ));
                }
            }
            if pins.is_empty() {
                problems.push("proxy.control_cert_sha256: must not be empty".into());
            }
            Some(ControlTrust::Pinned(good))
        }
        (None, None) => None,
    };
    match (https, &trust) {
        (true, None) => problems.push(
            "proxy.control_urls: an https:// control URL needs proxy.control_ca (the CA that \
             signed the control planes' certificates) or proxy.control_cert_sha256 (their \
             certificates pinned)"
                .into(),
        ),
        (false, Some(_)) if !urls.is_empty() => problems.push(
            "proxy.control_ca / proxy.control_cert_sha256: set, but no control URL is \
             https:// (they would not be used)"
                .into(),
        ),
        _ => {}
    }
    trust
}

/// `[proxy] control_urls` (a list), or `control_url` (its one-element shorthand); each URL
/// checked. Malformed forms are refused with the reason: a string where a list belongs, a
/// comma-separated string (which would name no host), both keys at once.
fn control_urls(
    one: Option<&str>,
    list: Option<&toml::Value>,
    problems: &mut Vec<String>,
) -> Vec<String> {
    let mut urls = Vec::new();
    let check = |key: &str, url: &str, urls: &mut Vec<String>, problems: &mut Vec<String>| {
        if url.contains(',') || url.trim() != url || url.contains(' ') {
            problems.push(format!(
                "{key}: '{url}' is not one URL (a comma or a space in it); several control \
                 planes go in a list: control_urls = [\"http://cp-a:8082\", \"http://cp-b:8082\"]"
            ));
        } else if let Some(problem) = plane_url_problem(url) {
            problems.push(format!("{key}: '{url}' {problem}"));
        } else {
            urls.push(url.trim_end_matches('/').to_owned());
        }
    };
    match (one, list) {
        (Some(_), Some(_)) => problems.push(
            "proxy.control_url and proxy.control_urls: give one of them (control_url is the \
             one-element shorthand of control_urls)"
                .into(),
        ),
        (Some(url), None) => check("proxy.control_url", url, &mut urls, problems),
        (None, Some(toml::Value::Array(items))) => {
            if items.is_empty() {
                problems.push(
                    "proxy.control_urls: must not be empty (leave it out for a proxy of its own)"
                        .into(),
                );
            }
            for (i, item) in items.iter().enumerate() {
                match item.as_str() {
                    Some(url) => check(
                        &format!("proxy.control_urls[{i}]"),
                        url,
                        &mut urls,
                        problems,
                    ),
                    None => problems.push(format!(
                        "proxy.control_urls[{i}]: must be a string like \"http://cp-a:8082\""
                    )),
                }
            }
        }
        (None, Some(other)) => problems.push(format!(
            "proxy.control_urls: must be a list like [\"http://cp-a:8082\", \"http://cp-b:8082\"], \
             not a {}",
            other.type_str()
        )),
        (None, None) => {}
    }
    urls
}

/// The host name and a short hash of the absolute `data_dir`: unique per host and data
/// directory, stable across restarts (two proxies on one host with their own directories get
/// two ids; one directory keeps its id).
fn default_node_id(data_dir: &Path) -> String {
    use sha2::{Digest, Sha256};
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "proxy".to_owned());
    let dir = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let digest = Sha256::digest(dir.as_os_str().as_encoded_bytes());
    format!("{host}-{}", hex::encode(&digest[..4]))
}

/// A database URL with any password replaced, safe for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Variables that share the `MARKETGATE_` prefix but belong to tools, not to the config:
/// the buyer tool's credentials, the CLI's backtrace switch and the test suites' binary path.
pub const NON_CONFIG_VARIABLES: &[&str] = &[
    "MARKETGATE_APP_KEY",
    "MARKETGATE_APP_SECRET",
    "MARKETGATE_BACKTRACE",
    "MARKETGATE_BIN",
];

/// `MARKETGATE_GATEWAY__LISTEN=0.0.0.0:80` sets `[gateway] listen`; `MARKETGATE_DATA_DIR`
/// sets the top-level `data_dir`. Values parse as TOML scalars when they can (numbers,
/// booleans), else they are strings. [`NON_CONFIG_VARIABLES`] are skipped; any other
/// `MARKETGATE_*` name that is not a config key is an error, so typos are caught.
/// Returns which variable set each key path it set (`gateway.listen` →
/// `MARKETGATE_GATEWAY__LISTEN`), so that a problem with it names the variable.
fn apply_env_overrides(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
    problems: &mut Vec<String>,
) -> HashMap<String, String> {
    let mut origins = HashMap::new();
    for (name, raw) in env {
        let Some(path) = name.strip_prefix("MARKETGATE_") else {
            continue;
        };
        if NON_CONFIG_VARIABLES.contains(&name.as_str()) {
            continue;
        }
        let parts: Vec<String> = path.split("__").map(|p| p.to_ascii_lowercase()).collect();
        let value = format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .filter(|v| !v.is_table())
            .unwrap_or_else(|| toml::Value::String(raw.clone()));
        match parts.as_slice() {
            [key] => {
                table.insert(key.clone(), value);
                origins.insert(key.clone(), name);
            }
            [section, key] => {
                let entry = table
                    .entry(section.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                match entry.as_table_mut() {
                    Some(section_table) => {
                        section_table.insert(key.clone(), value);
                        origins.insert(format!("{section}.{key}"), name);
                    }
                    None => problems.push(format!("{name}: {section} is not a table")),
                }
            }
            _ => problems.push(format!(
                "{name}: environment overrides take MARKETGATE_KEY or MARKETGATE_SECTION__KEY"
            )),
        }
    }
    origins
}

/// `[log] level` when the file says nothing.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// The levels a `[log] level` directive may name.
const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Why `level` is not a filter of levels (`info`, `marketgate=debug,hyper=warn`); `None` when
/// it is. A bare word that is no level (`loud`) would be taken by `tracing` as a target
/// name with no level, and the process would log nothing at all.
fn log_level_problem(level: &str) -> Option<String> {
    for directive in level.split(',').map(str::trim) {
        let named = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        let target_ok = directive.rsplit_once('=').is_none_or(|(target, _)| {
            !target.is_empty()
                && target
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_:-.[]{}=\" \'".contains(c))
        });
        if !LOG_LEVELS.contains(&named.to_ascii_lowercase().as_str()) || !target_ok {
            return Some(format!(
                "is not a log filter: each comma-separated part must be a level ({}) or \
                 target=level, e.g. \"info\" or \"info,marketgate=debug\"",
                LOG_LEVELS.join(", ")
            ));
        }
    }
    None
}

/// Deserializes `table` into the file form, reporting in `problems` (by key path) every key
/// the types do not know and every value serde refuses, so that neither hides the others:
/// each top-level value and each key of a section is deserialized on its own, through
/// `serde_ignored`, which names every key the file form ignored; a value of the wrong type is
/// taken out before the whole is deserialized. The known keys are the file form's fields: no
/// list of them is kept by hand.
fn loose_deserialize(table: &mut toml::Table, problems: &mut Vec<(String, String)>) -> FileConfig {
    let keys: Vec<String> = table.keys().cloned().collect();
    for key in keys {
        let section = table.get(&key).and_then(toml::Value::as_table).cloned();
        match section {
            // A section: each of its keys on its own (arrays of tables stay whole).
            Some(section) => {
                for inner in section.keys() {
                    let one = toml::Table::from_iter([(
                        key.clone(),
                        toml::Value::Table(toml::Table::from_iter([(
                            inner.clone(),
                            section[inner].clone(),
                        )])),
                    )]);
                    if let Err(e) = deserialize_reporting(one, problems) {
                        problems.push((format!("{key}.{inner}"), serde_message(&e)));
                        if let Some(t) = table.get_mut(&key).and_then(toml::Value::as_table_mut) {
                            t.remove(inner);
                        }
                    }
                }
            }
            None => {
                let one = toml::Table::from_iter([(key.clone(), table[&key].clone())]);
                if let Err(e) = deserialize_reporting(one, problems) {
                    problems.push((key.clone(), serde_message(&e)));
                    table.remove(&key);
                }
            }
        }
    }
    // What is left deserializes; its unknown keys were reported above.
    toml::Value::Table(table.clone())
        .try_into()
        .unwrap_or_default()
}

/// Deserializes `one` into the file form, adding each key it ignores to `problems` as an
/// unknown key (once per path: an unknown section is one problem, not one per key in it).
fn deserialize_reporting(
    one: toml::Table,
    problems: &mut Vec<(String, String)>,
) -> Result<FileConfig, toml::de::Error> {
    let mut unknown = Vec::new();
    let parsed = serde_ignored::deserialize(toml::Value::Table(one), |path| {
        unknown.push(key_path(&path))
    });
    for path in unknown {
        if !problems.iter().any(|(p, _)| *p == path) {
            problems.push((path, "unknown key".to_owned()));
        }
    }
    parsed
}

/// `serde_ignored`'s path as the config names keys: `gateway.speed`, `control.tokens[0].extra`.
fn key_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", key_path(parent)),
        Path::Map { parent, key } => match key_path(parent) {
            parent if parent.is_empty() => key.to_string(),
            parent => format!("{parent}.{key}"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => key_path(parent),
    }
}

/// serde's message without toml's "in `key`" line (the key path is said in front).
fn serde_message(e: &toml::de::Error) -> String {
    let text = e.to_string();
    text.lines().next().unwrap_or("").trim().to_owned()
}

/// `problem` about key `path`, saying where the value came from: the variable that set it,
/// or its line in the file.
fn where_from(text: &str, origins: &HashMap<String, String>, path: &str, problem: &str) -> String {
    if let Some(variable) = origins.get(path) {
        return match problem {
            "unknown key" => format!(
                "{variable}: not a config variable (it would set {path}, which is no key; see \
                 docs/operations.md)"
            ),
            _ => format!("{variable} (sets {path}): {problem}"),
        };
    }
    match line_of(text, path) {
        Some(line) => format!("{path} (line {line}): {problem}"),
        None => format!("{path}: {problem}"),
    }
}

/// The 1-based line of `key = …` for `section.key` (or a top-level `key`) in TOML text;
/// `None` for keys in arrays of tables, or when it cannot be found.
fn line_of(text: &str, path: &str) -> Option<usize> {
    let (section, key) = match path.split_once('.') {
        Some((section, key)) if !key.contains(['.', '[']) => (section, key),
        None => ("", path),
        Some(_) => return None,
    };
    let mut current = String::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
            current = header.trim_start_matches('[').trim().to_owned();
            // An unknown section is named by its header.
            if current == path {
                return Some(number + 1);
            }
            continue;
        }
        let assigned = line
            .split_once('=')
            .map(|(name, _)| name.trim().trim_matches(['"', '\'']));
        if current == section && assigned == Some(key) {
            return Some(number + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    #[test]
    fn empty_file_gives_loopback_defaults() {
        let config = Config::from_toml("", no_env()).unwrap();
        assert_eq!(config.gateway.listen.to_string(), DEFAULT_GATEWAY_LISTEN);
        assert_eq!(config.control.listen.to_string(), DEFAULT_CONTROL_LISTEN);
        assert_eq!(config.admin.listen.to_string(), DEFAULT_ADMIN_LISTEN);
        assert!(config.database_url.starts_with("sqlite://"));
        assert_eq!(config.instance_id, DEFAULT_INSTANCE_ID);
        assert_eq!(config.proxy.max_snapshot_bytes, DEFAULT_MAX_SNAPSHOT_BYTES);
    }

    #[test]
    fn every_unknown_key_and_bad_value_is_reported_at_once() {
        let err = Config::from_toml(
            "colour = 1\n[gateway]\nlisten = 'nope'\nspeed = 3\n[[control.tokens]]\ntoken='abcdefgh'\ndomain_id='d'\nproject_id='p'\nrole='tenant'\nextra=1\n",
            no_env(),
        )
        .unwrap_err();
        let all = err.problems.join("\n");
        assert!(all.contains("colour (line 1): unknown key"), "{all}");
        assert!(all.contains("gateway.speed (line 4): unknown key"), "{all}");
        // Unknown keys no longer hide the other problems.
        assert!(
            all.contains("gateway.listen: 'nope' is not an address"),
            "{all}"
        );
        assert!(
            all.contains("control.tokens[0].extra: unknown key"),
            "{all}"
        );
    }

    #[test]
    fn the_known_keys_are_the_types_fields() {
        // An unknown section is one problem; keys in arrays of tables are named with their
        // index; a key the types gained (admin.tokens, proxy.control_ca) needs no list.
        let err = Config::from_toml(
            "[colours]\nred = 1\nblue = 2\n[admin]\ntoken = 'abcdefgh'\n\
             [[admin.tokens]]\ntoken = 'ijklmnop'\nrole = 'proxy'\nscope = 'all'\n\
             [proxy]\ncontrol_url = 'https://cp:8082'\ncontrol_ca = 'ca.pem'\ncontrol_cas = 'x'\n",
            no_env(),
        )
        .unwrap_err();
        assert_eq!(
            err.problems,
            vec![
                "admin.tokens[0].scope: unknown key".to_owned(),
                "colours (line 1): unknown key".to_owned(),
                "proxy.control_cas (line 13): unknown key".to_owned(),
            ]
        );
    }

    #[test]
    fn the_example_configs_use_only_known_keys() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/config");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            if let Err(err) = Config::from_toml(&text, no_env()) {
                let unknown: Vec<_> = err
                    .problems
                    .iter()
                    .filter(|p| p.contains("unknown key"))
                    .collect();
                assert!(unknown.is_empty(), "{}: {unknown:?}", path.display());
            }
            checked += 1;
        }
        assert!(checked >= 3, "the example configs in {}", dir.display());
    }

    #[test]
    fn bad_values_are_all_named() {
        let err = Config::from_toml(
            "database_url = 'mysql://x'\n[gateway]\nlisten = 'nope'\nmax_body_bytes = 0\n\
             [proxy]\nmax_snapshot_bytes = 100\n",
            no_env(),
        )
        .unwrap_err();
        let all = err.problems.join("\n");
        assert!(all.contains("gateway.listen"), "{all}");
        assert!(all.contains("database_url"), "{all}");
        assert!(all.contains("gateway.max_body_bytes"), "{all}");
        assert!(
            all.contains("proxy.max_snapshot_bytes: must be at least 1024"),
            "{all}"
        );
    }

    #[test]
    fn https_between_the_planes_needs_a_trust_and_says_which() {
        let err = Config::from_toml(
            "[proxy]\ncontrol_urls = ['https://control:8082', 'cp-b:8082']\n",
            no_env(),
        )
        .unwrap_err();
        let all = err.problems.join("\n");
        assert!(
            all.contains("proxy.control_urls: an https:// control URL needs proxy.control_ca"),
            "{all}"
        );
        assert!(
            all.contains("proxy.control_urls[1]: 'cp-b:8082' must start with http:// or https://"),
            "{all}"
        );
        let pinned = format!(
            "[proxy]\ncontrol_url = 'https://control:8082/'\ncontrol_cert_sha256 = ['{}']\n",
            "AB".repeat(32)
        );
        let config = Config::from_toml(&pinned, no_env()).unwrap();
        assert_eq!(config.proxy.control_urls, vec!["https://control:8082"]);
        assert_eq!(
            config.proxy.control_trust,
            Some(ControlTrust::Pinned(vec!["ab".repeat(32)]))
        );
        let err = Config::from_toml(
            "[proxy]\ncontrol_url = 'http://control:8082'\ncontrol_ca = 'ca.pem'\n\
             control_client_cert = 'c.pem'\n[admin]\ntls_key = 'k.pem'\n",
            no_env(),
        )
        .unwrap_err();
        let all = err.problems.join("\n");
        for expected in [
            "set, but no control URL is https://",
            "proxy.control_client_cert and proxy.control_client_key go together",
            "admin.tls_cert and admin.tls_key go together",
        ] {
            assert!(all.contains(expected), "{expected}: {all}");
        }
    }

    #[test]
    fn admin_tokens_have_roles_and_several_are_accepted() {
        let text = "[admin]\ntoken = 'operator-old'\n\
                    [[admin.tokens]]\ntoken = 'operator-new'\nrole = 'operator'\n\
                    [[admin.tokens]]\ntoken = 'proxy-token'\nrole = 'proxy'\n\
                    [proxy]\ncontrol_url = 'http://cp:8082'\ncontrol_token = 'proxy-token'\n";
        let config = Config::from_toml(text, no_env()).unwrap();
        let with = |token: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(
                http::header::AUTHORIZATION,
                format!("Bearer {token}").parse().unwrap(),
            );
            headers
        };
        let admin = &config.admin;
        assert_eq!(
            admin.role_of(&with("operator-old")),
            Some(AdminRole::Operator)
        );
        assert_eq!(
            admin.role_of(&with("operator-new")),
            Some(AdminRole::Operator)
        );
        assert_eq!(admin.role_of(&with("proxy-token")), Some(AdminRole::Proxy));
        assert_eq!(admin.role_of(&with("nope-nope")), None);
        assert_eq!(admin.role_of(&http::HeaderMap::new()), None);
        let refused = admin
            .check(
                &with("proxy-token"),
                AdminRole::Operator,
                "PUT /v1/snapshot",
            )
            .unwrap_err();
        assert!(refused
            .to_string()
            .starts_with("PUT /v1/snapshot needs an operator token"));
        assert!(admin
            .check(&with("operator-new"), AdminRole::Proxy, "POST /v1/leases")
            .is_ok());
        assert_eq!(config.proxy.control_token, "proxy-token");
        // The shorthand is what a proxy presents when it has no control_token.
        let short = Config::from_toml(
            "[admin]\ntoken = 'one-token'\n[proxy]\ncontrol_url = 'http://cp:8082'\n",
            no_env(),
        )
        .unwrap();
        assert_eq!(short.proxy.control_token, "one-token");
        let err = Config::from_toml(
            "[[admin.tokens]]\ntoken = 'short'\nrole = 'root'\n",
            no_env(),
        )
        .unwrap_err();
        let all = err.problems.join("\n");
        assert!(all.contains("admin.tokens"), "{all}");
    }

    #[test]
    fn control_urls_is_a_list_and_malformed_forms_say_why() {
        let list = "[proxy]\ncontrol_urls = ['http://cp-a:8082', 'http://cp-b:8082']\n";
        let config = Config::from_toml(list, no_env()).unwrap();
        assert_eq!(
            config.proxy.control_urls,
            vec!["http://cp-a:8082", "http://cp-b:8082"]
        );
        for (text, expected) in [
            (
                "[proxy]\ncontrol_url = 'http://cp-a:8082,http://cp-b:8082'\n",
                "is not one URL",
            ),
            (
                "[proxy]\ncontrol_urls = 'http://cp-a:8082,http://cp-b:8082'\n",
                "must be a list like",
            ),
            (
                "[proxy]\ncontrol_urls = [1]\n",
                "proxy.control_urls[0]: must be a string",
            ),
            ("[proxy]\ncontrol_urls = []\n", "must not be empty"),
            (
                "[proxy]\ncontrol_url = 'http://a:1'\ncontrol_urls = ['http://b:1']\n",
                "give one of them",
            ),
            (
                "[[control.proxies]]\nadmin_url = 'http://proxy-1:8082'\n",
                "control.proxies: removed: proxies subscribe",
            ),
        ] {
            let all = Config::from_toml(text, no_env())
                .unwrap_err()
                .problems
                .join("\n");
            assert!(all.contains(expected), "{text}: {all}");
        }
        // From the environment, a list is a TOML array.
        let env = vec![(
            "MARKETGATE_PROXY__CONTROL_URLS".to_owned(),
            "[\"http://a:1\", \"http://b:1\"]".to_owned(),
        )];
        let config = Config::from_toml("", env).unwrap();
        assert_eq!(config.proxy.control_urls.len(), 2);
    }

    #[test]
    fn the_default_node_id_differs_per_data_dir_and_stays() {
        let a = Config::from_toml("data_dir = '/srv/a'\n", no_env()).unwrap();
        let b = Config::from_toml("data_dir = '/srv/b'\n", no_env()).unwrap();
        let a_again = Config::from_toml("data_dir = '/srv/a'\n", no_env()).unwrap();
        assert_ne!(a.proxy.node_id, b.proxy.node_id);
        assert_eq!(a.proxy.node_id, a_again.proxy.node_id);
    }

    #[test]
    fn environment_overrides_keys() {
        let env = vec![
            (
                "MARKETGATE_GATEWAY__LISTEN".to_owned(),
                "127.0.0.1:9999".to_owned(),
            ),
            ("MARKETGATE_INSTANCE_ID".to_owned(), "inst-9".to_owned()),
            (
                "MARKETGATE_ADMIN__METRICS_PUBLIC".to_owned(),
                "true".to_owned(),
            ),
            (
                "MARKETGATE_PROXY__MAX_SNAPSHOT_BYTES".to_owned(),
                "2147483648".to_owned(),
            ),
        ];
        let config = Config::from_toml("[gateway]\nlisten='127.0.0.1:1'\n", env).unwrap();
        assert_eq!(config.gateway.listen.to_string(), "127.0.0.1:9999");
        assert_eq!(config.instance_id, "inst-9");
        assert!(config.admin.metrics_public);
        assert_eq!(config.proxy.max_snapshot_bytes, 2 << 30);
    }

    #[test]
    fn tool_variables_are_not_config_keys() {
        let env = vec![
            ("MARKETGATE_APP_KEY".to_owned(), "k".to_owned()),
            ("MARKETGATE_BIN".to_owned(), "/x".to_owned()),
        ];
        assert!(Config::from_toml("", env).is_ok());
    }

    #[test]
    fn unknown_environment_key_is_an_error() {
        let env = vec![("MARKETGATE_GATEWAY__LISTENN".to_owned(), "x".to_owned())];
        let err = Config::from_toml("", env).unwrap_err();
        assert!(err.problems[0].contains("gateway.listenn"));
    }

    #[test]
    fn every_problem_in_file_and_environment_is_reported_at_once_with_its_origin() {
        let text = "colour = 1\n[log]\nlevel = \"loud\"\n[gateway]\nlisten = 5\nworkers = \"x\"\n";
        let env = vec![
            ("MARKETGATE_GATEWAY__SPEED".to_owned(), "3".to_owned()),
            (
                "MARKETGATE_ADMIN__METRICS_PUBLIC".to_owned(),
                "maybe".to_owned(),
            ),
        ];
        let problems = Config::from_toml(text, env).unwrap_err().problems;
        let expected = [
            "colour (line 1): unknown key",
            "MARKETGATE_GATEWAY__SPEED: not a config variable (it would set gateway.speed",
            "gateway.listen (line 5): invalid type: integer `5`, expected a string",
            "gateway.workers (line 6): invalid type: string \"x\"",
            "MARKETGATE_ADMIN__METRICS_PUBLIC (sets admin.metrics_public): invalid type",
            "log.level: 'loud' is not a log filter",
        ];
        for want in expected {
            assert!(
                problems.iter().any(|p| p.starts_with(want)),
                "no problem starting {want:?} in {problems:#?}"
            );
        }
        assert_eq!(problems.len(), expected.len(), "{problems:#?}");
    }

    #[test]
    fn log_filters_are_levels_or_target_levels() {
        for good in [
            "info",
            "WARN",
            "info,marketgate=debug",
            "marketgate::control=trace",
            "off",
        ] {
            assert_eq!(log_level_problem(good), None, "{good}");
        }
        for bad in ["loud", "", "info,", "marketgate=loud", "=debug"] {
            assert!(log_level_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn database_password_is_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
    }
}
