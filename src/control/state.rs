//! The market state held in memory: entities, their invariants, and how committed changes
//! apply. Each replica's `State` is a follower cache of the store, never the arbiter: it is
//! caught up from the store's change sequence ([`State::apply_stored`]) before every answer
//! and every write, handlers validate against it (for precise errors), and the store's own
//! checks decide conflicts: each record's revision (`revs`, compare-and-swap) and the
//! uniqueness [`Claim`]s that [`Change::claims`] derives from the record.
//!
//! A `State` is a value, not a place: its maps are persistent (`imbl`), so a clone costs a
//! few pointer copies whatever the market's size, and each request works on its own clone
//! (a view) while the replica's cache moves on. Nothing here is ever locked across I/O.
//!
//! Must not do I/O or HTTP: handlers validate against a `&State`, produce `Change`s, the
//! control plane commits them and then calls [`State::apply_at`].

use std::collections::BTreeMap;

use imbl::{HashMap as PHashMap, OrdMap};

use serde::{Deserialize, Serialize};

use crate::snapshot::{self, MarketState, PurchaseState};

use super::error::ControlError;
use super::store::{Claim, Stored, Write};

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

/// A request throttling policy (流控策略), as Huawei's v2 API has it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ThrottleRec {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub remark: String,
    pub domain_id: String,
    pub project_id: String,
    pub api_call_limits: u64,
    #[serde(default)]
    pub user_call_limits: Option<u64>,
    #[serde(default)]
    pub app_call_limits: Option<u64>,
    #[serde(default)]
    pub ip_call_limits: Option<u64>,
    pub time_interval: u64,
    pub time_unit: snapshot::TimeUnit,
    /// 1 exclusive (each bound API counted apart), 2 shared (all bound APIs together).
    #[serde(rename = "type")]
    pub throttle_type: u8,
    /// Echoed (`TRUE`/`FALSE`); the data plane does not adapt.
    #[serde(default)]
    pub enable_adaptive_control: String,
    pub create_time: String,
}

/// A policy bound to an API's RELEASE publication.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ThrottleBindingRec {
    pub id: String,
    pub throttle_id: String,
    pub api_id: String,
    pub publish_id: String,
    pub env_id: String,
    pub apply_time: String,
}

/// An exception to a policy: an APP's or a tenant's (USER) own limit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ThrottleSpecialRec {
    pub id: String,
    pub throttle_id: String,
    pub object_type: snapshot::SpecialKind,
    pub object_id: String,
    pub call_limits: u64,
    pub apply_time: String,
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
    /// Calls granted in total (`None` unlimited), as of the purchase's last market write: the
    /// copy that snapshots carry (so that version N is the same content everywhere). The
    /// live figure is the ledger's (`ledgers` table, [`LedgerDoc`]). Row 6 moves it.
    #[serde(default)]
    pub quota_limit: Option<u64>,
    /// Calls served as of the purchase's last market write (the snapshot's copy, as above).
    #[serde(default)]
    pub quota_used: u64,
    #[serde(default)]
    pub app_id: Option<String>,
    pub create_time: String,
    pub update_time: String,
}

impl PurchaseRec {
    /// Calls left as of the last market write (the snapshot's view); the live figure is the
    /// ledger's [`crate::lease::Ledger::calls_left`].
    pub fn calls_left(&self) -> Option<u64> {
        self.quota_limit
            .map(|limit| limit.saturating_sub(self.quota_used))
    }
}

/// A purchase's quota ledger as stored in its `ledgers` row. Reads the ledger fields of a
/// purchase document too (`quota_limit`, `quota_used`, `leases`, `tallies`): migration 2
/// seeded each ledger row with its purchase's document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LedgerDoc {
    #[serde(default, alias = "quota_limit")]
    pub limit: Option<u64>,
    #[serde(default, alias = "quota_used")]
    pub used: u64,
    #[serde(default)]
    pub leases: BTreeMap<String, crate::lease::Lease>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tallies: BTreeMap<String, crate::lease::Tally>,
}

impl LedgerDoc {
    /// The ledger a stored document holds.
    pub fn parse(doc: &str) -> Result<crate::lease::Ledger, ControlError> {
        let d: LedgerDoc = serde_json::from_str(doc).map_err(ControlError::Corrupt)?;
        Ok(crate::lease::Ledger {
            limit: d.limit,
            used: d.used,
            leases: d.leases,
            tallies: d.tallies,
        })
    }

    /// The document that stores `ledger`.
    pub fn render(ledger: &crate::lease::Ledger) -> String {
        let d = LedgerDoc {
            limit: ledger.limit,
            used: ledger.used,
            leases: ledger.leases.clone(),
            tallies: ledger.tallies.clone(),
        };
        serde_json::to_string(&d).expect("a ledger serializes")
    }
}

/// An independent domain bound to a group (Huawei's `url_domains` of a group): buyers reach
/// the group by it as by its market `url_domain`. A domain belongs to one group (the
/// `domain` claim it shares with `sl_domain` and `url_domain`), a group holds at most
/// [`MAX_GROUP_DOMAINS`] (one `domain_slot` claim each).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DomainRec {
    pub id: String,
    pub group_id: String,
    /// Lower-case host name.
    pub url_domain: String,
    /// Which of the group's [`MAX_GROUP_DOMAINS`] slots it holds (`0..MAX_GROUP_DOMAINS`).
    pub slot: u8,
    /// `TLSv1.1`, `TLSv1.2` or `TLSv1.3`.
    pub min_ssl_version: String,
    #[serde(default)]
    pub is_http_redirect_to_https: bool,
    /// The certificate served for it, by SNI.
    #[serde(default)]
    pub certificate_id: Option<String>,
    pub create_time: String,
}

/// A seller's TLS certificate (`/v2/{project_id}/apigw/certificates`). `private_key` is a
/// secret: no answer, log line or error carries it (`Debug` leaves it out).
#[derive(Clone, Serialize, Deserialize)]
pub struct CertRec {
    pub id: String,
    pub name: String,
    pub domain_id: String,
    pub project_id: String,
    pub instance_id: String,
    /// PEM chain, leaf first.
    pub cert_content: String,
    /// PEM private key.
    pub private_key: String,
    pub common_name: String,
    #[serde(default)]
    pub san: Vec<String>,
    #[serde(default)]
    pub issuer: Vec<String>,
    #[serde(default)]
    pub organization: Vec<String>,
    #[serde(default)]
    pub organizational_unit: Vec<String>,
    #[serde(default)]
    pub locality: Vec<String>,
    #[serde(default)]
    pub state: Vec<String>,
    #[serde(default)]
    pub country: Vec<String>,
    pub serial_number: String,
    pub signature_algorithm: String,
    pub algorithm_type: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    pub create_time: String,
    pub update_time: String,
}

impl std::fmt::Debug for CertRec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertRec")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("project_id", &self.project_id)
            .field("common_name", &self.common_name)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Huawei's limit of independent domains per group.
pub const MAX_GROUP_DOMAINS: u8 = 5;

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
    Domain(DomainRec),
    DeleteDomain(String),
    Certificate(CertRec),
    DeleteCertificate(String),
    /// Only ever read from the store (a purchase tombstone); no request deletes a purchase.
    DeletePurchase(String),
    Throttle(ThrottleRec),
    DeleteThrottle(String),
    ThrottleBinding(ThrottleBindingRec),
    DeleteThrottleBinding(String),
    ThrottleSpecial(ThrottleSpecialRec),
    DeleteThrottleSpecial(String),
}

pub const KIND_GROUP: &str = "group";
pub const KIND_API: &str = "api";
pub const KIND_APP: &str = "app";
pub const KIND_AUTH: &str = "auth";
pub const KIND_PURCHASE: &str = "purchase";
pub const KIND_DOMAIN: &str = "domain";
pub const KIND_CERTIFICATE: &str = "certificate";
pub const KIND_THROTTLE: &str = "throttle";
pub const KIND_THROTTLE_BINDING: &str = "throttle_binding";
pub const KIND_THROTTLE_SPECIAL: &str = "throttle_special";

/// Claim scopes (the `claims` table): what must be unique, and within what.
pub const CLAIM_DOMAIN: &str = "domain";
pub const CLAIM_GROUP_NAME: &str = "group_name";
pub const CLAIM_API_NAME: &str = "api_name";
pub const CLAIM_API_ROUTE: &str = "api_route";
pub const CLAIM_APP_NAME: &str = "app_name";
pub const CLAIM_APP_KEY: &str = "app_key";
pub const CLAIM_APP_CODE: &str = "app_code";
pub const CLAIM_AUTH: &str = "auth";
pub const CLAIM_ORDER_ID: &str = "order_id";
/// `{group_id}/{slot}`: a group's domains hold distinct slots, so the store itself refuses a
/// sixth.
pub const CLAIM_DOMAIN_SLOT: &str = "domain_slot";
pub const CLAIM_CERTIFICATE_NAME: &str = "certificate_name";
pub const CLAIM_THROTTLE_NAME: &str = "throttle_name";
/// One policy per API per environment (Huawei's rule).
pub const CLAIM_THROTTLE_BINDING: &str = "throttle_binding";
/// One exception per object per policy.
pub const CLAIM_THROTTLE_SPECIAL: &str = "throttle_special";

impl Change {
    /// The record this change writes: `(kind, id)`.
    pub fn key(&self) -> (&'static str, &str) {
        match self {
            Change::Group(g) => (KIND_GROUP, &g.id),
            Change::DeleteGroup(id) => (KIND_GROUP, id),
            Change::Api(a) => (KIND_API, &a.id),
            Change::DeleteApi(id) => (KIND_API, id),
            Change::App(a) => (KIND_APP, &a.id),
            Change::DeleteApp(id) => (KIND_APP, id),
            Change::Auth(a) => (KIND_AUTH, &a.id),
            Change::DeleteAuth(id) => (KIND_AUTH, id),
            Change::Purchase(p) => (KIND_PURCHASE, &p.purchase_id),
            Change::Domain(d) => (KIND_DOMAIN, &d.id),
            Change::DeleteDomain(id) => (KIND_DOMAIN, id),
            Change::Certificate(c) => (KIND_CERTIFICATE, &c.id),
            Change::DeleteCertificate(id) => (KIND_CERTIFICATE, id),
            Change::DeletePurchase(id) => (KIND_PURCHASE, id),
            Change::Throttle(t) => (KIND_THROTTLE, &t.id),
            Change::DeleteThrottle(id) => (KIND_THROTTLE, id),
            Change::ThrottleBinding(b) => (KIND_THROTTLE_BINDING, &b.id),
            Change::DeleteThrottleBinding(id) => (KIND_THROTTLE_BINDING, id),
            Change::ThrottleSpecial(s) => (KIND_THROTTLE_SPECIAL, &s.id),
            Change::DeleteThrottleSpecial(id) => (KIND_THROTTLE_SPECIAL, id),
        }
    }

    /// What the record holds unique once written: the store refuses a commit whose claim
    /// another record holds, whatever any replica's cache said. A delete holds nothing.
    pub fn claims(&self) -> Vec<Claim> {
        let claim = |scope: &'static str, key: String| Claim { scope, key };
        let mut claims = match self {
            Change::Group(g) => {
                let mut c = vec![
                    claim(CLAIM_GROUP_NAME, format!("{}/{}", g.project_id, g.name)),
                    claim(CLAIM_DOMAIN, g.sl_domain.clone()),
                ];
                c.extend(g.url_domain.clone().map(|d| claim(CLAIM_DOMAIN, d)));
                c
            }
            Change::Api(a) => {
                let route = |method: &str, uri: &str| {
                    claim(CLAIM_API_ROUTE, format!("{}/{method} {uri}", a.group_id))
                };
                let mut c = vec![
                    claim(CLAIM_API_NAME, format!("{}/{}", a.group_id, a.def.name)),
                    route(&a.def.req_method, &a.def.req_uri),
                ];
                c.extend(
                    a.release
                        .as_ref()
                        .map(|p| route(&p.frozen.req_method, &p.frozen.req_uri)),
                );
                c
            }
            Change::App(a) => {
                let mut c = vec![
                    claim(CLAIM_APP_NAME, format!("{}/{}", a.project_id, a.name)),
                    claim(CLAIM_APP_KEY, a.app_key.clone()),
                ];
                c.extend(
                    a.codes
                        .iter()
                        .map(|code| claim(CLAIM_APP_CODE, code.app_code.clone())),
                );
                c
            }
            Change::Auth(a) => vec![claim(CLAIM_AUTH, format!("{}/{}", a.app_id, a.api_id))],
            Change::Purchase(p) => p
                .order_id
                .clone()
                .map(|o| claim(CLAIM_ORDER_ID, o))
                .into_iter()
                .collect(),
            Change::Domain(d) => vec![
                claim(CLAIM_DOMAIN, d.url_domain.clone()),
                claim(CLAIM_DOMAIN_SLOT, format!("{}/{}", d.group_id, d.slot)),
            ],
            Change::Certificate(c) => vec![claim(
                CLAIM_CERTIFICATE_NAME,
                format!("{}/{}", c.project_id, c.name),
            )],
            Change::Throttle(t) => vec![claim(
                CLAIM_THROTTLE_NAME,
                format!("{}/{}", t.project_id, t.name),
            )],
            Change::ThrottleBinding(b) => vec![claim(
                CLAIM_THROTTLE_BINDING,
                format!("{}/{}", b.api_id, b.env_id),
            )],
            Change::ThrottleSpecial(s) => vec![claim(
                CLAIM_THROTTLE_SPECIAL,
                format!("{}/{}", s.throttle_id, s.object_id),
            )],
            Change::DeleteGroup(_)
            | Change::DeleteApi(_)
            | Change::DeleteApp(_)
            | Change::DeleteAuth(_)
            | Change::DeleteDomain(_)
            | Change::DeleteCertificate(_)
            | Change::DeletePurchase(_)
            | Change::DeleteThrottle(_)
            | Change::DeleteThrottleBinding(_)
            | Change::DeleteThrottleSpecial(_) => Vec::new(),
        };
        claims.sort();
        claims.dedup();
        claims
    }

    /// The change a stored record makes to a state, with the record's revision (`None`: a
    /// record of a kind this version does not know, ignored). Parsing is apart from applying
    /// so that a replica parses what it caught up before it takes its cache's lock.
    pub fn from_stored(stored: Stored) -> Result<Option<(Change, u64)>, ControlError> {
        let Some(kind) = [
            KIND_GROUP,
            KIND_API,
            KIND_APP,
            KIND_AUTH,
            KIND_PURCHASE,
            KIND_DOMAIN,
            KIND_CERTIFICATE,
            KIND_THROTTLE,
            KIND_THROTTLE_BINDING,
            KIND_THROTTLE_SPECIAL,
        ]
        .into_iter()
        .find(|k| *k == stored.kind) else {
            tracing::warn!(kind = stored.kind, "ignoring a record of an unknown kind");
            return Ok(None);
        };
        let id = stored.id;
        let change = match stored.doc {
            None => match kind {
                KIND_GROUP => Change::DeleteGroup(id),
                KIND_API => Change::DeleteApi(id),
                KIND_APP => Change::DeleteApp(id),
                KIND_AUTH => Change::DeleteAuth(id),
                KIND_DOMAIN => Change::DeleteDomain(id),
                KIND_CERTIFICATE => Change::DeleteCertificate(id),
                KIND_THROTTLE => Change::DeleteThrottle(id),
                KIND_THROTTLE_BINDING => Change::DeleteThrottleBinding(id),
                KIND_THROTTLE_SPECIAL => Change::DeleteThrottleSpecial(id),
                _ => Change::DeletePurchase(id),
            },
            Some(doc) => {
                let corrupt = ControlError::Corrupt;
                match kind {
                    KIND_GROUP => Change::Group(serde_json::from_str(&doc).map_err(corrupt)?),
                    KIND_API => Change::Api(serde_json::from_str(&doc).map_err(corrupt)?),
                    KIND_APP => Change::App(serde_json::from_str(&doc).map_err(corrupt)?),
                    KIND_AUTH => Change::Auth(serde_json::from_str(&doc).map_err(corrupt)?),
                    KIND_DOMAIN => Change::Domain(serde_json::from_str(&doc).map_err(corrupt)?),
                    KIND_CERTIFICATE => {
                        Change::Certificate(serde_json::from_str(&doc).map_err(corrupt)?)
                    }
                    KIND_THROTTLE => Change::Throttle(serde_json::from_str(&doc).map_err(corrupt)?),
                    KIND_THROTTLE_BINDING => {
                        Change::ThrottleBinding(serde_json::from_str(&doc).map_err(corrupt)?)
                    }
                    KIND_THROTTLE_SPECIAL => {
                        Change::ThrottleSpecial(serde_json::from_str(&doc).map_err(corrupt)?)
                    }
                    _ => Change::Purchase(serde_json::from_str(&doc).map_err(corrupt)?),
                }
            }
        };
        Ok(Some((change, stored.rev)))
    }

    /// The store write for this change, validated against `state` (its revision of the
    /// record: the compare-and-swap).
    pub fn to_write(&self, state: &State) -> Write {
        fn doc<T: Serialize>(rec: &T) -> Option<String> {
            Some(serde_json::to_string(rec).expect("records always serialize"))
        }
        let (kind, id) = self.key();
        let doc = match self {
            Change::Group(g) => doc(g),
            Change::Api(a) => doc(a),
            Change::App(a) => doc(a),
            Change::Auth(a) => doc(a),
            Change::Purchase(p) => doc(p),
            Change::Domain(d) => doc(d),
            Change::Certificate(c) => doc(c),
            Change::Throttle(t) => doc(t),
            Change::ThrottleBinding(b) => doc(b),
            Change::ThrottleSpecial(s) => doc(s),
            Change::DeleteGroup(_)
            | Change::DeleteApi(_)
            | Change::DeleteApp(_)
            | Change::DeleteAuth(_)
            | Change::DeleteDomain(_)
            | Change::DeleteCertificate(_)
            | Change::DeletePurchase(_)
            | Change::DeleteThrottle(_)
            | Change::DeleteThrottleBinding(_)
            | Change::DeleteThrottleSpecial(_) => None,
        };
        Write {
            kind,
            id: id.to_owned(),
            doc,
            rev: state.rev(kind, id),
            claims: self.claims(),
        }
    }
}

/// Everything the control plane knows, keyed by id (ordered maps: stable listing order), at
/// `version` of the store, with each live record's revision. Persistent maps: `clone` shares
/// every node, a change copies only the path to what it changes.
#[derive(Debug, Default, Clone)]
pub struct State {
    pub version: u64,
    pub groups: OrdMap<String, GroupRec>,
    pub apis: OrdMap<String, ApiRec>,
    pub apps: OrdMap<String, AppRec>,
    pub auths: OrdMap<String, AuthRec>,
    pub purchases: OrdMap<String, PurchaseRec>,
    pub domains: OrdMap<String, DomainRec>,
    pub certificates: OrdMap<String, CertRec>,
    pub throttles: OrdMap<String, ThrottleRec>,
    pub throttle_bindings: OrdMap<String, ThrottleBindingRec>,
    pub throttle_specials: OrdMap<String, ThrottleSpecialRec>,
    /// `order_id` → purchase id: row 5's idempotency lookup without a scan of the purchases.
    orders: OrdMap<String, String>,
    revs: PHashMap<(&'static str, String), u64>,
}

impl State {
    /// The revision of a live record this state holds (`None`: no such record).
    pub fn rev(&self, kind: &'static str, id: &str) -> Option<u64> {
        self.revs.get(&(kind, id.to_owned())).copied()
    }

    /// Applies one record as the store holds it (a tombstone removes it).
    pub fn apply_stored(&mut self, stored: Stored) -> Result<(), ControlError> {
        if let Some((change, rev)) = Change::from_stored(stored)? {
            self.apply_at(change, rev);
        }
        Ok(())
    }

    /// The purchase bought with `order_id`, if any.
    pub fn purchase_of_order(&self, order_id: &str) -> Option<&PurchaseRec> {
        self.orders
            .get(order_id)
            .and_then(|id| self.purchases.get(id))
    }

    /// Applies a committed change whose record is now at revision `rev`.
    pub fn apply_at(&mut self, change: Change, rev: u64) {
        let (kind, id) = change.key();
        let key = (kind, id.to_owned());
        match &change {
            Change::DeleteGroup(_)
            | Change::DeleteApi(_)
            | Change::DeleteApp(_)
            | Change::DeleteAuth(_)
            | Change::DeleteDomain(_)
            | Change::DeleteCertificate(_)
            | Change::DeletePurchase(_)
            | Change::DeleteThrottle(_)
            | Change::DeleteThrottleBinding(_)
            | Change::DeleteThrottleSpecial(_) => {
                self.revs.remove(&key);
            }
            Change::Group(_)
            | Change::Api(_)
            | Change::App(_)
            | Change::Auth(_)
            | Change::Purchase(_)
            | Change::Domain(_)
            | Change::Certificate(_)
            | Change::Throttle(_)
            | Change::ThrottleBinding(_)
            | Change::ThrottleSpecial(_) => {
                self.revs.insert(key, rev);
            }
        }
        self.apply(change);
    }

    /// Every claim the records of this state hold, with its owner (to build the claims of
    /// a store written before claims existed).
    pub fn all_claims(&self) -> Vec<(Claim, String)> {
        let changes = self
            .groups
            .values()
            .cloned()
            .map(Change::Group)
            .chain(self.apis.values().cloned().map(Change::Api))
            .chain(self.apps.values().cloned().map(Change::App))
            .chain(self.auths.values().cloned().map(Change::Auth))
            .chain(self.purchases.values().cloned().map(Change::Purchase))
            .chain(self.domains.values().cloned().map(Change::Domain))
            .chain(self.certificates.values().cloned().map(Change::Certificate))
            .chain(self.throttles.values().cloned().map(Change::Throttle))
            .chain(
                self.throttle_bindings
                    .values()
                    .cloned()
                    .map(Change::ThrottleBinding),
            )
            .chain(
                self.throttle_specials
                    .values()
                    .cloned()
                    .map(Change::ThrottleSpecial),
            );
        changes
            .flat_map(|change| {
                let owner = change.key().1.to_owned();
                change
                    .claims()
                    .into_iter()
                    .map(move |claim| (claim, owner.clone()))
            })
            .collect()
    }

    fn apply(&mut self, change: Change) {
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
                if let Some(order_id) = &p.order_id {
                    self.orders.insert(order_id.clone(), p.purchase_id.clone());
                }
                self.purchases.insert(p.purchase_id.clone(), p);
            }
            Change::DeletePurchase(id) => {
                let gone = self.purchases.remove(&id);
                if let Some(order_id) = gone.and_then(|p| p.order_id) {
                    self.orders.remove(&order_id);
                }
            }
            Change::Domain(d) => {
                self.domains.insert(d.id.clone(), d);
            }
            Change::DeleteDomain(id) => {
                self.domains.remove(&id);
            }
            Change::Certificate(c) => {
                self.certificates.insert(c.id.clone(), c);
            }
            Change::DeleteCertificate(id) => {
                self.certificates.remove(&id);
            }
            Change::Throttle(t) => {
                self.throttles.insert(t.id.clone(), t);
            }
            Change::DeleteThrottle(id) => {
                self.throttles.remove(&id);
            }
            Change::ThrottleBinding(b) => {
                self.throttle_bindings.insert(b.id.clone(), b);
            }
            Change::DeleteThrottleBinding(id) => {
                self.throttle_bindings.remove(&id);
            }
            Change::ThrottleSpecial(s) => {
                self.throttle_specials.insert(s.id.clone(), s);
            }
            Change::DeleteThrottleSpecial(id) => {
                self.throttle_specials.remove(&id);
            }
        }
    }

    pub fn group_apis<'a>(&'a self, group_id: &'a str) -> impl Iterator<Item = &'a ApiRec> + 'a {
        self.apis.values().filter(move |a| a.group_id == group_id)
    }

    /// The group that answers on host name `domain` (as its `sl_domain`, market
    /// `url_domain` or a bound domain), if any: a host name belongs to one group.
    pub fn domain_owner(&self, domain: &str) -> Option<&str> {
        self.groups
            .values()
            .find(|g| g.sl_domain == domain || g.url_domain.as_deref() == Some(domain))
            .map(|g| g.id.as_str())
            .or_else(|| {
                self.domains
                    .values()
                    .find(|d| d.url_domain == domain)
                    .map(|d| d.group_id.as_str())
            })
    }

    /// The independent domains bound to a group.
    pub fn group_domains<'a>(
        &'a self,
        group_id: &'a str,
    ) -> impl Iterator<Item = &'a DomainRec> + 'a {
        self.domains
            .values()
            .filter(move |d| d.group_id == group_id)
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
