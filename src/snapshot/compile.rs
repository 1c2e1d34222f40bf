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

use super::delta::Delta;
use super::validate::{
    app_is_well_formed, purchase_is_well_formed, resolve_app_auths, validate_apis,
    validate_certificates, validate_throttling, Names, ParsedApi, ParsedCertificate, MAX_APPS,
};
use super::validate::{
    validate, SpecialRef, ThrottleRefs, Validated, ValidationError, MAX_APP_CODES,
};
pub use super::validate::{AuthKind, CompiledBackend, PathPiece};
use super::wire::{
    App, Certificate, Domain, Group, MarketState, MinTlsVersion, Purchase, PurchaseState, Snapshot,
    ThrottlePolicy, Throttling,
};
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

/// Host name → (group index, which of its domains).
pub type HostTable = HashMap<Box<str>, (usize, DomainKind)>;
/// Bound domain → its TLS rules.
pub type DomainRuleTable = HashMap<Box<str>, DomainRules>;
/// Server name → the certificate served for it.
pub type CertificateTable = HashMap<Box<str>, Arc<CertifiedKey>>;

/// Cloned cheaply (its router and APIs are shared): a delta that changes a group's state or
/// name copies the rest.
#[derive(Debug, Clone)]
pub struct CompiledGroup {
    /// Position in [`CompiledSnapshot::groups`].
    pub index: usize,
    pub id: Box<str>,
    /// The seller's name for it, for logs and `marketgate_group_info` (labels carry the id).
    pub name: Box<str>,
    pub state: MarketState,
    pub router: Arc<Router>,
    pub apis: Arc<Vec<CompiledApi>>,
    pub counters: GroupCounters,
}

#[derive(Debug, Clone)]
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
/// key, the secret, the app codes and the app's id share one allocation, and the snapshot's
/// lookup tables hold only this app's index, not copies of its strings.
#[derive(Debug, Clone)]
pub struct CompiledApp {
    /// Its slot in the snapshot's apps: its position in the wire snapshot when compiled in
    /// full; a delta keeps every app's slot and adds apps at the end.
    pub index: usize,
    pub purchase: Option<CompiledPurchase>,
    /// The key, the secret, each app code, then the app's id, back to back.
    credentials: Box<str>,
    /// Where each part of `credentials` ends: the key, the secret, the codes, then the id.
    ends: [u16; 3 + MAX_APP_CODES],
    codes: u8,
}

impl CompiledApp {
    /// The app of a validated wire app (its credentials fit `u16` offsets: validate checks
    /// them against [`MAX_CREDENTIAL_BYTES`](super::validate::MAX_CREDENTIAL_BYTES); were
    /// they longer, the offsets would saturate and a part read empty, never panic).
    fn new(index: usize, app: &App, purchase: Option<CompiledPurchase>) -> CompiledApp {
        // The id last: were it longer than the offsets reach, only it would read short (and a
        // delta naming the app would find no app, and be compiled in full).
        let codes = app.app_codes.len().min(MAX_APP_CODES);
        let parts = [&app.app_key, &app.app_secret]
            .into_iter()
            .chain(&app.app_codes[..codes])
            .chain([&app.id]);
        let mut credentials = String::with_capacity(parts.clone().map(|part| part.len()).sum());
        let mut ends = [0; 3 + MAX_APP_CODES];
        for (end, part) in ends.iter_mut().zip(parts) {
            credentials.push_str(part);
            *end = u16::try_from(credentials.len()).unwrap_or(u16::MAX);
        }
        CompiledApp {
            index,
            purchase,
            credentials: credentials.into_boxed_str(),
            ends,
            codes: codes as u8,
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

    /// The app's id in the wire snapshot.
    pub fn id(&self) -> &str {
        self.part(2 + usize::from(self.codes))
    }
}

#[derive(Debug, Clone)]
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
///
/// Its per-buyer parts (apps, and the tables that find them) are split into chunks and
/// shards, each behind its own `Arc`, so that [`apply_delta`] builds the next snapshot by
/// copying only the chunks and shards a change touches and sharing the rest.
#[derive(Debug, Clone)]
pub struct CompiledSnapshot {
    pub version: u64,
    pub hosts: HostTable,
    pub groups: Vec<CompiledGroup>,
    apps: AppSlots,
    /// Indices into `apps` by app key and by app code, hashed with `hasher`; the strings
    /// themselves are the apps' own.
    apps_by_key: Sharded<u32>,
    /// (app, which of its codes).
    apps_by_code: Sharded<(u32, u8)>,
    /// By app id and by purchase id: what a delta names.
    apps_by_id: Sharded<u32>,
    apps_by_purchase: Sharded<u32>,
    hasher: DefaultHashBuilder,
    pub certificates: CertificateTable,
    /// The TLS rules of sellers' bound domains, by host name (empty: none bound).
    pub domain_rules: DomainRuleTable,
    /// The registry the throttling counters came from (its clock and mode).
    pub throttle: Arc<ThrottleRegistry>,
    /// The bound policies' limits and exceptions, for a delta that changes an API's callers.
    throttling: Arc<ThrottleIndex>,
}

/// The throttling section as a caller's limits are resolved from it: what lets a delta make
/// an app a caller of a bound API (a new buyer of its group) without the wire section.
#[derive(Debug, Default)]
struct ThrottleIndex {
    /// Each policy's limits and exceptions, by policy id.
    policies: HashMap<Box<str>, PolicyLimits>,
    /// The tenant each app calls as, by app slot (`throttling.app_users`).
    users: HashMap<u32, Box<str>>,
}

#[derive(Debug, Default)]
struct PolicyLimits {
    app_limit: Option<u64>,
    user_limit: Option<u64>,
    /// Exceptions: an app's own limit by app slot, a tenant's by name.
    apps: HashMap<u32, u64>,
    users: HashMap<Box<str>, u64>,
}

impl ThrottleIndex {
    /// The app and user limits policy `policy` holds app `app` to (exceptions applied):
    /// what [`ApiThrottle::set_caller`] takes.
    fn limits(&self, policy: &str, app: u32) -> (Option<u64>, Option<(&str, Option<u64>)>) {
        let Some(limits) = self.policies.get(policy) else {
            return (None, None);
        };
        let app_limit = limits.apps.get(&app).copied().or(limits.app_limit);
        let user = self.users.get(&app).map(|user| {
            let limit = limits.users.get(user).copied().or(limits.user_limit);
            (&**user, limit)
        });
        (app_limit, user)
    }

    /// Whether the throttling section names app `app` (its tenant, or an exception): such
    /// an app cannot leave without the section changing too.
    fn names(&self, app: u32) -> bool {
        self.users.contains_key(&app)
            || self
                .policies
                .values()
                .any(|limits| limits.apps.contains_key(&app))
    }
}

impl CompiledSnapshot {
    /// The app whose AppKey is `key`.
    pub fn app_by_key(&self, key: &str) -> Option<&CompiledApp> {
        let apps = &self.apps;
        let i = self.apps_by_key.find(self.hasher.hash_one(key), |&i| {
            apps.get(i as usize).is_some_and(|app| app.key() == key)
        })?;
        apps.get(*i as usize)
    }

    /// The app one of whose app codes is `code`.
    pub fn app_by_code(&self, code: &str) -> Option<&CompiledApp> {
        let apps = &self.apps;
        let (i, _) = self
            .apps_by_code
            .find(self.hasher.hash_one(code), |&(i, nth)| {
                apps.get(i as usize)
                    .is_some_and(|app| app.code(usize::from(nth)) == code)
            })?;
        apps.get(*i as usize)
    }

    /// The app whose wire id is `id`.
    pub fn app_by_id(&self, id: &str) -> Option<&CompiledApp> {
        let apps = &self.apps;
        let i = self.apps_by_id.find(self.hasher.hash_one(id), |&i| {
            apps.get(i as usize).is_some_and(|app| app.id() == id)
        })?;
        apps.get(*i as usize)
    }

    /// The app that holds the purchase `id`.
    pub fn app_by_purchase(&self, id: &str) -> Option<&CompiledApp> {
        let apps = &self.apps;
        let i = self.apps_by_purchase.find(self.hasher.hash_one(id), |&i| {
            apps.get(i as usize)
                .and_then(|app| app.purchase.as_ref())
                .is_some_and(|p| p.id() == id)
        })?;
        apps.get(*i as usize)
    }

    /// Every app, in slot order.
    pub fn apps(&self) -> impl Iterator<Item = &CompiledApp> {
        self.apps.iter()
    }
}

/// Shards a lookup table is split into: a delta copies the shards it touches (at 1M apps,
/// ~4k entries, ~20 KB each) and shares the others.
const SHARDS: usize = 256;

/// Apps per chunk of [`AppSlots`]: a delta copies the chunks it touches.
const APP_CHUNK: usize = 1024;

/// A hash table in [`SHARDS`] shards, each behind its own `Arc`.
#[derive(Debug, Clone)]
struct Sharded<T> {
    shards: Vec<Arc<HashTable<T>>>,
}

/// The shard of a hash: bits that neither a shard's bucket index (the low bits) nor its
/// control bytes (the top seven) use, so entries spread within a shard as in one table.
fn shard_of(hash: u64) -> usize {
    (hash >> 32) as usize % SHARDS
}

impl<T: Clone> Sharded<T> {
    fn with_capacity(total: usize) -> Sharded<T> {
        let each = total.div_ceil(SHARDS);
        Sharded {
            shards: (0..SHARDS)
                .map(|_| Arc::new(HashTable::with_capacity(each)))
                .collect(),
        }
    }

    fn find(&self, hash: u64, eq: impl FnMut(&T) -> bool) -> Option<&T> {
        self.shards[shard_of(hash)].find(hash, eq)
    }

    /// Inserts `value` (the caller checked it is not there), copying its shard if shared.
    fn insert(&mut self, hash: u64, value: T, rehash: impl Fn(&T) -> u64) {
        Arc::make_mut(&mut self.shards[shard_of(hash)]).insert_unique(hash, value, rehash);
    }

    /// Removes the entry `eq` picks, copying its shard if shared.
    fn remove(&mut self, hash: u64, eq: impl Fn(&T) -> bool) -> Option<T> {
        let shard = &mut self.shards[shard_of(hash)];
        shard.find(hash, &eq)?;
        Arc::make_mut(shard)
            .find_entry(hash, &eq)
            .ok()
            .map(|entry| entry.remove().0)
    }
}
/// The apps, [`APP_CHUNK`] to a chunk, each chunk behind its own `Arc`. An app keeps its
/// slot for as long as it is in the market (a delta empties a removed app's slot and adds
/// apps at the end), so tables and APIs refer to it by slot.
#[derive(Debug, Clone, Default)]
struct AppSlots {
    chunks: Vec<Arc<Vec<Option<CompiledApp>>>>,
    len: usize,
    /// Slots emptied by deltas (a full compile has none).
    vacant: usize,
}

impl AppSlots {
    fn get(&self, i: usize) -> Option<&CompiledApp> {
        self.chunks.get(i / APP_CHUNK)?.get(i % APP_CHUNK)?.as_ref()
    }

    /// The slot `i`, its chunk copied if shared.
    fn slot_mut(&mut self, i: usize) -> Option<&mut Option<CompiledApp>> {
        Arc::make_mut(self.chunks.get_mut(i / APP_CHUNK)?).get_mut(i % APP_CHUNK)
    }

    fn push(&mut self, app: CompiledApp) -> usize {
        if self.len % APP_CHUNK == 0 {
            self.chunks.push(Arc::new(Vec::with_capacity(APP_CHUNK)));
        }
        if let Some(chunk) = self.chunks.last_mut() {
            Arc::make_mut(chunk).push(Some(app));
        }
        self.len += 1;
        self.len - 1
    }

    fn iter(&self) -> impl Iterator<Item = &CompiledApp> {
        self.chunks
            .iter()
            .flat_map(|chunk| chunk.iter().filter_map(Option::as_ref))
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
            bind_purchase(&mut compiled, app, group, purchase, cell);
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
    let groups_in_order = snapshot.groups.iter().enumerate();
    let (hosts, domain_rules) = host_table(groups_in_order, &snapshot.domains, &domain_groups);
    let mut groups: Vec<CompiledGroup> = snapshot
        .groups
        .iter()
        .zip(parsed)
        .enumerate()
        .map(|(gi, (group, parsed))| compile_group(gi, group, parsed, metrics))
        .collect();
    for (gi, ai, app) in auth_refs {
        let apis = groups.get_mut(gi).and_then(|g| Arc::get_mut(&mut g.apis));
        if let Some(api) = apis.and_then(|apis| apis.get_mut(ai)) {
            api.authorized_apps.insert(app as usize);
        }
    }
    let purchases = purchase_refs
        .into_iter()
        .zip(&snapshot.purchases)
        .map(|((app, group), purchase)| (app, group, purchase))
        .collect();
    let hasher = DefaultHashBuilder::default();
    let mut apps = AppSlots::default();
    for (i, app) in snapshot.apps.iter().enumerate() {
        apps.push(CompiledApp::new(i, app, None));
    }
    let code_count = apps.iter().map(|app| usize::from(app.codes)).sum();
    let mut apps_by_key = Sharded::with_capacity(apps.len);
    let mut apps_by_code = Sharded::with_capacity(code_count);
    let mut apps_by_id = Sharded::with_capacity(apps.len);
    for app in apps.iter() {
        index_app(
            &apps,
            app,
            &hasher,
            &mut apps_by_key,
            &mut apps_by_code,
            &mut apps_by_id,
        );
    }
    let (certificates, expiries) = certificate_table(&snapshot.certificates, parsed_certificates);
    Prepared {
        compiled: CompiledSnapshot {
            version: snapshot.version,
            hosts,
            groups,
            apps,
            apps_by_key,
            apps_by_code,
            apps_by_id,
            apps_by_purchase: Sharded::with_capacity(snapshot.purchases.len()),
            hasher,
            certificates,
            domain_rules,
            throttle: Arc::default(),
            throttling: Arc::default(),
        },
        purchases,
        expiries,
        snapshot,
        throttling,
    }
}

/// Group `gi` compiled from its validated APIs: its router and APIs (no authorized apps nor
/// throttle yet: the caller adds them), its metric series (created at zero if new).
fn compile_group(
    gi: usize,
    group: &Group,
    parsed: Vec<ParsedApi>,
    metrics: &GatewayMetrics,
) -> CompiledGroup {
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
    CompiledGroup {
        index: gi,
        id: group.id.as_str().into(),
        name: group.name.as_str().into(),
        state: group.market_state,
        router: Arc::new(router),
        apis: Arc::new(apis),
        counters: metrics.group(&group.id),
    }
}

/// Host name → (group index, which domain) for every group's `sl_domain` and `url_domain`
/// and every bound domain (`domain_groups[i]`: bound domain `i`'s group), and the bound
/// domains' TLS rules. Names were checked unique by validation (`Names`).
fn host_table<'g>(
    groups: impl Iterator<Item = (usize, &'g Group)>,
    domains: &[Domain],
    domain_groups: &[usize],
) -> (HostTable, DomainRuleTable) {
    let mut hosts = HashMap::new();
    for (gi, group) in groups {
        hosts.insert(group.sl_domain.as_str().into(), (gi, DomainKind::Seller));
        if let Some(url_domain) = &group.url_domain {
            hosts.insert(url_domain.as_str().into(), (gi, DomainKind::Market));
        }
    }
    let mut domain_rules = HashMap::new();
    for (bound, &gi) in domains.iter().zip(domain_groups) {
        hosts.insert(bound.domain.as_str().into(), (gi, DomainKind::Market));
        domain_rules.insert(
            bound.domain.as_str().into(),
            DomainRules {
                min_tls_version: bound.min_tls_version,
                https_redirect: bound.https_redirect,
            },
        );
    }
    (hosts, domain_rules)
}

/// Each certificate's key by every domain it names, and the certificates' expiries.
fn certificate_table(
    certificates: &[Certificate],
    parsed: Vec<ParsedCertificate>,
) -> (CertificateTable, Vec<(&str, i64)>) {
    let mut table = HashMap::new();
    let mut expiries = Vec::new();
    for (cert, parsed) in certificates.iter().zip(parsed) {
        for domain in &cert.domains {
            table.insert(domain.as_str().into(), parsed.key.clone());
            if let Some(not_after) = parsed.not_after {
                expiries.push((domain.as_str(), not_after));
            }
        }
    }
    (table, expiries)
}

/// A delta applied to a compiled snapshot, its purchases' quota cells not yet taken: made
/// by [`apply_delta`], finished by [`PreparedDelta::bind`] once the delta is persisted.
#[derive(Debug)]
pub struct PreparedDelta<'a> {
    compiled: CompiledSnapshot,
    /// (app slot, group index, the purchase) of each purchase the delta carries.
    purchases: Vec<(u32, u32, &'a Purchase)>,
    /// A group's name changed, or groups came or went (`marketgate_group_info` follows).
    renamed: bool,
    /// Apps (by slot) that stopped buying from a group, then apps that started to: the
    /// callers of the group's throttled APIs change (bound policies only).
    left: Vec<(u32, usize)>,
    joined: Vec<(u32, usize)>,
    /// Throttled APIs whose authorized apps changed: their callers follow.
    authorized: Vec<AuthorizedChange>,
    /// Bound APIs that moved to another group: their throttle is built anew at bind.
    fresh: Vec<FreshThrottle>,
    /// The certificates' expiries, when the delta replaced the certificates.
    expiries: Option<Vec<(&'a str, i64)>>,
}

/// A throttled API's authorized apps changed (by app slot).
#[derive(Debug)]
struct AuthorizedChange {
    group: usize,
    api: usize,
    added: Vec<u32>,
    removed: Vec<u32>,
}

/// A bound API whose throttle is compiled at bind, from its group's buyers then.
#[derive(Debug)]
struct FreshThrottle {
    group: usize,
    api: usize,
    rule: Arc<PolicyRule>,
    scope: String,
}

impl PreparedDelta<'_> {
    /// The version it makes.
    pub fn version(&self) -> u64 {
        self.compiled.version
    }

    /// Takes the cells of the purchases the delta carries from `quota` (as
    /// [`Prepared::bind`] does for every purchase); every other purchase keeps its cell.
    /// The callers of throttled APIs follow who buys and who is authorized; certificate
    /// expiries and group names are published if they changed.
    pub fn bind(self, quota: &QuotaRegistry, metrics: &GatewayMetrics) -> CompiledSnapshot {
        let PreparedDelta {
            mut compiled,
            purchases,
            renamed,
            left,
            joined,
            authorized,
            fresh,
            expiries,
        } = self;
        let registry = quota.throttle();
        rebind_callers(&mut compiled, &left, &joined, registry);
        for (app, group, purchase) in purchases {
            let cell = quota.cell(
                &purchase.id,
                purchase.quota_limit.unwrap_or(UNLIMITED),
                purchase.quota_used,
            );
            bind_purchase(&mut compiled, app, group, purchase, cell);
        }
        reauthorize_callers(&mut compiled, &authorized, registry);
        build_fresh_throttles(&mut compiled, &fresh, registry, metrics);
        if let Some(expiries) = expiries {
            metrics.set_certificate_expiries(expiries);
        }
        if renamed {
            metrics.set_group_names(compiled.groups.iter().map(|g| (&*g.id, &*g.name)));
        }
        compiled
    }
}

/// What `delta` makes of `base` (compiled from `wire`, the wire snapshot the delta applies
/// to), built by structural sharing: only the chunks of apps and the table shards the
/// delta's apps and purchases touch are copied, and only the groups it changes; the rest
/// is `base`'s, shared. Touches no shared state but the metric series of new groups (see
/// [`PreparedDelta::bind`]).
///
/// Sellers' changes are applied the same way, checked by the rules a full validation runs
/// (the same functions: `validate::Names`, `validate_apis`, `resolve_app_auths`,
/// `validate_certificates`) against the compiled tables: a group whose APIs changed, or a
/// new group, has its APIs validated and its router compiled (a bound API staying in its
/// group keeps its throttle; one that moved gets a new one at bind, O(the market's apps));
/// the host table is rebuilt from every group's names and the bound domains when a group's
/// domains, the groups or the bound domains changed (O(groups)); app authorizations are
/// resolved again when they, or the APIs, changed, and only APIs whose authorized apps
/// changed are copied; certificates are parsed when they changed. A removed group's
/// purchases must be gone (every purchase is checked: O(the market's apps), rare); groups
/// after it move up one place, their purchases with them.
///
/// Where throttling policies are bound, an app that starts or stops buying from a group
/// becomes or stops being a caller of the group's throttled APIs: those APIs are copied
/// (their callers' tables, O(the group's buyers)), the counters taken at bind. A new
/// throttling section is checked by `validate::validate_throttling` against the compiled
/// tables, and only the APIs bound to a policy it adds, removes or changes are rebuilt, at
/// bind (one pass over the apps for their groups' buyers): [`rethrottle`].
///
/// `None` when the delta is not one this applies, and the caller then validates and
/// compiles the whole snapshot (which also words any refusal exactly as a full push's):
/// a delta that replaces the throttling section and changes APIs too; one that removes an
/// app the throttling section names;
/// one that breaks a rule (a duplicate key or domain, a purchase of a missing app, a group
/// removed with its buyers, …); and when a quarter of the apps' slots are empty (a full
/// compile packs them again).
/// Equal to a full compile of `delta::apply(wire, delta)` otherwise
/// (`snapshot::properties`).
pub fn apply_delta<'a>(
    base: &CompiledSnapshot,
    wire: &Snapshot,
    delta: &'a Delta,
    metrics: &GatewayMetrics,
) -> Option<PreparedDelta<'a>> {
    if delta.from_version != base.version
        || wire.version != base.version
        || delta.version <= delta.from_version
        || base.apps.vacant * 4 > base.apps.len
        || base.groups.len() != wire.groups.len()
    {
        return None;
    }
    let mut next = base.clone();
    next.version = delta.version;

    // Groups, in the order the rebuilt wire snapshot has them (`delta::apply`).
    let groups = GroupChanges::of(wire, delta)?;
    let mut renamed = groups.added_or_removed;
    let mut hosts_changed = groups.added_or_removed || delta.domains.is_some();
    let mut recompiled = Vec::new();
    let mut compiled_groups = Vec::with_capacity(groups.order.len());
    for (gi, &(old, group)) in groups.order.iter().enumerate() {
        let Some(old) = old else {
            recompiled.push(gi);
            compiled_groups.push(None);
            continue;
        };
        let (before, compiled) = (&wire.groups[old], base.groups.get(old)?);
        if *compiled.id != *group.id {
            return None;
        }
        let mut compiled = compiled.clone();
        compiled.index = gi;
        if !std::ptr::eq(before, group) {
            hosts_changed |=
                before.sl_domain != group.sl_domain || before.url_domain != group.url_domain;
            renamed |= before.name != group.name;
            compiled.name = group.name.as_str().into();
            compiled.state = group.market_state;
            if before.apis != group.apis {
                recompiled.push(gi);
            }
        }
        compiled_groups.push(Some(compiled));
    }

    // APIs: those of the groups recompiled are checked against every other group's ids.
    let apis_changed = groups.added_or_removed || !recompiled.is_empty();
    if apis_changed && delta.throttling.is_some() {
        // Both at once (rare): the APIs' throttles above follow the section they had.
        return None;
    }
    let mut api_ids: HashMap<&str, (usize, usize)> = HashMap::new();
    if apis_changed || delta.app_auths.is_some() {
        for (gi, &(_, group)) in groups.order.iter().enumerate() {
            if !recompiled.contains(&gi) {
                for (ai, api) in group.apis.iter().enumerate() {
                    api_ids.insert(api.id.as_str(), (gi, ai));
                }
            }
        }
    }
    let bound: HashMap<&str, &ThrottlePolicy> = wire
        .throttling
        .policies
        .iter()
        .flat_map(|policy| policy.api_ids.iter().map(move |api| (api.as_str(), policy)))
        .collect();
    let mut fresh = Vec::new();
    for &gi in &recompiled {
        let (old, group) = groups.order[gi];
        let parsed = validate_apis(gi, group, &mut api_ids).ok()?;
        let mut compiled = compile_group(gi, group, parsed, metrics);
        let before = old.and_then(|old| base.groups.get(old));
        for (ai, api) in Arc::make_mut(&mut compiled.apis).iter_mut().enumerate() {
            let Some(policy) = bound.get(&*api.id) else {
                continue;
            };
            // A bound API that stays in its group keeps its throttle (its callers are
            // still the group's buyers and its authorized apps, which follow below).
            let kept = before.and_then(|g| g.apis.iter().find(|old| old.id == api.id));
            match kept.filter(|old| old.throttle.is_some()) {
                Some(old) => {
                    api.throttle = old.throttle.clone();
                    api.authorized_apps = old.authorized_apps.clone();
                }
                None => fresh.push(FreshThrottle {
                    group: gi,
                    api: ai,
                    rule: Arc::new(policy_rule(policy)),
                    scope: throttle_scope(policy, &api.id),
                }),
            }
        }
        compiled_groups[gi] = Some(compiled);
    }
    next.groups = compiled_groups.into_iter().collect::<Option<Vec<_>>>()?;
    // The throttling section still names only APIs that are there.
    if apis_changed && !bound.keys().all(|api| api_ids.contains_key(api)) {
        return None;
    }

    // Hosts: every group's names and the bound domains claimed again, as validation does.
    let bound_domains = delta.domains.as_deref().unwrap_or(&wire.domains);
    if hosts_changed {
        let mut names = Names::default();
        for (gi, &(_, group)) in groups.order.iter().enumerate() {
            names.claim_group(gi, group).ok()?;
        }
        let domain_groups = names.claim_bound_domains(bound_domains).ok()?;
        let in_order = groups.order.iter().map(|&(_, group)| group).enumerate();
        (next.hosts, next.domain_rules) = host_table(in_order, bound_domains, &domain_groups);
    }

    // Purchases removed or replaced leave their apps first (an app may change hands).
    let mut seen = HashSet::new();
    if !delta.purchases.iter().all(|p| seen.insert(p.id.as_str())) {
        return None;
    }
    let removed = delta.removed_purchases.iter().map(|id| (id, true));
    let replaced = delta.purchases.iter().map(|p| (&p.id, false));
    let mut left = Vec::new();
    for (id, must_exist) in removed.chain(replaced) {
        let Some((app, group)) = next
            .app_by_purchase(id)
            .and_then(|app| Some((app.index, app.purchase.as_ref()?.group)))
        else {
            if must_exist {
                return None;
            }
            continue;
        };
        // Its group's place now (a removed group's callers need no change).
        if let Some(group) = groups.place[group] {
            left.push((app as u32, group));
        }
        let hash = next.hasher.hash_one(id.as_str());
        next.apps_by_purchase.remove(hash, |&i| i as usize == app);
        next.apps.slot_mut(app)?.as_mut()?.purchase = None;
    }
    // A group removed: every purchase left follows its group, and none may be of a group gone.
    if groups.removed {
        let mut follow = Vec::new();
        for app in next.apps.iter() {
            if let Some(purchase) = &app.purchase {
                let place = groups.place[purchase.group]?;
                if place != purchase.group {
                    follow.push((app.index, place));
                }
            }
        }
        for (app, place) in follow {
            next.apps.slot_mut(app)?.as_mut()?.purchase.as_mut()?.group = place;
        }
    }

    // Apps removed or replaced: out of the tables first, so a key or code may move to
    // another app in the same delta.
    let app_auths = delta.app_auths.as_deref().unwrap_or(&wire.app_auths);
    for id in &delta.removed_apps {
        let app = next.app_by_id(id)?.clone();
        // A purchase, an authorization or the throttling section still naming it: the full
        // path refuses it.
        if app.purchase.is_some()
            || app_auths.iter().any(|auth| auth.app_id == *id)
            || next.throttling.names(app.index as u32)
        {
            return None;
        }
        unindex_app(&mut next, &app);
        *next.apps.slot_mut(app.index)? = None;
        next.apps.vacant += 1;
    }
    let mut seen = HashSet::new();
    let mut slots = Vec::with_capacity(delta.apps.len());
    for app in &delta.apps {
        if !app_is_well_formed(app) || !seen.insert(app.id.as_str()) {
            return None;
        }
        match next.app_by_id(&app.id).cloned() {
            Some(old) => {
                unindex_app(&mut next, &old);
                slots.push(Some((old.index, old.purchase)));
            }
            None => slots.push(None),
        }
    }
    for (app, slot) in delta.apps.iter().zip(slots) {
        let taken = next.app_by_key(&app.app_key).is_some()
            || app
                .app_codes
                .iter()
                .any(|code| next.app_by_code(code).is_some());
        let mut codes = HashSet::new();
        if taken || !app.app_codes.iter().all(|code| codes.insert(code.as_str())) {
            return None;
        }
        let index = match slot {
            Some((index, purchase)) => {
                *next.apps.slot_mut(index)? = Some(CompiledApp::new(index, app, purchase));
                index
            }
            None if next.apps.len < MAX_APPS => {
                let index = next.apps.len;
                next.apps.push(CompiledApp::new(index, app, None))
            }
            None => return None,
        };
        let CompiledSnapshot {
            apps,
            apps_by_key,
            apps_by_code,
            apps_by_id,
            hasher,
            ..
        } = &mut next;
        index_app(
            apps,
            apps.get(index)?,
            hasher,
            apps_by_key,
            apps_by_code,
            apps_by_id,
        );
    }

    // Purchases carried: each names a group and an app with no other purchase.
    let mut claimed = HashSet::new();
    let mut purchases = Vec::with_capacity(delta.purchases.len());
    for purchase in &delta.purchases {
        if !purchase_is_well_formed(purchase) {
            return None;
        }
        let &gi = groups.by_id.get(purchase.group_id.as_str())?;
        let app = next.app_by_id(&purchase.app_id)?;
        if app.purchase.is_some() || !claimed.insert(app.index) {
            return None;
        }
        purchases.push((app.index as u32, u32::try_from(gi).ok()?, purchase));
    }
    // Who buys from which group changed: only where it did (a purchase replaced in its
    // group, or frozen, changes no API's callers).
    let mut joined: Vec<(u32, usize)> = purchases
        .iter()
        .map(|&(app, group, _)| (app, group as usize))
        .collect();
    let left_set: HashSet<(u32, usize)> = left.iter().copied().collect();
    let joined_set: HashSet<(u32, usize)> = joined.iter().copied().collect();
    left.retain(|moved| !joined_set.contains(moved));
    joined.retain(|moved| !left_set.contains(moved));

    // App authorizations: resolved again when they or the APIs changed.
    let mut authorized = Vec::new();
    if delta.app_auths.is_some() || apis_changed {
        let refs = resolve_app_auths(
            app_auths,
            |id| next.app_by_id(id).map(|app| app.index as u32),
            |id| api_ids.get(id).copied(),
        )
        .ok()?;
        authorized = reauthorize(&mut next.groups, &refs);
    }

    // Certificates: parsed when they changed (they name nothing else).
    let mut expiries = None;
    if let Some(certificates) = &delta.certificates {
        let parsed = validate_certificates(certificates).ok()?;
        let (table, parsed_expiries) = certificate_table(certificates, parsed);
        next.certificates = table;
        expiries = Some(parsed_expiries);
    }

    // The throttling section replaced: checked against the tables this delta leaves.
    if let Some(section) = &delta.throttling {
        rethrottle(&mut next, &wire.throttling, section, &mut fresh)?;
    }

    Some(PreparedDelta {
        compiled: next,
        purchases,
        renamed,
        left,
        joined,
        authorized,
        fresh,
        expiries,
    })
}

/// The groups a delta makes, as `delta::apply` orders them: the base's order with removed
/// groups dropped and changed ones in place, then new ones by id.
struct GroupChanges<'w> {
    /// Each group's place in the base (`None`: new) and its wire form.
    order: Vec<(Option<usize>, &'w Group)>,
    /// `place[i]`: where the base's group `i` is now (`None`: removed).
    place: Vec<Option<usize>>,
    /// Group id → its place.
    by_id: HashMap<&'w str, usize>,
    /// A group was removed: the groups after it moved up.
    removed: bool,
    /// A group was removed or added.
    added_or_removed: bool,
}

impl<'w> GroupChanges<'w> {
    /// `None` for a delta that names a group twice (changed twice, or changed and removed).
    fn of(wire: &'w Snapshot, delta: &'w Delta) -> Option<GroupChanges<'w>> {
        let removed: HashSet<&str> = delta.removed_groups.iter().map(String::as_str).collect();
        let mut changed: HashMap<&str, &Group> = HashMap::new();
        for group in &delta.groups {
            if removed.contains(group.id.as_str())
                || changed.insert(group.id.as_str(), group).is_some()
            {
                return None;
            }
        }
        let mut order = Vec::with_capacity(wire.groups.len() + changed.len());
        let mut place = Vec::with_capacity(wire.groups.len());
        for (gi, group) in wire.groups.iter().enumerate() {
            if removed.contains(group.id.as_str()) {
                place.push(None);
                continue;
            }
            place.push(Some(order.len()));
            order.push((Some(gi), changed.remove(group.id.as_str()).unwrap_or(group)));
        }
        let mut added: Vec<&Group> = changed.into_values().collect();
        added.sort_by(|a, b| a.id.cmp(&b.id));
        order.extend(added.into_iter().map(|group| (None, group)));
        let removed = place.iter().any(Option::is_none);
        let added_or_removed = removed || order.len() != wire.groups.len();
        let by_id = order
            .iter()
            .enumerate()
            .map(|(gi, &(_, group))| (group.id.as_str(), gi))
            .collect();
        Some(GroupChanges {
            order,
            place,
            by_id,
            removed,
            added_or_removed,
        })
    }
}

/// Gives each API the apps `refs` (group, API, app) authorize for it, copying only the
/// groups whose APIs' authorized apps change; returns the changes of throttled APIs.
fn reauthorize(
    groups: &mut [CompiledGroup],
    refs: &[(usize, usize, u32)],
) -> Vec<AuthorizedChange> {
    let mut wanted: HashMap<(usize, usize), HashSet<usize>> = HashMap::new();
    for &(gi, ai, app) in refs {
        wanted.entry((gi, ai)).or_default().insert(app as usize);
    }
    let none = HashSet::new();
    let mut changes = Vec::new();
    for (gi, group) in groups.iter_mut().enumerate() {
        let differs = |ai: usize, api: &CompiledApi| {
            api.authorized_apps != *wanted.get(&(gi, ai)).unwrap_or(&none)
        };
        if !group
            .apis
            .iter()
            .enumerate()
            .any(|(ai, api)| differs(ai, api))
        {
            continue;
        }
        for (ai, api) in Arc::make_mut(&mut group.apis).iter_mut().enumerate() {
            if !differs(ai, api) {
                continue;
            }
            let now = wanted.get(&(gi, ai)).cloned().unwrap_or_default();
            if api.throttle.is_some() {
                let slots = |apps: &HashSet<usize>, other: &HashSet<usize>| {
                    apps.difference(other).map(|&app| app as u32).collect()
                };
                changes.push(AuthorizedChange {
                    group: gi,
                    api: ai,
                    added: slots(&now, &api.authorized_apps),
                    removed: slots(&api.authorized_apps, &now),
                });
            }
            api.authorized_apps = now;
        }
    }
    changes
}

/// Makes the callers of throttled APIs follow their authorized apps: an app authorized
/// now is a caller (with the limits its policy holds it to); one no longer authorized
/// stops being one unless it buys from the API's group.
fn reauthorize_callers(
    compiled: &mut CompiledSnapshot,
    changes: &[AuthorizedChange],
    registry: &ThrottleRegistry,
) {
    let CompiledSnapshot {
        groups,
        apps,
        throttling,
        ..
    } = compiled;
    for change in changes {
        let Some(group) = groups.get_mut(change.group) else {
            continue;
        };
        let Some(api) = Arc::make_mut(&mut group.apis).get_mut(change.api) else {
            continue;
        };
        let Some(throttle) = api.throttle.as_mut() else {
            continue;
        };
        for &app in &change.added {
            if let Some(compiled_app) = apps.get(app as usize) {
                let (app_limit, user) = throttling.limits(&throttle.rule.id, app);
                throttle.set_caller(app, compiled_app.id(), app_limit, user, registry);
            }
        }
        for &app in &change.removed {
            let buys_here = apps
                .get(app as usize)
                .and_then(|app| app.purchase.as_ref())
                .is_some_and(|purchase| purchase.group == change.group);
            if !buys_here {
                throttle.remove_caller(app);
            }
        }
    }
}

/// Compiles the throttle of each bound API that moved groups: its callers are its group's
/// buyers (found by a pass over the apps) and its authorized apps.
fn build_fresh_throttles(
    compiled: &mut CompiledSnapshot,
    fresh: &[FreshThrottle],
    registry: &ThrottleRegistry,
    metrics: &GatewayMetrics,
) {
    if fresh.is_empty() {
        return;
    }
    let (groups, apps) = (&mut compiled.groups, &compiled.apps);
    let throttling = &compiled.throttling;
    let mut buyers: HashMap<usize, Vec<u32>> = HashMap::new();
    for app in apps.iter() {
        if let Some(purchase) = &app.purchase {
            buyers
                .entry(purchase.group)
                .or_default()
                .push(app.index as u32);
        }
    }
    for entry in fresh {
        let Some(group) = groups.get_mut(entry.group) else {
            continue;
        };
        let throttled = metrics.throttled(&group.id, &entry.rule.id);
        let Some(api) = Arc::make_mut(&mut group.apis).get_mut(entry.api) else {
            continue;
        };
        let mut callers = buyers.get(&entry.group).cloned().unwrap_or_default();
        callers.extend(api.authorized_apps.iter().map(|&app| app as u32));
        callers.sort_unstable();
        callers.dedup();
        let callers = callers.into_iter().filter_map(|app| {
            let (app_limit, user) = throttling.limits(&entry.rule.id, app);
            Some((app, apps.get(app as usize)?.id(), app_limit, user))
        });
        api.throttle = Some(ApiThrottle::new(
            entry.rule.clone(),
            &entry.scope,
            callers,
            registry,
            throttled,
        ));
    }
}

/// Makes the callers of each throttled API of a group follow its buyers: an app in `left`
/// stops calling its group's APIs (but those it is authorized for), one in `joined` starts,
/// with the limits the policy holds it to. Only the groups named copy their APIs.
fn rebind_callers(
    compiled: &mut CompiledSnapshot,
    left: &[(u32, usize)],
    joined: &[(u32, usize)],
    registry: &ThrottleRegistry,
) {
    if compiled.throttling.policies.is_empty() {
        return;
    }
    let CompiledSnapshot {
        groups,
        apps,
        throttling,
        ..
    } = compiled;
    let throttled = |group: &CompiledGroup| group.apis.iter().any(|api| api.throttle.is_some());
    for &(app, gi) in left {
        let Some(group) = groups.get_mut(gi).filter(|group| throttled(group)) else {
            continue;
        };
        for api in Arc::make_mut(&mut group.apis) {
            if let Some(throttle) = api.throttle.as_mut() {
                if !api.authorized_apps.contains(&(app as usize)) {
                    throttle.remove_caller(app);
                }
            }
        }
    }
    for &(app, gi) in joined {
        let (Some(group), Some(compiled_app)) = (
            groups.get_mut(gi).filter(|group| throttled(group)),
            apps.get(app as usize),
        ) else {
            continue;
        };
        for api in Arc::make_mut(&mut group.apis) {
            if let Some(throttle) = api.throttle.as_mut() {
                let (app_limit, user) = throttling.limits(&throttle.rule.id, app);
                throttle.set_caller(app, compiled_app.id(), app_limit, user, registry);
            }
        }
    }
}

/// Enters `app` (already in `apps`, at `app.index`) in the tables of keys, codes and ids.
fn index_app(
    apps: &AppSlots,
    app: &CompiledApp,
    hasher: &DefaultHashBuilder,
    by_key: &mut Sharded<u32>,
    by_code: &mut Sharded<(u32, u8)>,
    by_id: &mut Sharded<u32>,
) {
    let hash = |text: &str| hasher.hash_one(text);
    let key_of = |&i: &u32| apps.get(i as usize).map_or(0, |app| hash(app.key()));
    let id_of = |&i: &u32| apps.get(i as usize).map_or(0, |app| hash(app.id()));
    // Fits: validation allows at most `MAX_APPS` (2^32 - 1) apps.
    let index = app.index as u32;
    by_key.insert(hash(app.key()), index, key_of);
    by_id.insert(hash(app.id()), index, id_of);
    for (nth, code) in app.codes().enumerate() {
        by_code.insert(hash(code), (index, nth as u8), |&(i, nth)| {
            apps.get(i as usize)
                .map_or(0, |app| hash(app.code(usize::from(nth))))
        });
    }
}

/// Takes `app` (an index) out of the tables of keys, codes and ids.
fn unindex_app(compiled: &mut CompiledSnapshot, app: &CompiledApp) {
    let hasher = &compiled.hasher;
    let index = app.index as u32;
    compiled
        .apps_by_key
        .remove(hasher.hash_one(app.key()), |&i| i == index);
    compiled
        .apps_by_id
        .remove(hasher.hash_one(app.id()), |&i| i == index);
    for code in app.codes() {
        compiled
            .apps_by_code
            .remove(hasher.hash_one(code), |&(i, _)| i == index);
    }
}

/// Gives the app in slot `app` its purchase (the cell taken from the registry) and enters it
/// in the table of purchases.
fn bind_purchase(
    compiled: &mut CompiledSnapshot,
    app: u32,
    group: u32,
    purchase: &Purchase,
    cell: Arc<QuotaCell>,
) {
    let Some(Some(slot)) = compiled.apps.slot_mut(app as usize) else {
        return;
    };
    slot.purchase = Some(CompiledPurchase {
        group: group as usize,
        state: purchase.state,
        start_time: purchase.start_time,
        expire_time: purchase.expire_time,
        cell,
    });
    let hasher = &compiled.hasher;
    let apps = &compiled.apps;
    compiled
        .apps_by_purchase
        .insert(hasher.hash_one(&purchase.id), app, |&i| {
            apps.get(i as usize)
                .and_then(|app| app.purchase.as_ref())
                .map_or(0, |p| hasher.hash_one(p.id()))
        });
}

/// A throttling policy as the hot path applies it.
fn policy_rule(policy: &ThrottlePolicy) -> PolicyRule {
    PolicyRule {
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
    }
}

/// What the counters of `policy` bound to API `api_id` are named by: an exclusive policy
/// counts each API apart (`{policy}/{api}`), a shared one all of them together (`{policy}`).
fn throttle_scope(policy: &ThrottlePolicy, api_id: &str) -> String {
    if policy.shared {
        policy.id.clone()
    } else {
        format!("{}/{}", policy.id, api_id)
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
    let index = throttle_index(&snapshot.throttling, refs);
    let mut buyers: HashMap<usize, Vec<u32>> = HashMap::new();
    for &(app, group, _) in purchases {
        buyers.entry(group as usize).or_default().push(app);
    }
    for (policy, apis) in snapshot.throttling.policies.iter().zip(&refs.policies) {
        let rule = Arc::new(policy_rule(policy));
        for &(gi, ai) in apis {
            let Some(group) = compiled.groups.get_mut(gi) else {
                continue;
            };
            // Just built by `prepare`: the APIs are this snapshot's alone.
            let group_id = &group.id;
            let apis = Arc::get_mut(&mut group.apis)
                .expect("a group's APIs are shared only once its snapshot is bound");
            let scope = throttle_scope(policy, &apis[ai].id);
            let mut callers: Vec<u32> = buyers.get(&gi).cloned().unwrap_or_default();
            callers.extend(apis[ai].authorized_apps.iter().map(|&a| a as u32));
            callers.sort_unstable();
            callers.dedup();
            let index = &index;
            let callers = callers.into_iter().map(|app| {
                let (app_limit, user) = index.limits(&policy.id, app);
                (
                    app,
                    snapshot.apps[app as usize].id.as_str(),
                    app_limit,
                    user,
                )
            });
            let throttled = metrics.throttled(group_id, &policy.id);
            apis[ai].throttle = Some(ApiThrottle::new(
                rule.clone(),
                &scope,
                callers,
                &registry,
                throttled,
            ));
        }
    }
    compiled.throttling = Arc::new(index);
}

/// The limits and exceptions of each policy of `section` and the tenant of each app, as
/// [`ThrottleIndex::limits`] resolves a caller's (`refs`: the section validated).
fn throttle_index(section: &Throttling, refs: &ThrottleRefs<'_>) -> ThrottleIndex {
    let mut index = ThrottleIndex {
        users: refs
            .app_users
            .iter()
            .map(|&(app, user)| (app, user.into()))
            .collect(),
        ..ThrottleIndex::default()
    };
    for (policy, specials) in section.policies.iter().zip(&refs.specials) {
        let mut limits = PolicyLimits {
            app_limit: policy.app_call_limits,
            user_limit: policy.user_call_limits,
            ..PolicyLimits::default()
        };
        for special in specials {
            match *special {
                SpecialRef::App { app, limit } => {
                    limits.apps.insert(app, limit);
                }
                SpecialRef::User { user, limit } => {
                    limits.users.insert(user.into(), limit);
                }
            }
        }
        index.policies.insert(policy.id.as_str().into(), limits);
    }
    index
}

/// A delta's new throttling `section` (the old one `old`) applied to `next`: checked by
/// `validate::validate_throttling`, the one implementation of its rules, with apps and APIs
/// found by id in `next`'s tables (`None` where a rule is broken: the full path words the
/// refusal). Only the APIs bound, before or after, to a policy the delta adds, removes or
/// changes (every bound API when apps' tenants change) lose their throttle here and, bound
/// now, get a new one at bind from their group's buyers then ([`FreshThrottle`]); the
/// others keep theirs. The index callers' limits are resolved from is rebuilt (small).
fn rethrottle(
    next: &mut CompiledSnapshot,
    old: &Throttling,
    section: &Throttling,
    fresh: &mut Vec<FreshThrottle>,
) -> Option<()> {
    let api_ids: HashMap<&str, (usize, usize)> = next
        .groups
        .iter()
        .enumerate()
        .flat_map(|(gi, group)| {
            group
                .apis
                .iter()
                .enumerate()
                .map(move |(ai, api)| (&*api.id, (gi, ai)))
        })
        .collect();
    let refs = validate_throttling(
        section,
        |id| next.app_by_id(id).map(|app| app.index as u32),
        |id| api_ids.get(id).copied(),
    )
    .ok()?;
    let users_changed = old.app_users != section.app_users;
    let kept = |policy: &ThrottlePolicy, other: &Throttling| {
        !users_changed && other.policies.iter().any(|p| p == policy)
    };
    let mut rebuilt: HashMap<(usize, usize), Option<&ThrottlePolicy>> = HashMap::new();
    for policy in old.policies.iter().filter(|p| !kept(p, section)) {
        for api in &policy.api_ids {
            if let Some(&at) = api_ids.get(api.as_str()) {
                rebuilt.insert(at, None);
            }
        }
    }
    for (policy, apis) in section.policies.iter().zip(&refs.policies) {
        if !kept(policy, old) {
            for &at in apis {
                rebuilt.insert(at, Some(policy));
            }
        }
    }
    let index = Arc::new(throttle_index(section, &refs));
    drop(api_ids);
    let mut rebuilt: Vec<_> = rebuilt.into_iter().collect();
    rebuilt.sort_unstable_by_key(|&(at, _)| at);
    for ((gi, ai), policy) in rebuilt {
        let api = Arc::make_mut(&mut next.groups.get_mut(gi)?.apis).get_mut(ai)?;
        api.throttle = None;
        if let Some(policy) = policy {
            fresh.push(FreshThrottle {
                group: gi,
                api: ai,
                rule: Arc::new(policy_rule(policy)),
                scope: throttle_scope(policy, &api.id),
            });
        }
    }
    next.throttling = index;
    Some(())
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
