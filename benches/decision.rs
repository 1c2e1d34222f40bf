//! The decision path on one request, without I/O: host → route → authenticate → entitle
//! (`handler::decide`) and the quota take (`handler::take_quota`).
//!
//! Decision it informs: whether enforcement fits the per-request budget of a proxy that must
//! keep up with nginx on one core (targets: ≤ 1 µs with AppCode, ≤ 3 µs with an
//! SDK-HMAC-SHA256 signature over an empty body), and so whether the phases may stay as
//! written (hash lookups, a linear router, a streaming canonical-request hash) or need a
//! redesign. `decide_and_take/*` is the path as served (the quota journal extended by its own
//! thread, reservations sized from the rate up to `quota_journal_block`; a take that outruns
//! it waits for the write, as a request would); `decide_and_take_no_journal/*` the same with
//! the journal out of reach; `decide_only/*` the pure phases; `lease_pass/*` one wake-up of a
//! leased proxy's lease client on a market of 100 000 purchases; `throttle/*` the pure phases
//! with no throttling policy bound to the API against one bound policy with an API and an
//! app limit (target: ≤ 100 ns added; issue 13). Results: BENCHMARKS.md.
//!
//! Run: `cargo bench --bench decision`.
//!
//! On a shared machine, where wall-clock figures drift with the load, the throttle cases can
//! be counted in instructions instead: with `DECISION_COUNT=no_policy` (or `one_policy`) and
//! `DECISION_ITERS=N` the binary runs N decisions of that case and exits, without criterion;
//! under `valgrind --tool=callgrind` the difference between two values of N, divided by the
//! difference, is the instructions per decision, with the fixture's set-up cancelled out
//! (BENCHMARKS.md, issue 13).

use std::hint::black_box;

use futures_util::FutureExt;

use criterion::{criterion_group, Criterion};
use http::{HeaderMap, HeaderValue, Method};
use marketgate::config::DEFAULT_QUOTA_JOURNAL_BLOCK;
use marketgate::gateway::handler::{decide, take_quota, DecideOptions, RequestHead};
use marketgate::gateway::metrics::GatewayMetrics;
use marketgate::gateway::quota::QuotaRegistry;
use marketgate::signing::{self, Payload, RequestParts};
use marketgate::snapshot::compile::{compile, CompiledSnapshot};
use marketgate::snapshot::wire::{
    Api, App, Backend, Group, MarketState, Purchase, PurchaseState, Snapshot, ThrottlePolicy,
    TimeUnit,
};
use time::OffsetDateTime;

const HOST: &str = "weather.market.example";
const PATH: &str = "/v1/weather/paris";
const KEY: &str = "bench-app-key-0000000000000001";
const SECRET: &str = "bench-app-secret-00000000000000000000000001";
const CODE: &str = "bench-app-code-0123456789abcdef0123456789abcdef0123456789abcdef";

/// A market of `groups` groups of 8 APIs each and `groups` buyers (one purchase each), so
/// the host, route and app tables are not trivially small. The bench request goes to the
/// last group's `/v1/weather/{city}` (most routes are tried before it matches).
fn market(groups: usize) -> Snapshot {
    let api = |g: usize, i: usize, uri: &str| Api {
        id: format!("g{g}-api{i}"),
        name: format!("api {i}"),
        api_type: 1,
        req_protocol: "BOTH".into(),
        req_method: "GET".into(),
        req_uri: uri.into(),
        match_mode: "NORMAL".into(),
        auth_type: "APP".into(),
        app_code_auth: true,
        backend: Backend::Http {
            req_protocol: "HTTP".into(),
            req_method: "GET".into(),
            req_uri: if uri.contains("{city}") {
                "/weather/{city}".into()
            } else {
                "/backend".into()
            },
            url_domain: "127.0.0.1:9".into(),
            timeout_ms: 5_000,
        },
    };
    let mut snapshot = Snapshot {
        version: 1,
        ..Snapshot::default()
    };
    for g in 0..groups {
        let host = if g + 1 == groups {
            HOST.to_owned()
        } else {
            format!("g{g}.market.example")
        };
        snapshot.groups.push(Group {
            id: format!("g{g}"),
            name: String::new(),
            sl_domain: format!("g{g}.sl.example"),
            url_domain: Some(host),
            market_state: MarketState::OnSale,
            apis: vec![
                api(g, 0, "/v1/weather/{city}"),
                api(g, 1, "/v1/weather/{city}/hourly"),
                api(g, 2, "/v1/forecast/{city}"),
                api(g, 3, "/v1/forecast/{city}/daily"),
                api(g, 4, "/v1/alerts"),
                api(g, 5, "/v1/alerts/{id}"),
                api(g, 6, "/v2/weather/{city}"),
                api(g, 7, "/v1/stations/{id}/readings"),
            ],
        });
        let last = g + 1 == groups;
        snapshot.apps.push(App {
            id: format!("app{g}"),
            app_key: if last {
                KEY.into()
            } else {
                format!("key-{g:026}")
            },
            app_secret: if last {
                SECRET.into()
            } else {
                format!("secret-{g:036}")
            },
            app_codes: vec![if last {
                CODE.into()
            } else {
                format!("code-{g:059}")
            }],
            creator: "MARKET".into(),
        });
        snapshot.purchases.push(Purchase {
            id: format!("p{g}"),
            group_id: format!("g{g}"),
            app_id: format!("app{g}"),
            state: PurchaseState::Active,
            start_time: 0,
            expire_time: i64::MAX,
            quota_limit: None,
            quota_used: 0,
        });
    }
    snapshot
}

struct Fixture {
    compiled: CompiledSnapshot,
    appcode_headers: HeaderMap,
    hmac_headers: HeaderMap,
    now: OffsetDateTime,
    _dir: tempfile::TempDir,
}

/// Journal block so large that the journal is written once, at the first take: the quota
/// take's CPU cost without the `write` + `fdatasync` every `quota_journal_block` calls.
const NO_JOURNAL_BLOCK: u64 = 1 << 40;

fn fixture(journal_block: u64) -> Fixture {
    fixture_with(journal_block, false)
}

/// [`fixture`], with `throttled` one policy bound to the bench API: Huawei's largest limits
/// per day on the API and on each app, so that no bench run reaches them.
fn fixture_with(journal_block: u64, throttled: bool) -> Fixture {
    let dir = tempfile::tempdir().expect("a temp dir");
    let quota = QuotaRegistry::open(dir.path(), journal_block).expect("journal");
    let mut snapshot = market(1_000);
    if throttled {
        snapshot.throttling.policies.push(ThrottlePolicy {
            id: "bench-policy".into(),
            name: "bench_policy".into(),
            api_call_limits: i32::MAX as u64,
            user_call_limits: None,
            app_call_limits: Some(i32::MAX as u64),
            ip_call_limits: None,
            time_interval: 1,
            time_unit: TimeUnit::Day,
            shared: false,
            api_ids: vec!["g999-api0".into()],
            specials: Vec::new(),
        });
    }
    let compiled =
        compile(&snapshot, &quota, &GatewayMetrics::new()).expect("a valid bench snapshot");
    let now = OffsetDateTime::now_utc();

    // What curl and the SDKs send besides the credentials.
    let mut common = HeaderMap::new();
    common.insert("host", HeaderValue::from_static(HOST));
    common.insert("user-agent", HeaderValue::from_static("bench/1.0"));
    common.insert("accept", HeaderValue::from_static("*/*"));

    let mut appcode_headers = common.clone();
    appcode_headers.insert("x-apig-appcode", HeaderValue::from_static(CODE));

    let mut hmac_headers = common;
    hmac_headers.insert(
        "x-sdk-date",
        HeaderValue::from_str(&signing::format_sdk_date(now)).expect("a date"),
    );
    let parts = RequestParts {
        method: "GET",
        path: PATH,
        query: None,
        headers: &hmac_headers,
        authority: None,
        payload: Payload::Body(b""),
    };
    let auth =
        signing::sign(KEY, SECRET.as_bytes(), &parts, &["host", "x-sdk-date"]).expect("signing");
    hmac_headers.insert(
        "authorization",
        HeaderValue::from_str(&auth).expect("a header"),
    );
    Fixture {
        compiled,
        appcode_headers,
        hmac_headers,
        now,
        _dir: dir,
    }
}

fn head<'a>(headers: &'a HeaderMap) -> RequestHead<'a> {
    RequestHead {
        method: &Method::GET,
        path: PATH,
        query: None,
        headers,
        authority: HOST,
        sni: None,
        tls: false,
        peer: std::net::IpAddr::from([127, 0, 0, 1]),
    }
}

const OPTIONS: DecideOptions = DecideOptions {
    // The bench request is plain HTTP; AppCode over TLS takes the same path.
    appcode_over_http: true,
    max_clock_skew_secs: 900,
};

fn bench_decision(c: &mut Criterion) {
    let f = fixture(DEFAULT_QUOTA_JOURNAL_BLOCK);
    // Both requests are admitted before anything is timed.
    for headers in [&f.appcode_headers, &f.hmac_headers] {
        let d = decide(
            &f.compiled,
            &head(headers),
            Payload::Body(b""),
            f.now,
            OPTIONS,
        )
        .expect("the bench request is admitted");
        assert_eq!(&*d.api.id, "g999-api0");
    }

    // As served: the quota journal is written and fsync'ed by its thread (on the bench's temp
    // dir), reserving at most DEFAULT_QUOTA_JOURNAL_BLOCK calls ahead; then out of reach.
    let quiet = fixture(NO_JOURNAL_BLOCK);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    for (group_name, f) in [
        ("decide_and_take", &f),
        ("decide_and_take_no_journal", &quiet),
    ] {
        let mut group = c.benchmark_group(group_name);
        for (name, headers) in [
            ("appcode", &f.appcode_headers),
            ("hmac_empty_body", &f.hmac_headers),
        ] {
            group.bench_function(name, |b| {
                let head = head(headers);
                b.iter(|| {
                    let d = decide(
                        black_box(&f.compiled),
                        black_box(&head),
                        Payload::Body(b""),
                        f.now,
                        OPTIONS,
                    )
                    .expect("admitted");
                    let purchase = d.purchase.expect("a purchase");
                    run_now(&runtime, || take_quota(purchase)).expect("quota");
                })
            });
        }
        group.finish();
    }

    let mut group = c.benchmark_group("decide_only");
    for (name, headers) in [
        ("appcode", &f.appcode_headers),
        ("hmac_empty_body", &f.hmac_headers),
    ] {
        group.bench_function(name, |b| {
            let head = head(headers);
            b.iter(|| {
                decide(
                    black_box(&f.compiled),
                    black_box(&head),
                    Payload::Body(b""),
                    f.now,
                    OPTIONS,
                )
                .expect("admitted")
            })
        });
    }
    group.finish();
}

/// The throttling phase's cost: the pure phases on an API with no policy bound against the
/// same with one policy (an API and an app limit: two compare-and-swaps and one lookup of
/// the app by index), AppCode authentication (the cheapest, so the phase's share shows).
fn bench_throttle(c: &mut Criterion) {
    let none = fixture_with(NO_JOURNAL_BLOCK, false);
    let bound = fixture_with(NO_JOURNAL_BLOCK, true);
    let mut group = c.benchmark_group("throttle");
    for (name, f) in [("no_policy", &none), ("one_policy", &bound)] {
        group.bench_function(name, |b| {
            let head = head(&f.appcode_headers);
            b.iter(|| {
                let d = decide(
                    black_box(&f.compiled),
                    black_box(&head),
                    Payload::Body(b""),
                    f.now,
                    OPTIONS,
                )
                .expect("admitted");
                black_box(d.throttled)
            })
        });
    }
    group.finish();
}

/// Leases against a local-only quota cell (issue 5's target: leases cost ≤ 5%): one take from
/// a local cell, and from a leased cell plus the wake-up of the lease client that every
/// taken call costs in `Leased` mode (`QuotaRegistry::note_usage`). The journal, the same in
/// both modes, is kept out of reach (a cap of 2^40 calls: after the first reservations, the
/// step sized from the loop's rate outgrows the run).
fn bench_quota_modes(c: &mut Criterion) {
    use marketgate::gateway::quota::QuotaMode;
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let mut group = c.benchmark_group("quota_take");
    for (name, mode) in [("local", QuotaMode::Local), ("leased", QuotaMode::Leased)] {
        let registry =
            QuotaRegistry::open_with_mode(&dir.path().join(name), NO_JOURNAL_BLOCK, mode)
                .expect("journal opens");
        let cell = registry.cell("p1", u64::MAX / 2, 0);
        cell.add_calls(u64::MAX / 4); // a leased cell serves only what was granted
        group.bench_function(name, |b| {
            b.iter(|| {
                assert!(run_now(&runtime, || black_box(&cell).take()).expect("journal"));
                registry.note_usage(&cell);
            })
        });
    }
    group.finish();
}

/// Runs a take as the handler does: done at once, unless the journal thread is behind, and
/// then by waiting for it on `runtime`.
fn run_now<F: std::future::Future>(
    runtime: &tokio::runtime::Runtime,
    take: impl Fn() -> F,
) -> F::Output {
    take()
        .now_or_never()
        .unwrap_or_else(|| runtime.block_on(take()))
}

/// Purchases on the leased proxy of [`bench_lease_pass`].
const LEASED_PURCHASES: usize = 100_000;

/// One wake-up of a leased proxy's lease client (`LeaseClient::pass`: rates, exchange,
/// persisting what changed) on a market of [`LEASED_PURCHASES`] purchases, each called once
/// and reported, with one call taken on one purchase before each pass. Decision it informs:
/// whether the client's cost follows what is active or the size of the market (it runs on
/// the buyers' runtime thread, up to ~50 times a second under load). The control plane is an
/// in-process service that grants every want; the pass includes the state log's fsync.
fn bench_lease_pass(c: &mut Criterion) {
    use marketgate::gateway::leasing::{LeaseClient, LeaseService, LeaseServiceError};
    use marketgate::gateway::quota::QuotaMode;
    use marketgate::lease::{LeaseExchange, LeaseGrant, LeaseReply};
    use std::sync::Arc;

    struct Granting;
    #[async_trait::async_trait]
    impl LeaseService for Granting {
        async fn exchange(&self, exchange: LeaseExchange) -> Result<LeaseReply, LeaseServiceError> {
            let expires_at = OffsetDateTime::now_utc().unix_timestamp() + 300;
            let grants = exchange
                .wants
                .into_iter()
                .map(|want| LeaseGrant {
                    purchase_id: want.purchase_id,
                    granted: want.calls,
                    held: want.calls,
                    unleased: Some(u64::MAX / 2),
                    calls_left: None,
                    recall: 0,
                    expires_at,
                })
                .collect();
            Ok(LeaseReply { grants })
        }
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let text = format!("data_dir = '{}'\n", dir.path().display());
    let config = marketgate::config::Config::from_toml(&text, Vec::new()).expect("config");
    let gateway = marketgate::gateway::Gateway::open_with_quota(&config, QuotaMode::Leased)
        .expect("gateway opens");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let quota = gateway.quota();
    let cells: Vec<_> = (0..LEASED_PURCHASES)
        .map(|i| quota.cell(&format!("{i:032x}"), u64::MAX / 2, 0))
        .collect();
    for cell in &cells {
        cell.add_calls(1_000_000);
    }
    // All at once, so that the journal thread commits their reservations in a few fsyncs.
    let taken = runtime.block_on(futures_util::future::join_all(
        cells.iter().map(|c| c.take()),
    ));
    assert!(taken.into_iter().all(|t| t.expect("journal")));
    for cell in &cells {
        quota.note_usage(cell);
    }
    let client = LeaseClient::new(gateway.clone(), Arc::new(Granting));
    runtime
        .block_on(client.pass(0.1))
        .expect("the first pass reports every purchase");
    let hot = &cells[LEASED_PURCHASES / 2];
    c.bench_function("lease_pass/100k_purchases_one_active", |b| {
        b.iter(|| {
            runtime.block_on(async {
                // An idle cell gives back what it holds past twice its demand, so the first
                // pass took the hot cell's calls back too: hand it the one call it takes.
                hot.add_calls(1);
                assert!(hot.take().await.expect("journal"));
                quota.note_usage(hot);
                client.pass(0.1).await.expect("exchange");
            })
        })
    });
}

/// `DECISION_COUNT` / `DECISION_ITERS` (module docs): N throttle-case decisions, for an
/// instruction count. `false` when not asked for.
fn count_decisions() -> bool {
    let Ok(case) = std::env::var("DECISION_COUNT") else {
        return false;
    };
    let iters: u64 = std::env::var("DECISION_ITERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .expect("DECISION_ITERS=N with DECISION_COUNT");
    let f = match case.as_str() {
        "no_policy" => fixture_with(NO_JOURNAL_BLOCK, false),
        "one_policy" => fixture_with(NO_JOURNAL_BLOCK, true),
        other => panic!("DECISION_COUNT is no_policy or one_policy, not {other}"),
    };
    let head = head(&f.appcode_headers);
    for _ in 0..iters {
        let d = decide(
            black_box(&f.compiled),
            black_box(&head),
            Payload::Body(b""),
            f.now,
            OPTIONS,
        )
        .expect("admitted");
        black_box(d.throttled);
    }
    true
}

criterion_group!(
    benches,
    bench_decision,
    bench_throttle,
    bench_quota_modes,
    bench_lease_pass
);

fn main() {
    if count_decisions() {
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
