//! The compiled snapshot: everything the hot path needs, indexed, built once per push.
//!
//! Owns the translation of a validated wire [`Snapshot`] into lookup tables: host → group,
//! one [`Router`] per group, app key → app, app code → app, app → purchase, each purchase's
//! quota cell (an `Arc` into the registry, so counters survive swaps), each group's metric
//! handles and the TLS certificates by server name. It does not validate (call
//! [`super::validate::validate`] first), swap or persist.

use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::{DefaultHashBuilder, HashMap, HashSet, HashTable};

use rustls::sign::CertifiedKey;

use super::validate::{parse_template, Segment, MAX_APP_CODES};
use super::wire::{App, Backend, Certificate, MarketState, PurchaseState, Snapshot};
use crate::gateway::certificate::not_after;
use crate::gateway::metrics::{GatewayMetrics, GroupCounters};
use crate::gateway::quota::{QuotaCell, QuotaRegistry, UNLIMITED};
use crate::gateway::route::Router;

/// Which of a group's domains a host named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainKind {
    /// The market `url_domain`: sellable APIs, purchases and quota.
    Market,
    /// The seller's `sl_domain`: every published API, app authorizations, no quota.
    Seller,
}

#[derive(Debug)]
pub struct CompiledGroup {
    /// Position in [`CompiledSnapshot::groups`].
    pub index: usize,
    pub id: Box<str>,
    pub state: MarketState,
    pub router: Router,
    pub apis: Vec<CompiledApi>,
    pub counters: GroupCounters,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKind {
    App,
    None,
    /// IAM or AUTHORIZER: not served by this gateway.
    Unsupported,
}

/// A piece of a backend path template.
#[derive(Debug, Clone)]
pub enum PathPiece {
    Literal(Box<str>),
    /// Index into the route's captured parameters.
    Param(usize),
}

#[derive(Debug)]
pub enum CompiledBackend {
    Http {
        /// `host:port`.
        authority: http::uri::Authority,
        /// `None` passes the buyer's method through (`ANY`).
        method: Option<http::Method>,
        path: Vec<PathPiece>,
        /// The template ended with `/` (kept when filling it).
        trailing_slash: bool,
        timeout: std::time::Duration,
    },
    Mock {
        status: http::StatusCode,
        body: bytes::Bytes,
    },
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
    /// them against [`MAX_CREDENTIAL_BYTES`](super::validate::MAX_CREDENTIAL_BYTES)).
    fn new(index: usize, app: &App, purchase: Option<CompiledPurchase>) -> CompiledApp {
        let parts = [&app.app_key, &app.app_secret]
            .into_iter()
            .chain(&app.app_codes);
        let mut credentials = String::with_capacity(parts.clone().map(|part| part.len()).sum());
        let mut ends = [0; 2 + MAX_APP_CODES];
        for (end, part) in ends.iter_mut().zip(parts) {
            credentials.push_str(part);
            *end = u16::try_from(credentials.len()).expect("validated credential lengths");
        }
        CompiledApp {
            index,
            purchase,
            credentials: credentials.into_boxed_str(),
            ends,
            codes: app.app_codes.len() as u8,
        }
    }

    fn part(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.credentials[usize::from(start)..usize::from(self.ends[i])]
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

#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("the certificate PEM holds no certificate")]
    NoCertificate,
    #[error("the key PEM holds no private key")]
    NoKey,
    #[error("PEM does not parse")]
    Pem(#[source] std::io::Error),
    #[error("the key is of an unsupported type")]
    Key(#[source] rustls::Error),
}

/// Parses a certificate chain and key into what rustls serves.
pub fn certified_key(cert: &Certificate) -> Result<CertifiedKey, CertificateError> {
    certified_key_pem(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes())
}

/// Parses PEM bytes (a chain and a private key) into what rustls serves.
pub fn certified_key_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<CertifiedKey, CertificateError> {
    let chain = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(CertificateError::Pem)?;
    if chain.is_empty() {
        return Err(CertificateError::NoCertificate);
    }
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(CertificateError::Pem)?
        .ok_or(CertificateError::NoKey)?;
    let signing_key =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(CertificateError::Key)?;
    Ok(CertifiedKey::new(chain, signing_key))
}

fn backend_path(template: &[Segment], route: &[Segment]) -> Vec<PathPiece> {
    let params: Vec<&str> = route
        .iter()
        .filter_map(|s| match s {
            Segment::Param(n) | Segment::Greedy(n) => Some(n.as_str()),
            Segment::Literal(_) => None,
        })
        .collect();
    let mut pieces = Vec::new();
    for segment in template {
        match segment {
            Segment::Literal(l) => pieces.push(PathPiece::Literal(format!("/{l}").into())),
            Segment::Param(n) | Segment::Greedy(n) => {
                pieces.push(PathPiece::Literal("/".into()));
                let index = params
                    .iter()
                    .position(|p| p == n)
                    .expect("validated: backend parameters exist in the route");
                pieces.push(PathPiece::Param(index));
            }
        }
    }
    pieces
}

/// Compiles a validated snapshot. Cells are taken from (or created in) `quota`.
pub fn compile(
    snapshot: &Snapshot,
    quota: &QuotaRegistry,
    metrics: &GatewayMetrics,
) -> CompiledSnapshot {
    let mut hosts = HashMap::new();
    let mut groups = Vec::with_capacity(snapshot.groups.len());
    let mut group_index = HashMap::new();
    let mut api_index = HashMap::new();
    let app_index: HashMap<&str, usize> = snapshot
        .apps
        .iter()
        .enumerate()
        .map(|(i, a)| (a.id.as_str(), i))
        .collect();
    for (gi, group) in snapshot.groups.iter().enumerate() {
        group_index.insert(group.id.as_str(), gi);
        hosts.insert(group.sl_domain.as_str().into(), (gi, DomainKind::Seller));
        if let Some(url_domain) = &group.url_domain {
            hosts.insert(url_domain.as_str().into(), (gi, DomainKind::Market));
        }
        let mut router = Router::default();
        let mut apis = Vec::with_capacity(group.apis.len());
        for (ai, api) in group.apis.iter().enumerate() {
            api_index.insert(api.id.as_str(), (gi, ai));
            let template = parse_template(&api.req_uri).expect("validated req_uri");
            router.insert(&api.req_method, &template, api.match_mode == "SWA", ai);
            let backend = match &api.backend {
                Backend::Http {
                    req_method,
                    req_uri,
                    url_domain,
                    timeout_ms,
                    ..
                } => CompiledBackend::Http {
                    authority: url_domain.parse().expect("validated url_domain"),
                    method: (req_method != "ANY").then(|| {
                        http::Method::from_bytes(req_method.as_bytes()).expect("validated method")
                    }),
                    path: backend_path(
                        &parse_template(req_uri).expect("validated backend req_uri"),
                        &template,
                    ),
                    trailing_slash: req_uri.len() > 1 && req_uri.ends_with('/'),
                    timeout: std::time::Duration::from_millis(*timeout_ms),
                },
                Backend::Mock { status, body } => CompiledBackend::Mock {
                    status: http::StatusCode::from_u16(*status).expect("validated status"),
                    body: bytes::Bytes::from(body.clone()),
                },
            };
            apis.push(CompiledApi {
                id: api.id.as_str().into(),
                name: api.name.as_str().into(),
                sellable: api.is_sellable(),
                auth: match api.auth_type.as_str() {
                    "APP" => AuthKind::App,
                    "NONE" => AuthKind::None,
                    _ => AuthKind::Unsupported,
                },
                app_code_auth: api.app_code_auth,
                https_only: api.req_protocol == "HTTPS",
                http_only: api.req_protocol == "HTTP",
                backend,
                authorized_apps: HashSet::new(),
            });
        }
        groups.push(CompiledGroup {
            index: gi,
            id: group.id.as_str().into(),
            state: group.market_state,
            router,
            apis,
            counters: metrics.group(&group.id),
        });
    }
    for auth in &snapshot.app_auths {
        if let (Some(&(gi, ai)), Some(&app)) = (
            api_index.get(auth.api_id.as_str()),
            app_index.get(auth.app_id.as_str()),
        ) {
            groups[gi].apis[ai].authorized_apps.insert(app);
        }
    }
    // Each app's purchase, by the app's position (validated: at most one per app).
    let mut purchase_of: Vec<Option<CompiledPurchase>> = std::iter::repeat_with(|| None)
        .take(snapshot.apps.len())
        .collect();
    for purchase in &snapshot.purchases {
        let cell = quota.cell(
            &purchase.id,
            purchase.quota_limit.unwrap_or(UNLIMITED),
            purchase.quota_used,
        );
        purchase_of[app_index[purchase.app_id.as_str()]] = Some(CompiledPurchase {
            group: group_index[purchase.group_id.as_str()],
            state: purchase.state,
            start_time: purchase.start_time,
            expire_time: purchase.expire_time,
            cell,
        });
    }
    let hasher = DefaultHashBuilder::default();
    let apps: Vec<CompiledApp> = snapshot
        .apps
        .iter()
        .zip(purchase_of)
        .enumerate()
        .map(|(i, (app, purchase))| CompiledApp::new(i, app, purchase))
        .collect();
    let hash = |text: &str| hasher.hash_one(text);
    let code_count = apps.iter().map(|app| usize::from(app.codes)).sum();
    let mut apps_by_key = HashTable::with_capacity(apps.len());
    let mut apps_by_code = HashTable::with_capacity(code_count);
    for app in &apps {
        let index = u32::try_from(app.index).expect("fewer than 2^32 apps");
        apps_by_key.insert_unique(hash(app.key()), index, |&i| hash(apps[i as usize].key()));
        for (nth, code) in app.codes().enumerate() {
            apps_by_code.insert_unique(hash(code), (index, nth as u8), |&(i, nth)| {
                hash(apps[i as usize].code(usize::from(nth)))
            });
        }
    }
    let mut certificates = HashMap::new();
    let mut expiries = Vec::new();
    for cert in &snapshot.certificates {
        if let Ok(key) = certified_key(cert) {
            let not_after = key.cert.first().and_then(|der| not_after(der));
            let key = Arc::new(key);
            for domain in &cert.domains {
                certificates.insert(domain.as_str().into(), key.clone());
                if let Some(not_after) = not_after {
                    expiries.push((domain.as_str(), not_after));
                }
            }
        }
    }
    metrics.set_certificate_expiries(expiries);
    CompiledSnapshot {
        version: snapshot.version,
        hosts,
        groups,
        apps,
        apps_by_key,
        apps_by_code,
        hasher,
        certificates,
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
        super::super::validate::validate(&snapshot).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let quota = QuotaRegistry::open(dir.path(), 8).unwrap();
        let compiled = compile(&snapshot, &quota, &GatewayMetrics::new());
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
