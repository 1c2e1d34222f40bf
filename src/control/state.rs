//! The market state held in memory: entities, their invariants, and how committed changes
//! apply. Loaded whole from the store at start; changed only through [`Change`]s that have
//! been committed to the store first (see `ControlPlane::commit`).
//!
//! Must not do I/O or HTTP: handlers validate against a `&State`, produce `Change`s, the
//! control plane commits them and then calls [`State::apply`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::snapshot::{self, MarketState, PurchaseState};

use super::error::ControlError;
use super::store::{Loaded, Write};

/// The built-in environment.
pub const RELEASE_ENV_ID: &str = "DEFAULT_ENVIRONMENT_RELEASE_ID";
pub const RELEASE_ENV_NAME: &str = "RELEASE";
/// Huawei's limit of app codes per app.
pub const MAX_APP_CODES: usize = 5;

/// An API group (API分组).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupRec {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub remark: String,
    pub domain_id: String,
    pub project_id: String,
    pub instance_id: String,
    pub sl_domain: String,
    #[serde(default)]
    pub url_domain: Option<String>,
    pub market_state: MarketState,
    pub register_time: String,
    pub update_time: String,
}

/// The backend of an API definition (HTTP or MOCK; others are refused at validation).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiDef {
    pub name: String,
    #[serde(rename = "type")]
    pub api_type: u8,
    pub req_protocol: String,
    pub req_method: String,
    pub req_uri: String,
    pub match_mode: String,
    pub auth_type: String,
    pub app_code_auth_type: String,
    pub backend_type: String,
    pub remark: String,
    /// HTTP backend: `{req_protocol, req_method, req_uri, url_domain, timeout}`.
    pub backend_api: Option<BackendApiDef>,
    /// MOCK backend body.
    pub mock_result: Option<String>,
    /// The request body as given, echoed back for fields we keep but do not interpret.
    #[serde(default)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendApiDef {
    pub req_protocol: String,
    pub req_method: String,
    pub req_uri: String,
    pub url_domain: String,
    pub timeout: u64,
}

/// A RELEASE publication: the definition frozen at publish time.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Publication {
    pub publish_id: String,
    pub version_id: String,
    pub publish_time: String,
    pub remark: String,
    pub frozen: snapshot::Api,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiRec {
    pub id: String,
    pub group_id: String,
    pub def: ApiDef,
    pub register_time: String,
    pub update_time: String,
    #[serde(default)]
    pub release: Option<Publication>,
}

impl ApiRec {
    /// Public + APP + published to RELEASE (CONTRACT §2).
    pub fn is_sellable(&self) -> bool {
        self.release
            .as_ref()
            .is_some_and(|p| p.frozen.is_sellable())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppCodeRec {
    pub id: String,
    pub app_code: String,
    pub create_time: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppRec {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub remark: String,
    pub app_key: String,
    pub app_secret: String,
    pub domain_id: String,
    pub project_id: String,
    /// `USER` or `MARKET`.
    pub creator: String,
    #[serde(default)]
    pub codes: Vec<AppCodeRec>,
    pub register_time: String,
    pub update_time: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthRec {
    pub id: String,
    pub app_id: String,
    pub api_id: String,
    pub env_id: String,
    pub auth_time: String,
}

/// A buyer's purchase (订购关系) and its quota ledger.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PurchaseRec {
    pub purchase_id: String,
    #[serde(default)]
    pub order_id: Option<String>,
    pub group_id: String,
    pub domain_id: String,
    pub project_id: String,
    pub state: PurchaseState,
    #[serde(default)]
    pub order_type: Option<u8>,
    /// Epoch seconds.
    #[serde(default)]
    pub start_time: i64,
    /// Epoch seconds.
    #[serde(default)]
    pub expire_time: i64,
    /// Calls bought by the order, as the market sent them (echoed on idempotent replays).
    #[serde(default)]
    pub req_quota: Option<u64>,
    /// Calls granted in total (`None` unlimited). Row 6 moves it: limit = used + unused.
    #[serde(default)]
    pub quota_limit: Option<u64>,
    /// Calls served, as reported by the data plane.
    #[serde(default)]
    pub quota_used: u64,
    /// Calls leased to each proxy and not yet reported (docs/quota-leases.md).
    #[serde(default)]
    pub leases: BTreeMap<String, crate::lease::Lease>,
    /// Per proxy, what its usage reports have counted (idempotent reports).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tallies: BTreeMap<String, crate::lease::Tally>,
    #[serde(default)]
    pub app_id: Option<String>,
    pub create_time: String,
    pub update_time: String,
}

impl PurchaseRec {
    /// Calls left: `limit - used`, never negative; `None` when unlimited. The arithmetic is
    /// the quota ledger's ([`crate::lease::Ledger`]).
    pub fn calls_left(&self) -> Option<u64> {
        self.ledger().calls_left()
    }

    /// The purchase's quota ledger: limit, used and leases.
    pub fn ledger(&self) -> crate::lease::Ledger {
        crate::lease::Ledger {
            limit: self.quota_limit,
            used: self.quota_used,
            leases: self.leases.clone(),
            tallies: self.tallies.clone(),
        }
    }

    /// Stores a ledger changed by lease exchanges or the market.
    pub fn set_ledger(&mut self, ledger: crate::lease::Ledger) {
        self.quota_limit = ledger.limit;
        self.quota_used = ledger.used;
        self.leases = ledger.leases;
        self.tallies = ledger.tallies;
    }
}

/// A committed change to one record.
#[derive(Debug, Clone)]
// Changes live for one request; boxing the big variants buys nothing measurable.
#[allow(clippy::large_enum_variant)]
pub enum Change {
    Group(GroupRec),
    DeleteGroup(String),
    Api(ApiRec),
    DeleteApi(String),
    App(AppRec),
    DeleteApp(String),
    Auth(AuthRec),
    DeleteAuth(String),
    Purchase(PurchaseRec),
}

const KIND_GROUP: &str = "group";
const KIND_API: &str = "api";
const KIND_APP: &str = "app";
const KIND_AUTH: &str = "auth";
const KIND_PURCHASE: &str = "purchase";

impl Change {
    /// The store write for this change.
    pub fn to_write(&self) -> Write {
        fn put<T: Serialize>(kind: &'static str, id: &str, rec: &T) -> Write {
            Write {
                kind,
                id: id.to_owned(),
                doc: Some(serde_json::to_string(rec).expect("records always serialize")),
            }
        }
        fn delete(kind: &'static str, id: &str) -> Write {
            Write {
                kind,
                id: id.to_owned(),
                doc: None,
            }
        }
        match self {
            Change::Group(g) => put(KIND_GROUP, &g.id, g),
            Change::DeleteGroup(id) => delete(KIND_GROUP, id),
            Change::Api(a) => put(KIND_API, &a.id, a),
            Change::DeleteApi(id) => delete(KIND_API, id),
            Change::App(a) => put(KIND_APP, &a.id, a),
            Change::DeleteApp(id) => delete(KIND_APP, id),
            Change::Auth(a) => put(KIND_AUTH, &a.id, a),
            Change::DeleteAuth(id) => delete(KIND_AUTH, id),
            Change::Purchase(p) => put(KIND_PURCHASE, &p.purchase_id, p),
        }
    }
}

/// Everything the control plane knows, keyed by id (BTreeMap: stable listing order).
#[derive(Debug, Default, Clone)]
pub struct State {
    pub version: u64,
    pub groups: BTreeMap<String, GroupRec>,
    pub apis: BTreeMap<String, ApiRec>,
    pub apps: BTreeMap<String, AppRec>,
    pub auths: BTreeMap<String, AuthRec>,
    pub purchases: BTreeMap<String, PurchaseRec>,
}

impl State {
    pub fn from_loaded(loaded: Loaded) -> Result<State, ControlError> {
        let mut state = State {
            version: loaded.version,
            ..State::default()
        };
        for (kind, _id, doc) in loaded.records {
            let change = match kind.as_str() {
                KIND_GROUP => {
                    Change::Group(serde_json::from_str(&doc).map_err(ControlError::Corrupt)?)
                }
                KIND_API => Change::Api(serde_json::from_str(&doc).map_err(ControlError::Corrupt)?),
                KIND_APP => Change::App(serde_json::from_str(&doc).map_err(ControlError::Corrupt)?),
                KIND_AUTH => {
                    Change::Auth(serde_json::from_str(&doc).map_err(ControlError::Corrupt)?)
                }
                KIND_PURCHASE => {
                    Change::Purchase(serde_json::from_str(&doc).map_err(ControlError::Corrupt)?)
                }
                other => {
                    tracing::warn!(kind = other, "ignoring a record of an unknown kind");
                    continue;
                }
            };
            state.apply(change);
        }
        Ok(state)
    }

    pub fn apply(&mut self, change: Change) {
        match change {
            Change::Group(g) => {
                self.groups.insert(g.id.clone(), g);
            }
            Change::DeleteGroup(id) => {
                self.groups.remove(&id);
            }
            Change::Api(a) => {
                self.apis.insert(a.id.clone(), a);
            }
            Change::DeleteApi(id) => {
                self.apis.remove(&id);
            }
            Change::App(a) => {
                self.apps.insert(a.id.clone(), a);
            }
            Change::DeleteApp(id) => {
                self.apps.remove(&id);
            }
            Change::Auth(a) => {
                self.auths.insert(a.id.clone(), a);
            }
            Change::DeleteAuth(id) => {
                self.auths.remove(&id);
            }
            Change::Purchase(p) => {
                self.purchases.insert(p.purchase_id.clone(), p);
            }
        }
    }

    pub fn group_apis<'a>(&'a self, group_id: &'a str) -> impl Iterator<Item = &'a ApiRec> + 'a {
        self.apis.values().filter(move |a| a.group_id == group_id)
    }

    pub fn has_sellable_api(&self, group_id: &str) -> bool {
        self.group_apis(group_id).any(ApiRec::is_sellable)
    }
}

/// Now, RFC 3339 UTC with seconds (as in the seed samples).
pub fn now_rfc3339() -> String {
    rfc3339(time::OffsetDateTime::now_utc().unix_timestamp())
}

/// Epoch seconds as RFC 3339 UTC.
pub fn rfc3339(epoch_secs: i64) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp(epoch_secs)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    )
}

/// A fresh id: 32 lower-case hex digits, like Huawei's.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_left_is_limit_minus_used_never_negative() {
        let mut p = PurchaseRec {
            purchase_id: "p".into(),
            order_id: None,
            group_id: "g".into(),
            domain_id: "d".into(),
            project_id: "p".into(),
            state: PurchaseState::Active,
            order_type: Some(1),
            start_time: 0,
            expire_time: 0,
            req_quota: Some(10),
            quota_limit: Some(10),
            quota_used: 3,
            leases: BTreeMap::new(),
            tallies: BTreeMap::new(),
            app_id: None,
            create_time: String::new(),
            update_time: String::new(),
        };
        assert_eq!(p.calls_left(), Some(7));
        p.quota_used = 12;
        assert_eq!(p.calls_left(), Some(0));
        p.quota_limit = None;
        assert_eq!(p.calls_left(), None);
    }

    #[test]
    fn rfc3339_is_utc_seconds() {
        assert_eq!(rfc3339(1_514_462_247), "2017-12-28T11:57:27Z");
    }
}
