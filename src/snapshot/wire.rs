//! The snapshot as it crosses from the control plane to the data plane (`PUT /v1/snapshot`).
//!
//! These types are the contract between the planes: the control plane builds them from its
//! store (`control::publish`), the proxy validates and compiles them (`snapshot::validate`,
//! `snapshot::compile`). They carry only what a proxy needs to decide a request: published
//! RELEASE definitions, never drafts. Unknown fields are refused so that a typo in a
//! hand-written snapshot fails loudly instead of being ignored.

use serde::{Deserialize, Serialize};

/// Everything a proxy serves from, at one version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// Grows with every change; a proxy refuses a push whose version is not greater.
    pub version: u64,
    /// RFC 3339 UTC, informational.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generated_at: Option<String>,
    #[serde(default)]
    pub groups: Vec<Group>,
    #[serde(default)]
    pub apps: Vec<App>,
    #[serde(default)]
    pub purchases: Vec<Purchase>,
    /// Seller-side app authorizations (§5 of the v2 API), used on a group's `sl_domain`.
    #[serde(default)]
    pub app_auths: Vec<AppAuth>,
    /// Certificates for market domains, chosen by SNI.
    #[serde(default)]
    pub certificates: Vec<Certificate>,
    /// Sellers' independent domains, each one more name of its group's market domain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<Domain>,
    /// Request throttling policies bound to published APIs, and who each app calls as.
    #[serde(default, skip_serializing_if = "Throttling::is_empty")]
    pub throttling: Throttling,
}

/// An API group with the RELEASE definitions of its published APIs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub id: String,
    #[serde(default)]
    pub name: String,
    /// The seller's system debug domain: every published API, no purchase needed.
    pub sl_domain: String,
    /// The market domain assigned by onsell; absent while never listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_domain: Option<String>,
    pub market_state: MarketState,
    #[serde(default)]
    pub apis: Vec<Api>,
}

/// A group's state on the market (CONTRACT §3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MarketState {
    Unlisted,
    Locked,
    OnSale,
    OffSale,
    Delisted,
}

impl MarketState {
    pub fn as_str(self) -> &'static str {
        match self {
            MarketState::Unlisted => "unlisted",
            MarketState::Locked => "locked",
            MarketState::OnSale => "on_sale",
            MarketState::OffSale => "off_sale",
            MarketState::Delisted => "delisted",
        }
    }

    /// Does the market domain answer at all in this state? (Delisted answers 403.)
    pub fn has_market_domain(self) -> bool {
        matches!(
            self,
            MarketState::OnSale | MarketState::OffSale | MarketState::Delisted
        )
    }
}

/// The frozen RELEASE definition of one published API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Api {
    pub id: String,
    #[serde(default)]
    pub name: String,
    /// 1 public, 2 private.
    #[serde(rename = "type")]
    pub api_type: u8,
    /// `HTTP`, `HTTPS` or `BOTH`.
    pub req_protocol: String,
    /// `GET`, `POST`, … or `ANY`.
    pub req_method: String,
    /// Literal segments, `{name}` for one segment, `{name+}` for the rest.
    pub req_uri: String,
    /// `NORMAL` exact, `SWA` prefix.
    pub match_mode: String,
    /// `APP`, `IAM`, `NONE` or `AUTHORIZER`.
    pub auth_type: String,
    /// `X-Apig-AppCode` accepted (`auth_opt.app_code_auth_type = HEADER`).
    #[serde(default)]
    pub app_code_auth: bool,
    pub backend: Backend,
}

impl Api {
    /// Public, APP-authenticated and (being in a snapshot) published: reachable on the market.
    pub fn is_sellable(&self) -> bool {
        self.api_type == 1 && self.auth_type == "APP"
    }
}

/// Where a call goes once admitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "UPPERCASE", deny_unknown_fields)]
pub enum Backend {
    Http {
        /// `HTTP` or `HTTPS`.
        req_protocol: String,
        /// A method, or `ANY` to pass the buyer's through.
        req_method: String,
        /// Path template with `{name}` parameters taken from the front-end route.
        req_uri: String,
        /// `host:port`.
        url_domain: String,
        /// Milliseconds.
        timeout_ms: u64,
    },
    Mock {
        #[serde(default = "default_mock_status")]
        status: u16,
        #[serde(default)]
        body: String,
    },
}

fn default_mock_status() -> u16 {
    200
}

/// Credentials a buyer (MARKET app) or a seller's own app signs with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct App {
    pub id: String,
    pub app_key: String,
    pub app_secret: String,
    #[serde(default)]
    pub app_codes: Vec<String>,
    /// `USER` or `MARKET`.
    #[serde(default = "default_creator")]
    pub creator: String,
}

fn default_creator() -> String {
    "USER".to_owned()
}

/// A buyer's purchase of a group (订购关系).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Purchase {
    pub id: String,
    pub group_id: String,
    /// The system-created MARKET app the buyer calls with.
    pub app_id: String,
    pub state: PurchaseState,
    /// Epoch seconds.
    pub start_time: i64,
    /// Epoch seconds.
    pub expire_time: i64,
    /// Calls granted in total; `None` is unlimited (still metered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_limit: Option<u64>,
    /// Calls the control plane's ledger counts as used when the snapshot was built.
    #[serde(default)]
    pub quota_used: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PurchaseState {
    Reserved,
    Active,
    Frozen,
    Unsubscribed,
}

/// An app authorized to call one API on the group's `sl_domain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppAuth {
    pub app_id: String,
    pub api_id: String,
}

/// A seller's independent domain bound to a group (Huawei's `url_domains`): buyers reach the
/// group on it as on its market `url_domain`, with the TLS rules the seller chose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Domain {
    pub domain: String,
    pub group_id: String,
    #[serde(default)]
    pub min_tls_version: MinTlsVersion,
    /// Plain-HTTP requests are redirected to HTTPS.
    #[serde(default)]
    pub https_redirect: bool,
}

/// The lowest TLS version a domain's handshakes may use, by Huawei's names. rustls speaks
/// TLS 1.2 and 1.3 only, so `TLSv1.1` and `TLSv1.2` both admit TLS 1.2 and up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum MinTlsVersion {
    #[default]
    #[serde(rename = "TLSv1.1")]
    Tls11,
    #[serde(rename = "TLSv1.2")]
    Tls12,
    #[serde(rename = "TLSv1.3")]
    Tls13,
}

impl MinTlsVersion {
    /// By Huawei's name (`TLSv1.1`, `TLSv1.2`, `TLSv1.3`).
    pub fn from_name(name: &str) -> Option<MinTlsVersion> {
        match name {
            "TLSv1.1" => Some(MinTlsVersion::Tls11),
            "TLSv1.2" => Some(MinTlsVersion::Tls12),
            "TLSv1.3" => Some(MinTlsVersion::Tls13),
            _ => None,
        }
    }
}

/// A certificate and key (PEM) served for the listed domains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    pub domains: Vec<String>,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Request throttling (Huawei APIG 流控): the policies bound to published APIs and, for the
/// policies' "user" limits, the tenant each app calls as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Throttling {
    #[serde(default)]
    pub policies: Vec<ThrottlePolicy>,
    /// The "user" of each app that a policy with a user limit or a tenant exception may see:
    /// a MARKET app's buyer domain, a USER app's owner domain.
    #[serde(default)]
    pub app_users: Vec<AppUser>,
}

impl Throttling {
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty() && self.app_users.is_empty()
    }
}

/// One request throttling policy and the published APIs it is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottlePolicy {
    pub id: String,
    #[serde(default)]
    pub name: String,
    /// Calls per window to one API (type 1) or to all bound APIs together (type 2).
    pub api_call_limits: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_call_limits: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_call_limits: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_call_limits: Option<u64>,
    /// The window is `time_interval` `time_unit`s.
    pub time_interval: u64,
    pub time_unit: TimeUnit,
    /// Type 2: every bound API counts against one set of counters.
    #[serde(default)]
    pub shared: bool,
    /// The bound APIs (ids of published APIs in the snapshot).
    #[serde(default)]
    pub api_ids: Vec<String>,
    /// Per-APP and per-tenant exceptions.
    #[serde(default)]
    pub specials: Vec<ThrottleSpecial>,
}

/// A throttling window's unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum TimeUnit {
    Second,
    Minute,
    Hour,
    Day,
}

impl TimeUnit {
    pub fn seconds(self) -> u64 {
        match self {
            TimeUnit::Second => 1,
            TimeUnit::Minute => 60,
            TimeUnit::Hour => 3_600,
            TimeUnit::Day => 86_400,
        }
    }

    /// Huawei's name of the unit in messages and headers (`1 minute`, `10 second`).
    pub fn word(self) -> &'static str {
        match self {
            TimeUnit::Second => "second",
            TimeUnit::Minute => "minute",
            TimeUnit::Hour => "hour",
            TimeUnit::Day => "day",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TimeUnit::Second => "SECOND",
            TimeUnit::Minute => "MINUTE",
            TimeUnit::Hour => "HOUR",
            TimeUnit::Day => "DAY",
        }
    }
}

/// An exception to a policy: one APP's, or one tenant's (user), own limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottleSpecial {
    pub object_type: SpecialKind,
    /// An app id (APP) or a tenant's domain id (USER).
    pub object_id: String,
    pub call_limits: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum SpecialKind {
    App,
    User,
}

/// The tenant an app calls as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppUser {
    pub app_id: String,
    pub user: String,
}
