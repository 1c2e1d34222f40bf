//! Property tests (proptest) of what a hostile or buggy control plane can send a proxy: route
//! templates, whole snapshots and deltas. Arbitrary input never panics — not in the
//! template parser, the router, validation, compile or a delta's apply — and valid input
//! round-trips: a rendered template parses back to its segments, a valid snapshot survives
//! JSON and compiles, and a delta computed between two snapshots rebuilds the second.

use proptest::collection::vec;
use proptest::prelude::*;

use super::compile::{apply_delta, compile, prepare, CompiledSnapshot};
use super::delta::{apply, diff, Delta};
use super::validate::validate;
use super::wire::{
    Api, App, AppAuth, AppUser, Backend, Certificate, Domain, Group, MarketState, MinTlsVersion,
    Purchase, PurchaseState, Snapshot, SpecialKind, ThrottlePolicy, ThrottleSpecial, Throttling,
    TimeUnit,
};
use crate::gateway::metrics::GatewayMetrics;
use crate::gateway::quota::QuotaRegistry;
use crate::gateway::route::Router;
use crate::template::{parse_template, Segment};

/// Cases per property: enough to find the seams, few enough for a debug build on 2 cores.
const CASES: u32 = 128;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Bytes a template or path is made of, weighted to the grammar's special characters.
fn template_text() -> impl Strategy<Value = String> {
    vec(
        prop_oneof![
            Just('/'),
            Just('{'),
            Just('}'),
            Just('+'),
            Just(' '),
            Just('?'),
            Just('%'),
            Just('é'),
            proptest::char::range('a', 'e'),
        ],
        0..24,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

/// A valid template's segments: distinct parameter names, `{name+}` only last.
fn segments() -> impl Strategy<Value = Vec<Segment>> {
    (
        vec(
            prop_oneof![
                "[a-z0-9._~-]{1,6}".prop_map(Segment::Literal),
                "[a-z]{1,4}".prop_map(Segment::Param),
            ],
            0..6,
        ),
        proptest::option::of("[a-z]{1,4}"),
    )
        .prop_map(|(mut segments, greedy)| {
            segments.extend(greedy.map(Segment::Greedy));
            // Parameter names made unique by their position.
            for (i, segment) in segments.iter_mut().enumerate() {
                if let Segment::Param(name) | Segment::Greedy(name) = segment {
                    name.push_str(&i.to_string());
                }
            }
            segments
        })
}

fn render(segments: &[Segment]) -> String {
    if segments.is_empty() {
        return "/".into();
    }
    segments
        .iter()
        .map(|segment| match segment {
            Segment::Literal(l) => format!("/{l}"),
            Segment::Param(n) => format!("/{{{n}}}"),
            Segment::Greedy(n) => format!("/{{{n}+}}"),
        })
        .collect()
}

/// Ids drawn from a small pool, so that duplicates and dangling references happen.
fn id() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[a-c]{1,2}"]
}

fn api() -> impl Strategy<Value = Api> {
    (
        id(),
        prop_oneof![Just(1u8), Just(2), any::<u8>()],
        prop_oneof![Just("HTTP"), Just("HTTPS"), Just("BOTH"), Just("FTP")],
        prop_oneof![Just("GET"), Just("ANY"), Just("POST"), Just("get")],
        prop_oneof![segments().prop_map(|s| render(&s)), template_text()],
        prop_oneof![Just("NORMAL"), Just("SWA"), Just("x")],
        prop_oneof![Just("APP"), Just("NONE"), Just("IAM"), Just("?")],
        any::<bool>(),
        backend(),
    )
        .prop_map(
            |(id, api_type, protocol, method, req_uri, mode, auth, code, backend)| Api {
                id,
                name: "api".into(),
                api_type,
                req_protocol: protocol.into(),
                req_method: method.into(),
                req_uri,
                match_mode: mode.into(),
                auth_type: auth.into(),
                app_code_auth: code,
                backend,
            },
        )
}

fn backend() -> impl Strategy<Value = Backend> {
    prop_oneof![
        (
            prop_oneof![Just("HTTP"), Just("HTTPS")],
            prop_oneof![Just("GET"), Just("ANY"), Just("BREW")],
            prop_oneof![segments().prop_map(|s| render(&s)), template_text()],
            prop_oneof![
                Just("127.0.0.1:8080".to_owned()),
                Just("a@b:1".to_owned()),
                "[a-z:0-9/]{0,12}"
            ],
            prop_oneof![Just(1_000u64), any::<u64>()],
        )
            .prop_map(|(p, m, uri, domain, timeout)| Backend::Http {
                req_protocol: p.into(),
                req_method: m.into(),
                req_uri: uri,
                url_domain: domain,
                timeout_ms: timeout,
            }),
        (any::<u16>(), ".{0,8}").prop_map(|(status, body)| Backend::Mock { status, body }),
    ]
}

fn group() -> impl Strategy<Value = Group> {
    (
        id(),
        prop_oneof!["[a-c]{1,2}\\.sl", Just("Bad_Domain".to_owned())],
        proptest::option::of("[a-c]{1,2}\\.market"),
        prop_oneof![
            Just(MarketState::OnSale),
            Just(MarketState::Delisted),
            Just(MarketState::Unlisted)
        ],
        vec(api(), 0..4),
    )
        .prop_map(|(id, sl, url, state, apis)| Group {
            id,
            name: "group".into(),
            sl_domain: sl,
            url_domain: url,
            market_state: state,
            apis,
        })
}

fn app() -> impl Strategy<Value = App> {
    (
        id(),
        prop_oneof![id(), ".{0,4}"],
        prop_oneof![Just("s".to_owned()), Just(String::new()), "é{0,700}"],
        vec(id(), 0..7),
        prop_oneof![Just("USER"), Just("MARKET"), Just("ROOT")],
    )
        .prop_map(|(id, key, secret, codes, creator)| App {
            id,
            app_key: key,
            app_secret: secret,
            app_codes: codes,
            creator: creator.into(),
        })
}

fn purchase() -> impl Strategy<Value = Purchase> {
    (
        id(),
        id(),
        id(),
        prop_oneof![Just(PurchaseState::Active), Just(PurchaseState::Frozen)],
        any::<i64>(),
        any::<i64>(),
        proptest::option::of(any::<u64>()),
        any::<u64>(),
    )
        .prop_map(
            |(id, group_id, app_id, state, start, expire, limit, used)| Purchase {
                id,
                group_id,
                app_id,
                state,
                start_time: start.min(expire),
                expire_time: if start % 7 == 0 { start } else { expire },
                quota_limit: limit,
                quota_used: used,
            },
        )
}

/// Any snapshot (mostly invalid: pools of ids collide, references dangle).
fn snapshot() -> impl Strategy<Value = Snapshot> {
    (
        0u64..4,
        vec(group(), 0..4),
        vec(app(), 0..5),
        vec(purchase(), 0..5),
        vec((id(), id()), 0..3),
    )
        .prop_map(|(version, groups, apps, purchases, auths)| Snapshot {
            version,
            generated_at: None,
            groups,
            apps,
            purchases,
            app_auths: auths
                .into_iter()
                .map(|(app_id, api_id)| AppAuth { app_id, api_id })
                .collect(),
            certificates: Vec::new(),
            domains: Vec::new(),
            throttling: Default::default(),
        })
}

/// How [`valid_snapshot`] throttles its market: which groups' HTTP APIs one policy is bound
/// to (a bit each), whether it counts them together, whether it limits apps and tenants,
/// which app has an exception, which apps call as which tenant.
type ThrottleChoice = (u8, bool, bool, bool, Option<u8>, u8);

/// Bit `i` of `mask`; none past its eighth (a market may have more groups or apps than bits).
fn bit(mask: u8, i: usize) -> bool {
    i < 8 && mask & (1 << i) != 0
}

/// A valid throttling section for `groups` and `apps`, or none (`choice` is `None`).
fn throttling(groups: &[Group], apps: &[App], choice: Option<ThrottleChoice>) -> Throttling {
    let Some((bound, shared, app_limit, user_limit, special, users)) = choice else {
        return Throttling::default();
    };
    let mut specials = vec![ThrottleSpecial {
        object_type: SpecialKind::User,
        object_id: "tenant-1".into(),
        call_limits: 7,
    }];
    if let (Some(pick), false) = (special, apps.is_empty()) {
        specials.push(ThrottleSpecial {
            object_type: SpecialKind::App,
            object_id: apps[usize::from(pick) % apps.len()].id.clone(),
            call_limits: 3,
        });
    }
    Throttling {
        policies: vec![ThrottlePolicy {
            id: "policy".into(),
            name: "policy".into(),
            api_call_limits: 1_000,
            user_call_limits: user_limit.then_some(500),
            app_call_limits: app_limit.then_some(100),
            ip_call_limits: None,
            time_interval: 1,
            time_unit: TimeUnit::Minute,
            shared,
            api_ids: groups
                .iter()
                .enumerate()
                .filter(|&(g, _)| bit(bound, g))
                .map(|(_, group)| group.apis[0].id.clone())
                .collect(),
            specials,
        }],
        app_users: apps
            .iter()
            .enumerate()
            .filter(|&(a, _)| bit(users, a))
            .map(|(a, app)| AppUser {
                app_id: app.id.clone(),
                user: format!("tenant-{}", a % 2),
            })
            .collect(),
    }
}

/// A valid market by construction: unique ids, domains and keys, purchases of existing
/// groups by apps of their own, backend parameters taken from the route; half of them with
/// a throttling policy bound to some of its APIs.
fn valid_snapshot() -> impl Strategy<Value = Snapshot> {
    (
        1u64..1_000,
        vec((segments(), any::<bool>(), 100u16..600), 1..4),
        0usize..6,
        vec(any::<(bool, u16, Option<u32>)>(), 0..6),
        proptest::option::of(any::<ThrottleChoice>()),
    )
        .prop_map(|(version, apis, apps, purchases, throttle)| {
            let groups = apis
                .into_iter()
                .enumerate()
                .map(|(g, (route, swa, status))| {
                    let backend_uri = render(
                        &route
                            .iter()
                            .filter(|s| !matches!(s, Segment::Literal(_)))
                            .cloned()
                            .collect::<Vec<_>>(),
                    );
                    Group {
                        id: format!("g{g}"),
                        name: format!("group {g}"),
                        sl_domain: format!("g{g}.sl.test"),
                        url_domain: Some(format!("g{g}.market.test")),
                        market_state: MarketState::OnSale,
                        apis: vec![
                            Api {
                                id: format!("g{g}-http"),
                                name: "http".into(),
                                api_type: 1,
                                req_protocol: "BOTH".into(),
                                req_method: "GET".into(),
                                req_uri: render(&route),
                                match_mode: if swa { "SWA" } else { "NORMAL" }.into(),
                                auth_type: "APP".into(),
                                app_code_auth: swa,
                                backend: Backend::Http {
                                    req_protocol: "HTTP".into(),
                                    req_method: "ANY".into(),
                                    req_uri: backend_uri,
                                    url_domain: "127.0.0.1:9".into(),
                                    timeout_ms: 5_000,
                                },
                            },
                            Api {
                                id: format!("g{g}-mock"),
                                name: "mock".into(),
                                api_type: 2,
                                req_protocol: "HTTP".into(),
                                req_method: "POST".into(),
                                req_uri: "/mock".into(),
                                match_mode: "NORMAL".into(),
                                auth_type: "NONE".into(),
                                app_code_auth: false,
                                backend: Backend::Mock {
                                    status,
                                    body: "ok".into(),
                                },
                            },
                        ],
                    }
                })
                .collect::<Vec<_>>();
            let apps: Vec<App> = (0..apps)
                .map(|a| App {
                    id: format!("a{a}"),
                    app_key: format!("key-{a}"),
                    app_secret: format!("secret-{a}"),
                    app_codes: (0..a % 3).map(|c| format!("code-{a}-{c}")).collect(),
                    creator: "MARKET".into(),
                })
                .collect();
            let purchases = purchases
                .into_iter()
                .zip(&apps)
                .enumerate()
                .map(|(p, ((frozen, group, limit), app))| Purchase {
                    id: format!("p{p}"),
                    group_id: format!("g{}", usize::from(group) % groups.len()),
                    app_id: app.id.clone(),
                    state: if frozen {
                        PurchaseState::Frozen
                    } else {
                        PurchaseState::Active
                    },
                    start_time: 0,
                    expire_time: 4_102_444_800,
                    quota_limit: limit.map(u64::from),
                    quota_used: 0,
                })
                .collect();
            // Every third app is authorized for one group's HTTP API (a caller of it
            // whether or not it buys from that group).
            let app_auths = apps
                .iter()
                .enumerate()
                .filter(|(a, _)| a % 3 == 1)
                .map(|(a, app)| AppAuth {
                    app_id: app.id.clone(),
                    api_id: groups[a % groups.len()].apis[0].id.clone(),
                })
                .collect();
            Snapshot {
                version,
                generated_at: None,
                throttling: throttling(&groups, &apps, throttle),
                groups,
                apps,
                purchases,
                app_auths,
                certificates: Vec::new(),
                domains: Vec::new(),
            }
        })
}

/// Entities of `snapshot` by id, in id order: what a delta must reproduce, whatever order.
fn by_id(snapshot: &Snapshot) -> (Vec<&Group>, Vec<&App>, Vec<&Purchase>) {
    let mut groups: Vec<&Group> = snapshot.groups.iter().collect();
    groups.sort_by(|a, b| a.id.cmp(&b.id));
    let mut apps: Vec<&App> = snapshot.apps.iter().collect();
    apps.sort_by(|a, b| a.id.cmp(&b.id));
    let mut purchases: Vec<&Purchase> = snapshot.purchases.iter().collect();
    purchases.sort_by(|a, b| a.id.cmp(&b.id));
    (groups, apps, purchases)
}

/// A certificate and key (PEM), made once (key generation is slow for a property's cases).
fn certificate_pem() -> &'static (String, String) {
    static PEM: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    PEM.get_or_init(|| {
        let params = rcgen::CertificateParams::new(vec!["cert.test".to_owned()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    })
}

/// An API no other has the route or id of (`n` tells them apart), answered by a mock.
fn new_api(id: String, n: usize) -> Api {
    Api {
        id,
        name: "new".into(),
        api_type: 1,
        req_protocol: "BOTH".into(),
        req_method: "GET".into(),
        req_uri: format!("/new{n}"),
        match_mode: "NORMAL".into(),
        auth_type: "APP".into(),
        app_code_auth: false,
        backend: Backend::Mock {
            status: 200,
            body: "new".into(),
        },
    }
}

/// A market and what buyers' and sellers' changes make of it a version later. Buyers:
/// purchases frozen or given another limit, purchases removed with their apps, apps given
/// a new secret, new buyers (an app and its purchase), a purchase moved to another group
/// (in a throttled market: callers of its APIs change). Sellers: a group delisted or
/// renamed, onsold to a new market domain or given a new debug domain, an API added, a
/// (maybe throttled) API moved to another group, a new group, a group removed with its
/// purchases, authorizations and bound domains, an app authorized or unauthorized, a
/// domain bound, the certificates replaced.
fn market_and_change() -> impl Strategy<Value = (Snapshot, Snapshot)> {
    market_and_change_of(0..18)
}

/// [`market_and_change`] with only the changes of `kinds` (0..9: no API or group added,
/// moved or removed).
fn market_and_change_of(kinds: std::ops::Range<u8>) -> impl Strategy<Value = (Snapshot, Snapshot)> {
    (valid_snapshot(), vec((kinds, any::<u16>()), 0..8)).prop_map(|(old, edits)| {
        let mut new = old.clone();
        new.version = old.version + 1;
        for (n, (kind, pick)) in edits.into_iter().enumerate() {
            let pick = usize::from(pick);
            let purchases = new.purchases.len().max(1);
            let apps = new.apps.len().max(1);
            let groups = new.groups.len().max(1);
            match kind {
                0 => {
                    if let Some(p) = new.purchases.get_mut(pick % purchases) {
                        p.state = match p.state {
                            PurchaseState::Frozen => PurchaseState::Active,
                            _ => PurchaseState::Frozen,
                        };
                    }
                }
                1 => {
                    if let Some(p) = new.purchases.get_mut(pick % purchases) {
                        p.quota_limit = Some(pick as u64);
                    }
                }
                2 => {
                    if pick % purchases < new.purchases.len() {
                        // The app goes too unless an authorization or the throttling section
                        // names it.
                        let gone = new.purchases.remove(pick % purchases);
                        let quoted = format!("\"{}\"", gone.app_id);
                        let named = serde_json::to_string(&new.throttling)
                            .unwrap()
                            .contains(&quoted)
                            || new.app_auths.iter().any(|auth| auth.app_id == gone.app_id);
                        if !named {
                            new.apps.retain(|a| a.id != gone.app_id);
                        }
                    }
                }
                3 => {
                    if let Some(a) = new.apps.get_mut(pick % apps) {
                        a.app_secret = format!("secret-{n}-new");
                        a.app_codes.push(format!("code-new-{n}"));
                    }
                }
                4 => {
                    let group = new.groups[pick % groups].id.clone();
                    new.apps.push(App {
                        id: format!("n{n}"),
                        app_key: format!("key-new-{n}"),
                        app_secret: format!("secret-new-{n}"),
                        app_codes: vec![format!("code-buyer-{n}")],
                        creator: "MARKET".into(),
                    });
                    new.purchases.push(Purchase {
                        id: format!("np{n}"),
                        group_id: group,
                        app_id: format!("n{n}"),
                        state: PurchaseState::Active,
                        start_time: 0,
                        expire_time: 4_102_444_800,
                        quota_limit: Some(n as u64),
                        quota_used: 0,
                    });
                }
                5 => {
                    let g = &mut new.groups[pick % groups];
                    g.market_state = MarketState::Delisted;
                }
                6 => {
                    let g = &mut new.groups[pick % groups];
                    g.name = format!("renamed {n}");
                }
                7 => {
                    // A buyer moves to another group.
                    let group = new.groups[pick % groups].id.clone();
                    if let Some(p) = new.purchases.get_mut(pick % purchases) {
                        p.group_id = group;
                    }
                }
                8 => {
                    let g = &mut new.groups[pick % groups];
                    g.url_domain = Some(format!("n{n}.market.test"));
                }
                9 => {
                    let g = &mut new.groups[pick % groups];
                    g.apis.push(new_api(format!("new-api-{n}"), n));
                }
                10 => {
                    if let Some(app) = new.apps.get(pick % apps) {
                        let apis: Vec<&Api> = new.groups.iter().flat_map(|g| &g.apis).collect();
                        let api_id = apis[pick % apis.len()].id.clone();
                        new.app_auths.push(AppAuth {
                            app_id: app.id.clone(),
                            api_id,
                        });
                    }
                }
                11 => {
                    let group_id = new.groups[pick % groups].id.clone();
                    new.domains.push(Domain {
                        domain: format!("bound{n}.test"),
                        group_id,
                        min_tls_version: MinTlsVersion::Tls12,
                        https_redirect: pick % 2 == 0,
                    });
                }
                12 => {
                    new.groups.push(Group {
                        id: format!("ng{n}"),
                        name: format!("new group {n}"),
                        sl_domain: format!("ng{n}.sl.test"),
                        url_domain: (pick % 2 == 0).then(|| format!("ng{n}.market.test")),
                        market_state: MarketState::OnSale,
                        apis: vec![new_api(format!("ng{n}-api"), n)],
                    });
                }
                13 => {
                    // A group removed with what names it (but not if throttled: the
                    // throttling section would have to change too), the last one kept.
                    let gone = new.groups[pick % groups].clone();
                    let bound = |api: &Api| {
                        new.throttling
                            .policies
                            .iter()
                            .any(|policy| policy.api_ids.contains(&api.id))
                    };
                    if groups > 1 && !gone.apis.iter().any(bound) {
                        new.groups.retain(|g| g.id != gone.id);
                        new.purchases.retain(|p| p.group_id != gone.id);
                        new.domains.retain(|d| d.group_id != gone.id);
                        new.app_auths
                            .retain(|auth| !gone.apis.iter().any(|api| api.id == auth.api_id));
                    }
                }
                14 => {
                    let (cert_pem, key_pem) = certificate_pem().clone();
                    new.certificates = vec![Certificate {
                        domains: vec![format!("cert{n}.test"), format!("n{n}.market.test")],
                        cert_pem,
                        key_pem,
                    }];
                }
                15 => {
                    let g = &mut new.groups[pick % groups];
                    g.sl_domain = format!("n{n}.sl.test");
                }
                16 => {
                    if !new.app_auths.is_empty() {
                        let at = pick % new.app_auths.len();
                        new.app_auths.remove(at);
                    }
                }
                _ => {
                    // An API (throttled or not) moves to another group, a route of its own.
                    let from = pick % groups;
                    let to = (pick / 7) % groups;
                    if from != to && !new.groups[from].apis.is_empty() {
                        let mut api = new.groups[from].apis.remove(0);
                        let kept = new_api(api.id.clone(), n);
                        (api.req_uri, api.backend) = (kept.req_uri, kept.backend);
                        new.groups[to].apis.push(api);
                    }
                }
            }
        }
        (old, new)
    })
}

/// A market and a change of it as [`market_and_change`] makes (but for APIs and groups
/// added, moved or removed: a delta with those and a new throttling section goes to the full
/// path), plus sellers' changes of its throttling section: a policy's limits, an API bound
/// or unbound, an app's exception, a second policy, an app's tenant, every policy dropped
/// (or one bound everywhere).
fn market_and_throttling_change() -> impl Strategy<Value = (Snapshot, Snapshot)> {
    (
        market_and_change_of(0..9),
        vec((0u8..6, any::<u16>()), 1..4),
    )
        .prop_map(|((old, mut new), edits)| {
            for (n, (kind, pick)) in edits.into_iter().enumerate() {
                change_throttling(&mut new, kind, usize::from(pick), n as u64);
            }
            (old, new)
        })
}

/// One seller's change of `market`'s throttling section (`kind` 0 to 5), kept valid.
fn change_throttling(market: &mut Snapshot, kind: u8, pick: usize, n: u64) {
    let groups = &market.groups;
    let group = &groups[pick % groups.len()];
    let (http, mock) = (group.apis[0].id.clone(), group.apis[1].id.clone());
    let app = (!market.apps.is_empty()).then(|| market.apps[pick % market.apps.len()].id.clone());
    let section = &mut market.throttling;
    let bound = |section: &Throttling, api: &str| {
        section
            .policies
            .iter()
            .any(|p| p.api_ids.iter().any(|a| a == api))
    };
    match kind {
        0 => {
            if let Some(policy) = section.policies.first_mut() {
                policy.api_call_limits = 900 + n;
                policy.app_call_limits = match policy.app_call_limits {
                    Some(_) if pick % 2 == 0 => None,
                    _ => Some(50 + n),
                };
            }
        }
        1 => {
            let is_bound = bound(section, &http);
            if let Some(policy) = section.policies.first_mut() {
                if is_bound {
                    policy.api_ids.retain(|a| *a != http);
                } else {
                    policy.api_ids.push(http);
                }
            }
        }
        2 => {
            if let (Some(policy), Some(app)) = (section.policies.first_mut(), app) {
                let before = policy.specials.len();
                policy.specials.retain(|s| s.object_id != app);
                if policy.specials.len() == before {
                    policy.specials.push(ThrottleSpecial {
                        object_type: SpecialKind::App,
                        object_id: app,
                        call_limits: 2,
                    });
                }
            }
        }
        3 => {
            if let Some(at) = section.policies.iter().position(|p| p.id == "second") {
                section.policies.remove(at);
            } else if !bound(section, &mock) {
                section.policies.push(ThrottlePolicy {
                    id: "second".into(),
                    name: "second".into(),
                    api_call_limits: 40,
                    user_call_limits: None,
                    app_call_limits: Some(20),
                    ip_call_limits: None,
                    time_interval: 1,
                    time_unit: TimeUnit::Second,
                    shared: false,
                    api_ids: vec![mock],
                    specials: Vec::new(),
                });
            }
        }
        4 => {
            if let Some(app) = app {
                let before = section.app_users.len();
                section.app_users.retain(|u| u.app_id != app);
                if section.app_users.len() == before {
                    section.app_users.push(AppUser {
                        app_id: app,
                        user: format!("tenant-{}", n % 2),
                    });
                }
            }
        }
        _ => {
            if section.policies.is_empty() {
                *section = throttling(
                    groups,
                    &market.apps,
                    Some((u8::MAX, true, true, true, None, 0)),
                );
            } else {
                section.policies.clear();
            }
        }
    }
}

/// What a request can see of a compiled snapshot, for the keys, codes, app ids and purchase
/// ids of `wires` (present or not): apps found and what they hold, each purchase's group,
/// state, times and (with `cells`) its cell's limit, the groups and the hosts that name them.
fn served_view(compiled: &CompiledSnapshot, wires: &[&Snapshot], cells: bool) -> Vec<String> {
    let app = |found: Option<&super::compile::CompiledApp>| match found {
        None => "none".to_owned(),
        Some(app) => {
            let purchase = app.purchase.as_ref().map(|p| {
                (
                    p.id().to_owned(),
                    compiled.groups[p.group].id.to_string(),
                    p.state,
                    p.start_time,
                    p.expire_time,
                    cells.then(|| p.cell.limit()),
                )
            });
            format!(
                "{} {} {:?} {:?} {:?}",
                app.id(),
                app.key(),
                app.secret(),
                app.codes().collect::<Vec<_>>(),
                purchase
            )
        }
    };
    let mut view = vec![format!(
        "version {} apps {}",
        compiled.version,
        compiled.apps().count()
    )];
    for wire in wires {
        for a in &wire.apps {
            view.push(format!(
                "key {}: {}",
                a.app_key,
                app(compiled.app_by_key(&a.app_key))
            ));
            view.push(format!("id {}: {}", a.id, app(compiled.app_by_id(&a.id))));
            for code in &a.app_codes {
                view.push(format!("code {code}: {}", app(compiled.app_by_code(code))));
            }
        }
        for p in &wire.purchases {
            view.push(format!(
                "purchase {}: {}",
                p.id,
                app(compiled.app_by_purchase(&p.id))
            ));
        }
    }
    let app_ids: std::collections::HashMap<u32, &str> = compiled
        .apps()
        .map(|app| (app.index as u32, app.id()))
        .collect();
    for g in &compiled.groups {
        let apis: Vec<&str> = g.apis.iter().map(|a| &*a.id).collect();
        view.push(format!(
            "group {} {} {} {:?} {apis:?}",
            g.index, g.id, g.name, g.state
        ));
        for api in g.apis.iter() {
            let mut authorized: Vec<Option<&&str>> = api
                .authorized_apps
                .iter()
                .map(|&app| app_ids.get(&(app as u32)))
                .collect();
            authorized.sort();
            view.push(format!(
                "api {} {} {} {} {:?} {} {} {} {:?} authorized {authorized:?}",
                g.id,
                api.id,
                api.name,
                api.sellable,
                api.auth,
                api.app_code_auth,
                api.https_only,
                api.http_only,
                api.backend,
            ));
            let Some(throttle) = &api.throttle else {
                continue;
            };
            let mut callers: Vec<String> = throttle
                .callers()
                .map(|(app, by_app, by_user)| {
                    format!("{:?} {by_app:?} {by_user:?}", app_ids.get(&app))
                })
                .collect();
            callers.sort();
            view.push(format!(
                "throttle {} {:?} {} {callers:?}",
                api.id,
                throttle.rule,
                throttle.scope()
            ));
        }
    }
    let mut hosts: Vec<String> = compiled
        .hosts
        .iter()
        .map(|(host, (gi, kind))| format!("host {host} {gi} {kind:?}"))
        .collect();
    hosts.sort();
    view.extend(hosts);
    for wire in wires {
        // Routes: each API's own path (its template's text) with each method, as found.
        for group in &wire.groups {
            for api in &group.apis {
                for method in [http::Method::GET, http::Method::POST] {
                    let found = compiled
                        .hosts
                        .get(group.sl_domain.as_str())
                        .map(|&(gi, _)| {
                            let g = &compiled.groups[gi];
                            let target = g.router.find(&method, &api.req_uri).map(|f| f.target);
                            (g.id.to_string(), target.map(|ai| g.apis[ai].id.to_string()))
                        });
                    view.push(format!(
                        "route {} {method} {}: {found:?}",
                        group.sl_domain, api.req_uri
                    ));
                }
            }
        }
    }
    let mut rules: Vec<String> = compiled
        .domain_rules
        .iter()
        .map(|(host, rules)| format!("rules {host} {rules:?}"))
        .collect();
    rules.sort();
    view.extend(rules);
    let mut certificates: Vec<String> = compiled
        .certificates
        .keys()
        .map(|name| format!("certificate {name}"))
        .collect();
    certificates.sort();
    view.extend(certificates);
    view.sort();
    view
}

/// Follows `markets` (each a later version of the one before) as a proxy does: each delta
/// applied to the compiled form of the one before when [`apply_delta`] takes it (else a full
/// compile), checked against a full compile of the rebuilt wire snapshot. Returns how many
/// were applied to the compiled form.
fn compiled_deltas_match_full_compiles(markets: &[Snapshot]) -> usize {
    let metrics = GatewayMetrics::new();
    let dir = tempfile::tempdir().unwrap();
    let quota = QuotaRegistry::open(dir.path(), 8).unwrap();
    let mut wire = markets[0].clone();
    let mut served = compile(&wire, &quota, &metrics).unwrap();
    let mut incremental = 0;
    for new in &markets[1..] {
        let delta = diff(&wire, new);
        let rebuilt = apply(&wire, delta.clone()).unwrap();
        served = match apply_delta(&served, &wire, &delta, &metrics) {
            Some(prepared) => {
                incremental += 1;
                prepared.bind(&quota, &metrics)
            }
            None => compile(&rebuilt, &quota, &metrics).unwrap(),
        };
        let other_dir = tempfile::tempdir().unwrap();
        let other_quota = QuotaRegistry::open(other_dir.path(), 8).unwrap();
        let full = compile(&rebuilt, &other_quota, &metrics).unwrap();
        assert_eq!(
            served_view(&served, &[&wire, &rebuilt], true),
            served_view(&full, &[&wire, &rebuilt], true),
            "{wire:?}\n{new:?}"
        );
        wire = rebuilt;
    }
    incremental
}

/// Applies the delta from `old` to `new` to `old`'s compiled form; if that was done (not
/// handed to a full compile), checks it serves what a full compile of the rebuilt wire
/// snapshot serves. Returns whether it was done.
fn compiled_delta_matches_full_compile(old: &Snapshot, new: &Snapshot) -> bool {
    let delta = diff(old, new);
    let metrics = GatewayMetrics::new();
    let dir = tempfile::tempdir().unwrap();
    let quota = QuotaRegistry::open(dir.path(), 8).unwrap();
    let base = compile(old, &quota, &metrics).unwrap();
    let Some(prepared) = apply_delta(&base, old, &delta, &metrics) else {
        return false;
    };
    let incremental = prepared.bind(&quota, &metrics);
    let rebuilt = apply(old, delta.clone()).unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let other_quota = QuotaRegistry::open(other_dir.path(), 8).unwrap();
    let full = compile(&rebuilt, &other_quota, &metrics).unwrap();
    assert_eq!(
        served_view(&incremental, &[old, &rebuilt], true),
        served_view(&full, &[old, &rebuilt], true),
        "{old:?}\n{new:?}"
    );
    // The base still serves what it served: nothing it shares was changed (but the quota
    // cells, which live outside snapshots and are meant to be shared by them).
    let again = compile(old, &other_quota, &metrics).unwrap();
    assert_eq!(
        served_view(&base, &[old], false),
        served_view(&again, &[old], false)
    );
    true
}

/// A seller's change to `market` that breaks a rule across entities (`kind` picks which):
/// a domain another group has, an API id another group has, an authorization of a missing
/// app, a domain bound to a missing group, a certificate that does not parse, a group
/// removed with its buyers.
fn break_a_rule(market: &Snapshot, kind: u8) -> Snapshot {
    let mut new = market.clone();
    new.version += 1;
    let last = new.groups.len() - 1;
    let any_api = new
        .groups
        .iter()
        .flat_map(|g| &g.apis)
        .next()
        .unwrap()
        .id
        .clone();
    match kind % 6 {
        0 => new.groups[last].url_domain = Some(new.groups[0].sl_domain.clone()),
        1 => new.groups[last].apis.push(new_api(any_api, 99)),
        2 => new.app_auths.push(AppAuth {
            app_id: "missing".into(),
            api_id: any_api,
        }),
        3 => new.domains.push(Domain {
            domain: "bound.test".into(),
            group_id: "missing".into(),
            min_tls_version: MinTlsVersion::Tls12,
            https_redirect: false,
        }),
        4 => new.certificates.push(Certificate {
            domains: vec!["cert.test".into()],
            cert_pem: "not a certificate".into(),
            key_pem: certificate_pem().1.clone(),
        }),
        _ => {
            let bought = new.purchases.first().map(|p| p.group_id.clone());
            new.groups.retain(|g| Some(&g.id) != bought.as_ref());
        }
    }
    new
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_template_parses_or_is_refused_never_panics(text in template_text()) {
        let _ = parse_template(&text);
    }

    #[test]
    fn a_rendered_template_parses_back_to_its_segments(segments in segments()) {
        prop_assert_eq!(parse_template(&render(&segments)).unwrap(), segments);
    }

    /// A path made by filling a route's parameters is matched, capturing what was filled.
    #[test]
    fn a_filled_route_is_found_with_its_parameters(
        segments in segments(),
        values in vec("[a-z0-9%]{1,5}", 6),
        tail in vec("[a-z]{1,3}", 1..3),
        path in template_text(),
    ) {
        let mut router = Router::default();
        router.insert(None, &segments, false, 7);
        // Arbitrary paths never panic.
        let _ = router.find(&http::Method::GET, &path);
        let mut filled = String::new();
        let mut expected = Vec::new();
        for (segment, value) in segments.iter().zip(values.iter().cycle()) {
            match segment {
                Segment::Literal(l) => filled.push_str(&format!("/{l}")),
                Segment::Param(_) => {
                    filled.push_str(&format!("/{value}"));
                    expected.push(value.clone());
                }
                Segment::Greedy(_) => {
                    let rest = tail.join("/");
                    filled.push_str(&format!("/{rest}"));
                    expected.push(rest);
                }
            }
        }
        if filled.is_empty() {
            filled.push('/');
        }
        let found = router.find(&http::Method::DELETE, &filled);
        prop_assert!(found.is_some(), "{} not found by {}", filled, render(&segments));
        let found = found.unwrap();
        prop_assert_eq!(found.target, 7);
        prop_assert_eq!(found.params, expected.iter().map(String::as_str).collect::<Vec<_>>());
    }

    /// Whatever the snapshot, validation answers; what it accepts compiles without a panic.
    #[test]
    fn any_snapshot_is_validated_and_compiled_without_a_panic(snapshot in snapshot()) {
        let dir = tempfile::tempdir().unwrap();
        let quota = QuotaRegistry::open(dir.path(), 8).unwrap();
        let metrics = GatewayMetrics::new();
        if let Ok(valid) = validate(&snapshot) {
            let compiled = prepare(valid, &metrics).bind(&quota, &metrics);
            for app in &snapshot.apps {
                prop_assert!(compiled.app_by_key(&app.app_key).is_some());
            }
        }
    }

    /// Arbitrary bytes as a pushed body: refused by serde or validation, never a panic.
    #[test]
    fn arbitrary_json_never_panics(bytes in vec(any::<u8>(), 0..256)) {
        if let Ok(snapshot) = serde_json::from_slice::<Snapshot>(&bytes) {
            let _ = validate(&snapshot);
        }
        if let Ok(delta) = serde_json::from_slice::<Delta>(&bytes) {
            let _ = apply(&Snapshot::default(), delta);
        }
    }

    /// A valid snapshot survives JSON, validates again, and every app is found by key and
    /// each of its codes in what it compiles to.
    #[test]
    fn a_valid_snapshot_round_trips_and_compiles(snapshot in valid_snapshot()) {
        validate(&snapshot).unwrap();
        let json = serde_json::to_vec(&snapshot).unwrap();
        let back: Snapshot = serde_json::from_slice(&json).unwrap();
        prop_assert_eq!(&back, &snapshot);
        let dir = tempfile::tempdir().unwrap();
        let quota = QuotaRegistry::open(dir.path(), 8).unwrap();
        let compiled = compile(&back, &quota, &GatewayMetrics::new()).unwrap();
        for (i, app) in snapshot.apps.iter().enumerate() {
            prop_assert_eq!(compiled.app_by_key(&app.app_key).map(|a| a.index), Some(i));
            for code in &app.app_codes {
                prop_assert_eq!(compiled.app_by_code(code).map(|a| a.index), Some(i));
            }
        }
        for purchase in &snapshot.purchases {
            prop_assert!(quota.get(&purchase.id).is_some());
        }
    }

    /// The delta between two valid snapshots rebuilds the second from the first (entities
    /// compared by id), and the result validates.
    #[test]
    fn a_delta_rebuilds_the_snapshot_it_was_made_for(
        old in valid_snapshot(),
        new in valid_snapshot(),
    ) {
        let mut new = new;
        new.version += old.version + 1;
        let delta = diff(&old, &new);
        let json = serde_json::to_vec(&delta).unwrap();
        let delta: Delta = serde_json::from_slice(&json).unwrap();
        let rebuilt = apply(&old, delta).unwrap();
        prop_assert_eq!(rebuilt.version, new.version);
        prop_assert_eq!(by_id(&rebuilt), by_id(&new));
        prop_assert_eq!(&rebuilt.app_auths, &new.app_auths);
        validate(&rebuilt).unwrap();
    }

    /// Any delta on any base: refused or applied, never a panic; applied, it is validated
    /// like a full snapshot.
    #[test]
    fn any_delta_on_any_base_never_panics(
        base in snapshot(),
        groups in vec(group(), 0..3),
        apps in vec(app(), 0..3),
        purchases in vec(purchase(), 0..3),
        removed in vec(id(), 0..3),
        from_version in 0u64..4,
        version in 0u64..6,
    ) {
        let delta = Delta {
            from_version,
            version,
            generated_at: None,
            groups,
            removed_groups: removed.clone(),
            apps,
            removed_apps: removed.clone(),
            purchases,
            removed_purchases: removed,
            app_auths: None,
            certificates: None,
            domains: None,
            throttling: None,
        };
        if let Ok(rebuilt) = apply(&base, delta) {
            prop_assert!(rebuilt.version > base.version);
            let _ = validate(&rebuilt);
        }
    }

    /// A buyers' or listing change applied to the compiled snapshot by structural sharing
    /// serves exactly what a full compile of the same wire snapshot serves, and is applied
    /// that way (not handed to a full compile).
    #[test]
    fn a_delta_applied_to_the_compiled_form_equals_a_full_compile(
        (old, new) in market_and_change(),
    ) {
        prop_assert!(compiled_delta_matches_full_compile(&old, &new));
    }

    /// A change of the throttling section (with buyers' changes in the same delta), then
    /// buyers' changes under the new section, each applied to the compiled form: both
    /// serve what full compiles serve, and neither is handed to a full compile.
    #[test]
    fn a_throttling_change_applied_to_the_compiled_form_equals_a_full_compile(
        (old, changed) in market_and_throttling_change(),
        later in vec((0u8..8, any::<u16>()), 1..4),
    ) {
        prop_assert!(compiled_delta_matches_full_compile(&old, &changed));
        // Later buyers: new ones in each group, and one moving (callers' limits resolved
        // from the index the throttling change left).
        let mut after = changed.clone();
        after.version += 1;
        for (n, (group, pick)) in later.into_iter().enumerate() {
            let group = after.groups[usize::from(group) % after.groups.len()].id.clone();
            after.apps.push(App {
                id: format!("later{n}"),
                app_key: format!("key-later-{n}"),
                app_secret: format!("secret-later-{n}"),
                app_codes: Vec::new(),
                creator: "MARKET".into(),
            });
            after.purchases.push(Purchase {
                id: format!("later-p{n}"),
                group_id: group.clone(),
                app_id: format!("later{n}"),
                state: PurchaseState::Active,
                start_time: 0,
                expire_time: 4_102_444_800,
                quota_limit: None,
                quota_used: 0,
            });
            let purchases = after.purchases.len();
            after.purchases[usize::from(pick) % purchases].group_id = group;
        }
        // (The second is handed to a full compile where removed apps left a quarter of the
        // slots empty: a full compile packs them.)
        let removed = old.apps.iter().any(|a| !changed.apps.iter().any(|c| c.id == a.id));
        let incremental = compiled_deltas_match_full_compiles(&[old, changed, after]);
        prop_assert!(incremental == 2 || (removed && incremental == 1), "{}", incremental);
    }

    /// Between any two valid markets (APIs and domains changed too), the compiled-form apply
    /// either hands the delta to a full compile or equals one.
    #[test]
    fn any_delta_on_the_compiled_form_equals_a_full_compile_or_is_handed_to_one(
        old in valid_snapshot(),
        new in valid_snapshot(),
    ) {
        let mut new = new;
        new.version += old.version + 1;
        compiled_delta_matches_full_compile(&old, &new);
    }

    /// A seller's change that breaks a rule across entities is not applied to the compiled
    /// form: it is handed to the full path, which refuses it with its field path.
    #[test]
    fn a_seller_change_that_breaks_a_rule_is_handed_to_the_full_path(
        (_, market) in market_and_change(),
        kind in 0u8..6,
    ) {
        // A market with a buyer (for the group removed with its buyers).
        prop_assume!(kind % 6 != 5 || !market.purchases.is_empty());
        let broken = break_a_rule(&market, kind);
        let delta = diff(&market, &broken);
        let metrics = GatewayMetrics::new();
        let dir = tempfile::tempdir().unwrap();
        let quota = QuotaRegistry::open(dir.path(), 8).unwrap();
        let base = compile(&market, &quota, &metrics).unwrap();
        prop_assert!(apply_delta(&base, &market, &delta, &metrics).is_none());
        prop_assert!(validate(&apply(&market, delta).unwrap()).is_err());
    }
}
