//! The compiled snapshot: everything the hot path needs, indexed, built once per push.
//!
//! Owns the translation of a [`Validated`] snapshot into lookup tables: host → group (a
//! seller's bound domain as one more name of its group's market domain), one
//! [`Router`] per group, app key → app, app code → app, app → purchase, each purchase's quota
//! cell (an `Arc` into the registry, so counters survive swaps), each group's metric handles
//! and the TLS certificates and bound domains' TLS rules by server name. It parses nothing (validation did, once) and has
//! nothing left to fail on. It is done in two steps so that shared state changes only once
//! the snapshot is persisted: [`prepare`] builds everything that belongs to the new snapshot
//! alone; [`Prepared::bind`] then takes the purchases' cells from the quota registry (setting
//! their limits) and publishes the certificates' expiries. It does not swap or persist.

use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::{DefaultHashBuilder, HashMap, HashSet, HashTable};

use rustls::sign::CertifiedKey;

use super::validate::{
    validate, SpecialRef, ThrottleRefs, Validated, ValidationError, MAX_APP_CODES,
};
pub use super::validate::{AuthKind, CompiledBackend, PathPiece};
use super::wire::{App, MarketState, MinTlsVersion, Purchase, PurchaseState, Snapshot};
pub use crate::certificate::{certified_key_pem, CertificateError};
use crate::gateway::metrics::{GatewayMetrics, GroupCounters};
use crate::gateway::quota::{QuotaCell, QuotaRegistry, UNLIMITED};
use crate::gateway::route::Router;
use crate::gateway::throttle::{ApiThrottle, PolicyRule, ThrottleRegistry};

/// Which of a group's domains a host named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainKind {
    /// The market `url_domain`: sellable APIs, purchases and quota.
    Market,
    /// The seller's `sl_domain`: every published API, app authorizations, no quota.
    Seller,
}

/// A seller's bound domain's TLS rules (the wire's `domains`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainRules {
    pub min_tls_version: MinTlsVersion,
    pub https_redirect: bool,
}

#[derive(Debug)]
pub struct CompiledGroup {
    /// Position in [`CompiledSnapshot::groups`].
    pub index: usize,
    pub id: Box<str>,
    /// The seller's name for it, for logs and `marketgate_group_info` (labels carry the id).
    pub name: Box<str>,
    pub state: MarketState,
    pub router: Router,
    pub apis: Vec<CompiledApi>,
    pub counters: GroupCounters,
}

#[derive(Debug)]
pub struct CompiledApi {
    pub id: Box<str>,
    pub name: Box<str>,
    pub sellable: bool,
    pub auth: AuthKind,
    pub app_code_auth: bool,
    pub https_only: bool,
    pub http_only: bool,
    pub backend: CompiledBackend,
    /// Apps authorized on the seller domain (app_auths).
    pub authorized_apps: HashSet<usize>,
    /// The request throttling policy bound to this API, its counters resolved (set by
    /// [`Prepared::bind`]).
    pub throttle: Option<ApiThrottle>,
}

/// An app: its credentials and, for a buyer's MARKET app, its purchase.
///
/// Kept small because a market has one per buyer (BENCHMARKS.md, "Snapshot compile"): the
/// key, the secret and the app codes share one allocation, and the snapshot's lookup tables
/// hold only this app's index, not copies of its strings.
#[derive(Debug)]
pub struct CompiledApp {
    /// Position in [`CompiledSnapshot::apps`].
    pub index: usize,
    pub purchase: Option<CompiledPurchase>,
    /// The key, the secret, then each app code, back to back.
    credentials: Box<str>,
    /// Where each part of `credentials` ends: the key, the secret, then the codes.
    ends: [u16; 2 + MAX_APP_CODES],
    codes: u8,
}

impl CompiledApp {
    /// The app of a validated wire app (its credentials fit `u16` offsets: validate checks
    /// them against [`MAX_CREDENTIAL_BYTES`](super::validate::MAX_CREDENTIAL_BYTES); were
    /// they longer, the offsets would saturate and a part read empty, never panic).
    fn new(index: usize, app: &App, purchase: Option<CompiledPurchase>) -> CompiledApp {
        let parts = [&app.app_key, &app.app_secret]
            .into_iter()
            .chain(&app.app_codes);
        let mut credentials = String::with_capacity(parts.clone().map(|part| part.len()).sum());
        let mut ends = [0; 2 + MAX_APP_CODES];
        for (end, part) in ends.iter_mut().zip(parts) {
            credentials.push_str(part);
            *end = u16::try_from(credentials.len()).unwrap_or(u16::MAX);
        }
        CompiledApp {
            index,
            purchase,
            credentials: credentials.into_boxed_str(),
            ends,
            codes: app.app_codes.len().min(MAX_APP_CODES) as u8,
        }
    }

    fn part(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        self.credentials
            .get(usize::from(start)..usize::from(self.ends[i]))
            .unwrap_or_default()
    }

    /// The AppKey a signature names.
    pub fn key(&self) -> &str {
        self.part(0)
    }

    /// The AppSecret signatures are made with.
    pub fn secret(&self) -> &[u8] {
        self.part(1).as_bytes()
    }

    /// The app codes (`X-Apig-AppCode`).
    pub fn codes(&self) -> impl Iterator<Item = &str> {
        (0..usize::from(self.codes)).map(|nth| self.code(nth))
    }

    /// The `nth` app code (below `codes().count()`).
    fn code(&self, nth: usize) -> &str {
        self.part(2 + nth)
    }
}

#[derive(Debug)]
pub struct CompiledPurchase {
    pub group: usize,
    pub state: PurchaseState,
    pub start_time: i64,
    pub expire_time: i64,
    pub cell: Arc<QuotaCell>,
}

impl CompiledPurchase {
    pub fn id(&self) -> &str {
        self.cell.purchase_id()
    }
}

/// What a request is decided against; swapped whole.
#[derive(Debug)]
pub struct CompiledSnapshot {
    pub version: u64,
    pub hosts: HashMap<Box<str>, (usize, DomainKind)>,
    pub groups: Vec<CompiledGroup>,
    pub apps: Vec<CompiledApp>,
    /// Indices into `apps` by app key and by app code, hashed with `hasher`; the strings
    /// themselves are the apps' own.
    apps_by_key: HashTable<u32>,
    /// (app, which of its codes).
    apps_by_code: HashTable<(u32, u8)>,
    hasher: DefaultHashBuilder,
    pub certificates: HashMap<Box<str>, Arc<CertifiedKey>>,
    /// The TLS rules of sellers' bound domains, by host name (empty: none bound).
    pub domain_rules: HashMap<Box<str>, DomainRules>,
    /// The registry the throttling counters came from (its clock and mode).
    pub throttle: Arc<ThrottleRegistry>,
}

impl CompiledSnapshot {
    /// The app whose AppKey is `key`.
    pub fn app_by_key(&self, key: &str) -> Option<&CompiledApp> {
        let app = |&i: &u32| &self.apps[i as usize];
        self.apps_by_key
            .find(self.hasher.hash_one(key), |i| app(i).key() == key)
            .map(app)
    }

    /// The app one of whose app codes is `code`.
    pub fn app_by_code(&self, code: &str) -> Option<&CompiledApp> {
        let app = |&(i, _): &(u32, u8)| &self.apps[i as usize];
        self.apps_by_code
            .find(self.hasher.hash_one(code), |&(i, nth)| {
                self.apps[i as usize].code(usize::from(nth)) == code
            })
            .map(app)
    }
}

/// Validates and compiles `snapshot` at once, taking cells from (or creating them in)
/// `quota`: for what has no persist step between (benches, tests, a snapshot read back from
/// disk).
pub fn compile(
    snapshot: &Snapshot,
    quota: &QuotaRegistry,
    metrics: &GatewayMetrics,
) -> Result<CompiledSnapshot, ValidationError> {
    Ok(prepare(validate(snapshot)?, metrics).bind(quota, metrics))
}

/// A compiled snapshot that does not yet hold its purchases' quota cells nor has published
/// its certificates' expiries: made by [`prepare`], finished by [`Prepared::bind`].
#[derive(Debug)]
pub struct Prepared<'a> {
    compiled: CompiledSnapshot,
    /// (app index, group index, the purchase) of every purchase.
    purchases: Vec<(u32, u32, &'a Purchase)>,
    expiries: Vec<(&'a str, i64)>,
    snapshot: &'a Snapshot,
    throttling: ThrottleRefs<'a>,
}

impl Prepared<'_> {
    /// The version it was compiled from.
    pub fn version(&self) -> u64 {
        self.compiled.version
    }

    /// Takes each purchase's cell from `quota` (created on first sight, its limit and used
    /// set from the snapshot) and publishes the certificates' expiries: the step that changes
    /// what the snapshot being served sees, so call it only once the new one is persisted.
    pub fn bind(self, quota: &QuotaRegistry, metrics: &GatewayMetrics) -> CompiledSnapshot {
        let Prepared {
            mut compiled,
            purchases,
            expiries,
            snapshot,
            throttling,
        } = self;
        bind_throttles(
            &mut compiled,
            snapshot,
            &throttling,
            &purchases,
            quota,
            metrics,
        );
        for (app, group, purchase) in purchases {
            let cell = quota.cell(
                &purchase.id,
                purchase.quota_limit.unwrap_or(UNLIMITED),
                purchase.quota_used,
            );
            if let Some(app) = compiled.apps.get_mut(app as usize) {
                app.purchase = Some(CompiledPurchase {
                    group: group as usize,
                    state: purchase.state,
                    start_time: purchase.start_time,
                    expire_time: purchase.expire_time,
                    cell,
                });
            }
        }
        metrics.set_certificate_expiries(expiries);
        metrics.set_group_names(compiled.groups.iter().map(|g| (&*g.id, &*g.name)));
        compiled
    }
}

/// Compiles a validated snapshot, touching no shared state but the groups' metric series
/// (created at zero if new): the quota cells and certificate expiries wait for
/// [`Prepared::bind`].
pub fn prepare<'a>(valid: Validated<'a>, metrics: &GatewayMetrics) -> Prepared<'a> {
    let Validated {
        snapshot,
        apis: parsed,
        certificates: parsed_certificates,
        purchase_refs,
        auth_refs,
        domain_groups,
        throttling,
    } = valid;
    let mut hosts = HashMap::new();
    let mut groups = Vec::with_capacity(snapshot.groups.len());
    for ((gi, group), parsed) in snapshot.groups.iter().enumerate().zip(parsed) {
        hosts.insert(group.sl_domain.as_str().into(), (gi, DomainKind::Seller));
        if let Some(url_domain) = &group.url_domain {
            hosts.insert(url_domain.as_str().into(), (gi, DomainKind::Market));
        }
        let mut router = Router::default();
        let mut apis = Vec::with_capacity(group.apis.len());
        for ((ai, api), parsed) in group.apis.iter().enumerate().zip(parsed) {
            router.insert(parsed.method, &parsed.route, parsed.prefix_match, ai);
            apis.push(CompiledApi {
                id: api.id.as_str().into(),
                name: api.name.as_str().into(),
                sellable: api.is_sellable(),
                auth: parsed.auth,
                app_code_auth: api.app_code_auth,
                https_only: parsed.https_only,
                http_only: parsed.http_only,
                backend: parsed.backend,
                authorized_apps: HashSet::new(),
                throttle: None,
            });
        }
        groups.push(CompiledGroup {
            index: gi,
            id: group.id.as_str().into(),
            name: group.name.as_str().into(),
            state: group.market_state,
            router,
            apis,
            counters: metrics.group(&group.id),
        });
    }
    let mut domain_rules = HashMap::new();
    for (bound, gi) in snapshot.domains.iter().zip(domain_groups) {
        hosts.insert(bound.domain.as_str().into(), (gi, DomainKind::Market));
        domain_rules.insert(
            bound.domain.as_str().into(),
            DomainRules {
                min_tls_version: bound.min_tls_version,
                https_redirect: bound.https_redirect,
            },
        );
    }
    for (gi, ai, app) in auth_refs {
        if let Some(api) = groups.get_mut(gi).and_then(|g| g.apis.get_mut(ai)) {
            api.authorized_apps.insert(app as usize);
        }
    }
    let purchases = purchase_refs
        .into_iter()
        .zip(&snapshot.purchases)
        .map(|((app, group), purchase)| (app, group, purchase))
        .collect();
    let hasher = DefaultHashBuilder::default();
    let apps: Vec<CompiledApp> = snapshot
        .apps
        .iter()
        .enumerate()
        .map(|(i, app)| CompiledApp::new(i, app, None))
        .collect();
    let hash = |text: &str| hasher.hash_one(text);
    let code_count = apps.iter().map(|app| usize::from(app.codes)).sum();
    let mut apps_by_key = HashTable::with_capacity(apps.len());
    let mut apps_by_code = HashTable::with_capacity(code_count);
    for app in &apps {
        // Fits: validation allows at most `MAX_APPS` (2^32 - 1) apps.
        let index = app.index as u32;
        apps_by_key.insert_unique(hash(app.key()), index, |&i| hash(apps[i as usize].key()));
        for (nth, code) in app.codes().enumerate() {
            apps_by_code.insert_unique(hash(code), (index, nth as u8), |&(i, nth)| {
                hash(apps[i as usize].code(usize::from(nth)))
            });
        }
    }
    let mut certificates = HashMap::new();
    let mut expiries = Vec::new();
    for (cert, parsed) in snapshot.certificates.iter().zip(parsed_certificates) {
        for domain in &cert.domains {
            certificates.insert(domain.as_str().into(), parsed.key.clone());
            if let Some(not_after) = parsed.not_after {
                expiries.push((domain.as_str(), not_after));
            }
        }
    }
    Prepared {
        compiled: CompiledSnapshot {
            version: snapshot.version,
            hosts,
            groups,
            apps,
            apps_by_key,
            apps_by_code,
            hasher,
            certificates,
            domain_rules,
            throttle: Arc::default(),
        },
        purchases,
        expiries,
        snapshot,
        throttling,
    }
}

/// Compiles each throttling policy onto the APIs it is bound to, taking the counters from
/// the throttle registry: an exclusive policy counts each API apart (scope `{policy}/{api}`),
/// a shared one all of them together (scope `{policy}`). The callers of an API are the apps
/// that can reach it: its group's buyers and the apps authorized for it.
fn bind_throttles(
    compiled: &mut CompiledSnapshot,
    snapshot: &Snapshot,
    refs: &ThrottleRefs<'_>,
    purchases: &[(u32, u32, &Purchase)],
    quota: &QuotaRegistry,
    metrics: &GatewayMetrics,
) {
    compiled.throttle = quota.throttle().clone();
    if refs.policies.is_empty() {
        return;
    }
    let registry = quota.throttle().clone();
    let users: HashMap<u32, &str> = refs.app_users.iter().copied().collect();
    let mut buyers: HashMap<usize, Vec<u32>> = HashMap::new();
    for &(app, group, _) in purchases {
        buyers.entry(group as usize).or_default().push(app);
    }
    for ((policy, apis), specials) in snapshot
        .throttling
        .policies
        .iter()
        .zip(&refs.policies)
        .zip(&refs.specials)
    {
        let rule = Arc::new(PolicyRule {
            id: policy.id.as_str().into(),
            name: policy.name.as_str().into(),
            api_limit: policy.api_call_limits,
            user_limit: policy.user_call_limits,
            app_limit: policy.app_call_limits,
            ip_limit: policy.ip_call_limits,
            interval: policy.time_interval,
            unit: policy.time_unit,
            window_ms: policy
                .time_interval
                .saturating_mul(policy.time_unit.seconds())
                .saturating_mul(1000),
        });
        let app_special = |app: u32| {
            specials.iter().find_map(|s| match *s {
                SpecialRef::App { app: a, limit } if a == app => Some(limit),
                _ => None,
            })
        };
        let user_special = |user: &str| {
            specials.iter().find_map(|s| match *s {
                SpecialRef::User { user: u, limit } if u == user => Some(limit),
                _ => None,
            })
        };
        for &(gi, ai) in apis {
            let Some(group) = compiled.groups.get_mut(gi) else {
                continue;
            };
            let scope = if policy.shared {
                policy.id.clone()
            } else {
                format!("{}/{}", policy.id, group.apis[ai].id)
            };
            let mut callers: Vec<u32> = buyers.get(&gi).cloned().unwrap_or_default();
            callers.extend(group.apis[ai].authorized_apps.iter().map(|&a| a as u32));
            callers.sort_unstable();
            callers.dedup();
            let callers = callers.into_iter().map(|app| {
                let user = users.get(&app).copied();
                let app_limit = app_special(app).or(policy.app_call_limits);
                let user_limit = user.map(|u| (u, user_special(u).or(policy.user_call_limits)));
                (
                    app,
                    snapshot.apps[app as usize].id.as_str(),
                    app_limit,
                    user_limit,
                )
            });
            let throttled = metrics.throttled(&group.id, &policy.id);
            group.apis[ai].throttle = Some(ApiThrottle::new(
                rule.clone(),
                &scope,
                callers,
                &registry,
                throttled,
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::wire::App;

    /// App `i` with `i % 6` app codes (0 to 5), a secret with multi-byte characters.
    fn app(i: usize) -> App {
        App {
            id: format!("app-{i}"),
            app_key: format!("key-{i}"),
            app_secret: format!("sécret-{i}-ü"),
            app_codes: (0..i % 6).map(|c| format!("code-{i}-{c}")).collect(),
            creator: "USER".into(),
        }
    }

    #[test]
    fn apps_are_found_by_key_and_by_each_of_their_codes() {
        let snapshot = Snapshot {
            version: 1,
            apps: (0..500).map(app).collect(),
            ..Snapshot::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let quota = QuotaRegistry::open(dir.path(), 8).unwrap();
        let compiled = compile(&snapshot, &quota, &GatewayMetrics::new()).unwrap();
        for (i, wire) in snapshot.apps.iter().enumerate() {
            let by_key = compiled.app_by_key(&wire.app_key).unwrap();
            assert_eq!(by_key.index, i);
            assert_eq!(by_key.key(), wire.app_key);
            assert_eq!(by_key.secret(), wire.app_secret.as_bytes());
            assert_eq!(by_key.codes().collect::<Vec<_>>(), wire.app_codes);
            for code in &wire.app_codes {
                assert_eq!(compiled.app_by_code(code).unwrap().index, i, "{code}");
            }
        }
        // Only whole keys and codes match, and a key is not a code nor a code a key.
        for unknown in ["key-", "key-10x", "code-7-1", "code-6-0", "sécret-1-ü", ""] {
            assert!(compiled.app_by_code(unknown).is_none(), "{unknown}");
        }
        assert!(compiled.app_by_key("code-5-0").is_none());
        assert!(compiled.app_by_key("key-1000").is_none());
    }
}
