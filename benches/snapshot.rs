//! Validating and compiling a pushed snapshot of 1k, 100k and 1M purchases, the memory a
//! compiled purchase holds, and a swap of 1M purchases under traffic.
//!
//! Decision it informs: whether a full snapshot push stays viable for a large market
//! (targets: 1M purchases validate+compile in ≤ 2 s at ≤ 300 bytes per purchase, and
//! swapping them in fails no request), or whether the data plane needs deltas only, a
//! leaner compiled form, or compilation off the admin thread. Results: BENCHMARKS.md.
//!
//! Before criterion runs, a one-off report prints (to stderr, prefixed `snapshot:`): the
//! JSON size of the 1M snapshot, its parse time, the first compile (quota cells created) and
//! a recompile (cells reused), resident bytes per purchase from `/proc/self/statm`, and the
//! swap of 1M purchases under a decide+take loop on another thread (requests failed, worst
//! request latency, where the old snapshot was freed), and a gzip'ed 1M push through a
//! proxy's admin listener over loopback, as the control plane sends it.
//!
//! A one-purchase change at 1M is then timed as a delta and as a full push
//! (`SNAPSHOT_BENCH_DELTA_ONLY=1` runs only that), and 10 changes a second are applied for a
//! minute under a request loop (`SNAPSHOT_BENCH_CHANGES_ONLY=1` runs only that;
//! `SNAPSHOT_BENCH_CHANGES_SECS` and `SNAPSHOT_BENCH_CHANGES_PER_SEC` change the run;
//! `SNAPSHOT_BENCH_THROTTLED=1` binds a throttling policy to one API of every group, and
//! makes every tenth change a seller's throttling change;
//! `SNAPSHOT_BENCH_SELLER=1` makes every other change a seller's: a group onsold to a new
//! market domain, an API added to a group, an app authorized, a domain bound;
//! `SNAPSHOT_BENCH_CHECKPOINT_EVERY=N` makes a full checkpoint due every N deltas, so that
//! one is written within the minute).
//!
//! Run: `cargo bench --bench snapshot` (the 1M cases need ~4 GiB of memory and a minute or
//! two); `SNAPSHOT_BENCH_REPORT_ONLY=1` prints the one-off report and skips criterion;
//! `SNAPSHOT_BENCH_MEMORY_ONLY=1` prints only its compile and memory lines.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use http::{HeaderMap, HeaderValue, Method};
use marketgate::config::{Config, DEFAULT_QUOTA_JOURNAL_BLOCK};
use marketgate::gateway::handler::{decide, take_quota, DecideOptions, RequestHead};
use marketgate::gateway::metrics::GatewayMetrics;
use marketgate::gateway::quota::QuotaRegistry;
use marketgate::gateway::Gateway;
use marketgate::signing::Payload;
use marketgate::snapshot::compile::prepare;
use marketgate::snapshot::delta::Delta;
use marketgate::snapshot::validate::validate;
use marketgate::snapshot::wire::{
    Api, App, AppAuth, Backend, Domain, Group, MarketState, MinTlsVersion, Purchase, PurchaseState,
    Snapshot, ThrottlePolicy, TimeUnit,
};
use time::OffsetDateTime;

/// Groups in every generated market (purchases are spread over them).
const GROUPS: usize = 1_000;
const APIS_PER_GROUP: usize = 4;

/// A 32-hex-digit id, the shape of Huawei's ids, keys and secrets.
fn hex_id(kind: u8, n: usize) -> String {
    format!("{kind:02x}{n:030x}")
}

/// Buyer `n`'s MARKET app and its purchase (of group `n % GROUPS`, `limit` calls).
fn buyer(n: usize, limit: u64) -> (App, Purchase) {
    let app = App {
        id: hex_id(3, n),
        app_key: hex_id(4, n),
        app_secret: format!("{}{}", hex_id(5, n), hex_id(5, n)),
        app_codes: vec![format!("{}{}", hex_id(6, n), hex_id(6, n))],
        creator: "MARKET".into(),
    };
    let purchase = Purchase {
        id: hex_id(7, n),
        group_id: hex_id(1, n % GROUPS),
        app_id: hex_id(3, n),
        state: PurchaseState::Active,
        start_time: 1_700_000_000,
        expire_time: 4_000_000_000,
        quota_limit: Some(limit),
        quota_used: 0,
    };
    (app, purchase)
}

/// A market of [`GROUPS`] groups and `purchases` buyers, one MARKET app and one purchase
/// each, with realistic field lengths (32-hex ids and keys, 64-hex secrets and app codes).
fn market(version: u64, purchases: usize) -> Snapshot {
    let mut snapshot = Snapshot {
        version,
        ..Snapshot::default()
    };
    for g in 0..GROUPS {
        snapshot.groups.push(Group {
            id: hex_id(1, g),
            name: format!("group {g}"),
            sl_domain: format!("{}.apic.example", hex_id(1, g)),
            url_domain: Some(format!("g{g}.market.example")),
            market_state: MarketState::OnSale,
            apis: (0..APIS_PER_GROUP)
                .map(|a| Api {
                    id: hex_id(2, g * APIS_PER_GROUP + a),
                    name: format!("api {a}"),
                    api_type: 1,
                    req_protocol: "BOTH".into(),
                    req_method: "GET".into(),
                    req_uri: format!("/v1/resource{a}/{{id}}"),
                    match_mode: "NORMAL".into(),
                    auth_type: "APP".into(),
                    app_code_auth: true,
                    backend: Backend::Http {
                        req_protocol: "HTTP".into(),
                        req_method: "GET".into(),
                        req_uri: format!("/backend/resource{a}/{{id}}"),
                        url_domain: "10.0.0.1:8080".into(),
                        timeout_ms: 5_000,
                    },
                })
                .collect(),
        });
    }
    snapshot.apps.reserve(purchases);
    snapshot.purchases.reserve(purchases);
    for p in 0..purchases {
        let (app, purchase) = buyer(p, 1_000_000_000);
        snapshot.apps.push(app);
        snapshot.purchases.push(purchase);
    }
    snapshot
}

/// Binds one throttling policy (app limits, shared by every API it is bound to) to each
/// group's first API: every buyer is a caller of one throttled API, and a change of who
/// buys from a group changes its callers (`SNAPSHOT_BENCH_THROTTLED`). Its limits are far
/// above the request loop's rate, so no call is refused by it.
fn throttle(snapshot: &mut Snapshot) {
    snapshot.throttling.policies.push(ThrottlePolicy {
        id: hex_id(8, 0),
        name: "bench".into(),
        api_call_limits: 2_000_000_000,
        user_call_limits: None,
        app_call_limits: Some(1_000_000_000),
        ip_call_limits: None,
        time_interval: 1,
        time_unit: TimeUnit::Minute,
        shared: true,
        api_ids: (0..GROUPS).map(|g| hex_id(2, g * APIS_PER_GROUP)).collect(),
        specials: Vec::new(),
    });
}

/// Resident set size in bytes, from `/proc/self/statm` (Linux).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// CPU time (user + system) this thread has used: on a shared machine wall-clock time also
/// counts the time the scheduler gave to others.
fn thread_cpu() -> Duration {
    cpu_of("/proc/thread-self/stat")
}

/// CPU time (user + system) the whole process has used (every thread, the checkpoint's too).
fn process_cpu() -> Duration {
    cpu_of("/proc/self/stat")
}

fn cpu_of(path: &str) -> Duration {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: u64 = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse::<u64>().ok())
        .sum();
    // CLK_TCK is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

const MILLION: usize = 1_000_000;

/// The one-off figures criterion cannot give: size on the wire, parse, first compile,
/// memory per purchase.
fn report_compile_memory() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let quota = QuotaRegistry::open(dir.path(), DEFAULT_QUOTA_JOURNAL_BLOCK).expect("journal");
    let metrics = GatewayMetrics::new();

    let snapshot = market(1, MILLION);

    // Memory first, before anything is freed that the allocator could hand out again.
    let before = rss_bytes();
    let (wall, cpu) = (Instant::now(), thread_cpu());
    let valid = validate(&snapshot).expect("valid");
    let validated = (wall.elapsed(), thread_cpu() - cpu);
    let first = prepare(valid, &metrics).bind(&quota, &metrics);
    let first_total = (wall.elapsed(), thread_cpu() - cpu);
    let after_first = rss_bytes();

    // A re-push: the cells exist; the old snapshot is still held (as during a swap).
    let (wall, cpu) = (Instant::now(), thread_cpu());
    let valid = validate(&snapshot).expect("valid");
    let second = prepare(valid, &metrics).bind(&quota, &metrics);
    let second_total = (wall.elapsed(), thread_cpu() - cpu);
    let after_second = rss_bytes();
    let per = |bytes: u64| bytes as f64 / MILLION as f64;
    let (snapshot_bytes, both_bytes) = (
        after_second.saturating_sub(after_first),
        after_first.saturating_sub(before),
    );
    eprintln!(
        "snapshot: 1M first push: validate {} (CPU {}) + compile {} (CPU {}) = {} (CPU {})",
        secs(validated.0),
        secs(validated.1),
        secs(first_total.0 - validated.0),
        secs(first_total.1.saturating_sub(validated.1)),
        secs(first_total.0),
        secs(first_total.1),
    );
    eprintln!(
        "snapshot: 1M re-push: validate+compile {} (CPU {})",
        secs(second_total.0),
        secs(second_total.1)
    );
    eprintln!(
        "snapshot: 1M resident: compiled snapshot + quota cells {:.0} bytes/purchase; compiled snapshot alone {:.0}; quota cells {:.0}",
        per(both_bytes),
        per(snapshot_bytes),
        per(both_bytes.saturating_sub(snapshot_bytes)),
    );
    let started = Instant::now();
    drop(first);
    eprintln!(
        "snapshot: 1M drop of a compiled snapshot: {}",
        secs(started.elapsed())
    );
    drop(second);

    let json = serde_json::to_vec(&snapshot).expect("serialises");
    let (wall, cpu) = (Instant::now(), thread_cpu());
    let parsed: Snapshot = serde_json::from_slice(&json).expect("parses");
    eprintln!(
        "snapshot: 1M purchases: JSON {} bytes ({:.0} bytes/purchase), parse {} (CPU {})",
        json.len(),
        json.len() as f64 / MILLION as f64,
        secs(wall.elapsed()),
        secs(thread_cpu() - cpu),
    );
    drop(parsed);
}

/// Swaps a 1M snapshot in through [`Gateway::apply_snapshot`] (validate, compile, persist,
/// swap) while another thread runs the request path's snapshot load + decide + take in a
/// loop, as `handler::handle` does (it holds its `load_full()` until the answer is written).
/// A market change at 1M purchases as a proxy applies it: a delta of one purchase
/// (`apply_delta`: the wire snapshot rebuilt, validated, compiled, the delta appended to the
/// snapshot log, swapped) against the same change as a full push (`apply_snapshot`, which
/// rewrites the whole snapshot file), in one run.
fn report_delta() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut config = Config::builtin().expect("built-in config");
    config.data_dir = dir.path().to_owned();
    let gateway = Gateway::open(&config).expect("gateway");
    gateway
        .apply_snapshot(market(1, MILLION))
        .expect("v1 applies");
    let mut deltas = Vec::new();
    for round in 0..5u64 {
        let base = gateway.wire_snapshot().expect("a snapshot");
        let mut changed = base.purchases[(round as usize * 7919) % MILLION].clone();
        changed.quota_limit = Some(1_000 + round);
        let delta = marketgate::snapshot::delta::Delta {
            from_version: base.version,
            version: base.version + 1,
            purchases: vec![changed],
            ..Default::default()
        };
        drop(base);
        let started = Instant::now();
        gateway.apply_delta(delta).expect("the delta applies");
        deltas.push(started.elapsed());
    }
    let mut full = Vec::new();
    for round in 0..2u64 {
        let mut snapshot = (*gateway.wire_snapshot().expect("a snapshot")).clone();
        snapshot.version += 1;
        snapshot.purchases[round as usize].quota_limit = Some(7);
        let started = Instant::now();
        gateway
            .apply_snapshot(snapshot)
            .expect("the full push applies");
        full.push(started.elapsed());
    }
    let list = |times: &[Duration]| times.iter().map(|t| secs(*t)).collect::<Vec<_>>().join(" ");
    eprintln!(
        "snapshot: 1M one-purchase change: apply_delta (appended record) {}; apply_snapshot (full checkpoint) {}",
        list(&deltas),
        list(&full)
    );
}

/// What a proxy's buyers see of a market that keeps changing: at 1M purchases,
/// Buyers the request loop of [`report_sustained_changes`] calls as.
const TRAFFIC_BUYERS: usize = 64;

/// The purchase (and app) of the request loop's `b`th buyer.
fn traffic_buyer(b: usize) -> usize {
    b * 15_601 % MILLION
}

/// `SNAPSHOT_BENCH_CHANGES_SECS` seconds (default 60) of `SNAPSHOT_BENCH_CHANGES_PER_SEC`
/// (default 10) market changes a second, each a delta as the control plane sends it (a
/// purchase frozen or thawed, a purchase's limit changed, a new buyer's app and purchase;
/// with `SNAPSHOT_BENCH_SELLER`, every other one a seller's change instead),
/// applied by `Gateway::apply_delta` on one thread while another runs the request path
/// (load + decide + take) in a loop. Prints each change's time from when it was due (its
/// 2xx at the control plane, in effect) to the proxy enforcing it (the swapped snapshot
/// has its version; p50, p99, max), the applying thread's CPU as a share of a core, and
/// the requests slower than 5 ms (and the slowest).
fn report_sustained_changes() {
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let seconds = env("SNAPSHOT_BENCH_CHANGES_SECS", 60);
    let per_sec = env("SNAPSHOT_BENCH_CHANGES_PER_SEC", 10).max(1);
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut config = Config::builtin().expect("built-in config");
    config.data_dir = dir.path().to_owned();
    let gateway = Gateway::open(&config).expect("gateway");
    let seller = std::env::var_os("SNAPSHOT_BENCH_SELLER").is_some();
    let mut first = market(1, MILLION);
    let throttled = std::env::var_os("SNAPSHOT_BENCH_THROTTLED").is_some();
    if throttled {
        throttle(&mut first);
    }
    gateway.apply_snapshot(first).expect("v1 applies");
    let checkpoint_every = env("SNAPSHOT_BENCH_CHECKPOINT_EVERY", 0);
    if checkpoint_every > 0 {
        gateway.checkpoint_every_deltas(checkpoint_every as usize);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let gateway = gateway.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let buyers: Vec<(HeaderMap, String)> = (0..TRAFFIC_BUYERS)
                .map(|b| {
                    let p = traffic_buyer(b);
                    let code = format!("{}{}", hex_id(6, p), hex_id(6, p));
                    let mut headers = HeaderMap::new();
                    headers.insert(
                        "x-apig-appcode",
                        HeaderValue::from_str(&code).expect("code"),
                    );
                    (headers, format!("g{}.market.example", p % GROUPS))
                })
                .collect();
            let options = DecideOptions {
                appcode_over_http: true,
                max_clock_skew_secs: 900,
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("a runtime");
            let mut micros: Vec<u32> = Vec::with_capacity(1 << 22);
            let cpu_before = thread_cpu();
            let mut refused = 0u64;
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let (headers, host) = &buyers[n % buyers.len()];
                n += 1;
                let started = Instant::now();
                let snapshot = gateway.compiled().expect("a snapshot");
                let head = RequestHead {
                    method: &Method::GET,
                    path: "/v1/resource0/42",
                    query: None,
                    headers,
                    authority: host,
                    sni: None,
                    tls: false,
                    peer: std::net::IpAddr::from([127, 0, 0, 1]),
                };
                let admitted = decide(
                    &snapshot,
                    &head,
                    Payload::Body(b""),
                    OffsetDateTime::now_utc(),
                    options,
                )
                .ok()
                .and_then(|d| runtime.block_on(take_quota(d.purchase?)).ok());
                if Arc::strong_count(&snapshot) == 1 {
                    std::thread::spawn(move || drop(snapshot));
                } else {
                    drop(snapshot);
                }
                if admitted.is_none() {
                    refused += 1;
                }
                micros.push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
            }
            (micros, refused, thread_cpu().saturating_sub(cpu_before))
        })
    };

    let changes = seconds * per_sec;
    let period = Duration::from_secs_f64(1.0 / per_sec as f64);
    let mut enforced = Vec::with_capacity(changes as usize);
    let mut throttling_changes = Vec::new();
    let process_before = process_cpu();
    let cpu_before = thread_cpu();
    let began = Instant::now();
    for i in 0..changes {
        let due = began + period * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let base = gateway.wire_snapshot().expect("a snapshot");
        let mut delta = Delta {
            from_version: base.version,
            version: base.version + 1,
            ..Default::default()
        };
        let pick = (i as usize * 7_919 + 13) % MILLION;
        if throttled && i % 10 == 9 {
            throttling_change(&base, &mut delta, i as usize);
            throttling_changes.push(i as usize);
        } else if seller && i % 2 == 1 {
            // With sellers' changes, every other change is one (cycling through four kinds).
            seller_change(&base, &mut delta, i as usize);
        } else {
            buyer_change(&base, &mut delta, i as usize, pick);
        }
        drop(base);
        let version = delta.version;
        gateway.apply_delta(delta).expect("the delta applies");
        assert!(gateway.snapshot_version() >= Some(version));
        enforced.push(due.elapsed());
    }
    let wall = began.elapsed();
    let cpu = thread_cpu().saturating_sub(cpu_before);
    stop.store(true, Ordering::Relaxed);
    let (mut micros, refused, traffic_cpu) = traffic.join().expect("traffic thread");
    // The checkpoint's thread (and the old snapshots' frees) beside the applying thread.
    gateway.finish_checkpoint();
    let others = process_cpu()
        .saturating_sub(process_before)
        .saturating_sub(cpu)
        .saturating_sub(traffic_cpu);
    let throttling_slowest = throttling_changes
        .iter()
        .map(|&i| enforced[i])
        .max()
        .unwrap_or_default();
    let mut files: Vec<String> = std::fs::read_dir(dir.path())
        .expect("the data dir")
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let name = entry.file_name().into_string().ok()?;
            let bytes = entry.metadata().ok()?.len();
            name.starts_with("snapshot")
                .then(|| format!("{name} {bytes} B"))
        })
        .collect();
    files.sort();
    eprintln!(
        "snapshot: {} throttling changes (slowest {:.1} ms); other threads' CPU (checkpoint, frees) {}; data dir: {}",
        throttling_changes.len(),
        throttling_slowest.as_secs_f64() * 1000.0,
        secs(others),
        files.join(", ")
    );
    enforced.sort();
    micros.sort_unstable();
    let pct = |sorted: &[Duration], p: f64| {
        sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
    };
    let slow = micros.iter().filter(|&&m| m > 5_000).count();
    eprintln!(
        "snapshot: 1M, {changes} changes at {per_sec}/s over {}: change due -> enforced p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; applying thread CPU {} = {:.1}% of a core; {} requests decided ({refused} refused), {slow} slower than 5 ms, p99 {} us, slowest {:.1} ms",
        secs(wall),
        pct(&enforced, 0.5).as_secs_f64() * 1000.0,
        pct(&enforced, 0.99).as_secs_f64() * 1000.0,
        enforced.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        secs(cpu),
        cpu.as_secs_f64() / wall.as_secs_f64() * 100.0,
        micros.len(),
        micros.get((micros.len() as f64 * 0.99) as usize).copied().unwrap_or(0),
        micros.last().copied().unwrap_or(0) as f64 / 1000.0,
    );
}

/// A buyer's change (cycling through three kinds): a purchase frozen or thawed, a
/// purchase's limit changed, a new buyer's app and purchase.
fn buyer_change(base: &Snapshot, delta: &mut Delta, i: usize, pick: usize) {
    match i % 3 {
        0 => {
            let mut changed = base.purchases[pick].clone();
            changed.state = match changed.state {
                PurchaseState::Frozen => PurchaseState::Active,
                _ => PurchaseState::Frozen,
            };
            delta.purchases.push(changed);
        }
        1 => {
            let mut changed = base.purchases[pick].clone();
            changed.quota_limit = Some(1_000_000 + i as u64);
            delta.purchases.push(changed);
        }
        _ => {
            let (app, purchase) = buyer(MILLION + i, 1_000);
            delta.apps.push(app);
            delta.purchases.push(purchase);
        }
    }
}

/// A seller's throttling change (`SNAPSHOT_BENCH_THROTTLED`): a policy of its own bound to
/// its group's second API, or dropped again (change `i`, group `i / 20`): that API's throttle
/// is rebuilt, the group's ~1,000 buyers its callers.
fn throttling_change(base: &Snapshot, delta: &mut Delta, i: usize) {
    let g = (i / 20) % GROUPS;
    let mut section = base.throttling.clone();
    let id = hex_id(9, g);
    if section.policies.iter().any(|p| p.id == id) {
        section.policies.retain(|p| p.id != id);
    } else {
        section.policies.push(ThrottlePolicy {
            id,
            name: format!("seller {g}"),
            api_call_limits: 2_000_000_000,
            user_call_limits: None,
            app_call_limits: Some(1_000_000_000),
            ip_call_limits: None,
            time_interval: 1,
            time_unit: TimeUnit::Second,
            shared: false,
            api_ids: vec![hex_id(2, g * APIS_PER_GROUP + 1)],
            specials: Vec::new(),
        });
    }
    delta.throttling = Some(section);
}

/// A seller's change (cycling through four kinds): a group onsold to a new market domain,
/// an API added to a group, an app authorized for an API, a domain bound to a group.
/// The groups the request loop calls are left alone (an onsold group's old market domain
/// would refuse its buyers).
fn seller_change(base: &Snapshot, delta: &mut Delta, i: usize) {
    let mut g = (i * 7_919 + 13) % GROUPS;
    while (0..TRAFFIC_BUYERS).any(|b| traffic_buyer(b) % GROUPS == g) {
        g = (g + 1) % GROUPS;
    }
    match (i / 2) % 4 {
        0 => {
            let mut group = base.groups[g].clone();
            group.url_domain = Some(format!("g{g}-{i}.market.example"));
            delta.groups.push(group);
        }
        1 => {
            let mut group = base.groups[g].clone();
            let mut api = group.apis[1].clone();
            api.id = hex_id(9, i);
            api.req_uri = format!("/v1/added{i}/{{id}}");
            group.apis.push(api);
            delta.groups.push(group);
        }
        2 => {
            let mut app_auths = base.app_auths.clone();
            app_auths.push(AppAuth {
                app_id: hex_id(3, (i * 104_729) % MILLION),
                api_id: base.groups[g].apis[0].id.clone(),
            });
            delta.app_auths = Some(app_auths);
        }
        _ => {
            let mut domains = base.domains.clone();
            domains.push(Domain {
                domain: format!("bound{i}.seller.example"),
                group_id: base.groups[g].id.clone(),
                min_tls_version: MinTlsVersion::Tls12,
                https_redirect: false,
            });
            delta.domains = Some(domains);
        }
    }
}

fn report_swap_under_traffic() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut config = Config::builtin().expect("built-in config");
    config.data_dir = dir.path().to_owned();
    let gateway = Gateway::open(&config).expect("gateway");
    let v1 = market(1, MILLION);
    let started = Instant::now();
    gateway.apply_snapshot(v1).expect("v1 applies");
    eprintln!(
        "snapshot: 1M apply_snapshot (validate, compile, persist JSON + fsync, swap), first: {}",
        secs(started.elapsed())
    );
    let v2 = market(2, MILLION);

    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let gateway = gateway.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let code = format!("{}{}", hex_id(6, 4242), hex_id(6, 4242));
            let mut headers = HeaderMap::new();
            headers.insert(
                "x-apig-appcode",
                HeaderValue::from_str(&code).expect("code"),
            );
            let host = format!("g{}.market.example", 4242 % GROUPS);
            let options = DecideOptions {
                appcode_over_http: true,
                max_clock_skew_secs: 900,
            };
            let (mut ok, mut failed, mut worst) = (0u64, 0u64, Duration::ZERO);
            let mut last_holder = 0u32;
            let mut versions = Vec::new();
            // The take is async (it may wait for the quota journal): run it as the handler's
            // runtime would.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("a runtime");
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let snapshot = gateway.compiled().expect("a snapshot");
                if versions.last() != Some(&snapshot.version) {
                    versions.push(snapshot.version);
                }
                let head = RequestHead {
                    method: &Method::GET,
                    path: "/v1/resource0/42",
                    query: None,
                    headers: &headers,
                    authority: &host,
                    sni: None,
                    tls: false,
                    peer: std::net::IpAddr::from([127, 0, 0, 1]),
                };
                let admitted = decide(
                    &snapshot,
                    &head,
                    Payload::Body(b""),
                    OffsetDateTime::now_utc(),
                    options,
                )
                .ok()
                .and_then(|d| runtime.block_on(take_quota(d.purchase?)).ok());
                // As `handler::handle` does: the last holder of a swapped-out snapshot
                // has it freed elsewhere rather than stall its thread.
                if Arc::strong_count(&snapshot) == 1 {
                    last_holder += 1;
                    std::thread::spawn(move || drop(snapshot));
                } else {
                    drop(snapshot);
                }
                match admitted {
                    Some(()) => ok += 1,
                    None => failed += 1,
                }
                worst = worst.max(started.elapsed());
            }
            (ok, failed, worst, versions, last_holder)
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    gateway.apply_snapshot(v2).expect("v2 applies");
    let applied = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (ok, failed, worst, versions, last_holder) = traffic.join().expect("traffic thread");
    eprintln!(
        "snapshot: 1M swap under traffic: apply_snapshot {}; {ok} requests decided, {failed} refused, versions seen {versions:?}, a request was the old snapshot's last holder {last_holder} time(s), worst single request {:.3} ms",
        secs(applied),
        worst.as_secs_f64() * 1000.0
    );
}

/// Pushes a 1M snapshot the way the control plane does (`PUT /v1/snapshot`, gzip) to a
/// proxy's admin listener over loopback, and times the push from the first byte sent to the
/// answer: transfer, decompression, parse, validate, compile, persist (JSON + fsync), swap.
fn report_http_push() {
    use std::io::{Read, Write};
    const TOKEN: &str = "bench-admin-token";
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut config = Config::builtin().expect("built-in config");
    config.data_dir = dir.path().to_owned();
    config.admin.tokens = vec![marketgate::config::AdminToken {
        token: TOKEN.to_owned(),
        role: marketgate::config::AdminRole::Operator,
    }];
    let gateway = Gateway::open(&config).expect("gateway");
    let json = serde_json::to_vec(&market(1, MILLION)).expect("serialises");
    let started = Instant::now();
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gzip.write_all(&json).expect("gzip");
    let gzip = gzip.finish().expect("gzip");
    let gzipped_in = started.elapsed();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("a port");
    let addr = listener.local_addr().expect("an address");
    let router = gateway.admin_router();
    runtime.spawn(async move { axum::serve(listener, router).await });

    let started = Instant::now();
    let mut stream = std::net::TcpStream::connect(addr).expect("connects");
    write!(
        stream,
        "PUT /v1/snapshot HTTP/1.1\r\nHost: bench\r\nX-Admin-Token: {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Encoding: gzip\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        gzip.len()
    )
    .expect("writes the head");
    stream.write_all(&gzip).expect("writes the body");
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .expect("reads the answer");
    let pushed = started.elapsed();
    let status = answer.lines().next().unwrap_or("no answer");
    eprintln!(
        "snapshot: 1M PUT /v1/snapshot over loopback: {} MB gzip (of {} MB JSON; gzip took {}), answered '{status}' in {}; serving version {:?}",
        gzip.len() / 1_000_000,
        json.len() / 1_000_000,
        secs(gzipped_in),
        secs(pushed),
        gateway.snapshot_version(),
    );
}

fn bench_compile(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let quota = QuotaRegistry::open(dir.path(), DEFAULT_QUOTA_JOURNAL_BLOCK).expect("journal");
    let metrics = GatewayMetrics::new();
    let mut group = c.benchmark_group("validate_compile");
    for (purchases, samples) in [(1_000, 50), (100_000, 10), (MILLION, 10)] {
        let snapshot = market(1, purchases);
        // Cells are created by the first compile; every timed one is a re-push.
        drop(prepare(validate(&snapshot).expect("valid"), &metrics).bind(&quota, &metrics));
        group.sample_size(samples);
        if purchases >= 100_000 {
            group.measurement_time(Duration::from_secs(if purchases == MILLION {
                20
            } else {
                5
            }));
        }
        group.bench_with_input(
            BenchmarkId::from_parameter(purchases),
            &snapshot,
            |b, snapshot| {
                // The old compiled snapshot is freed outside the timing (after the swap it
                // is freed by whichever holder lets go last).
                b.iter_with_large_drop(|| {
                    let valid = validate(black_box(snapshot)).expect("valid");
                    prepare(valid, &metrics).bind(&quota, &metrics)
                })
            },
        );
    }
    group.finish();
}

fn main() {
    // `cargo test --all-targets` runs benches once in test mode (no --bench): there the 1M
    // reports would cost minutes and gigabytes of a debug build, so they run under
    // `cargo bench` only.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    if std::env::var_os("SNAPSHOT_BENCH_MEMORY_ONLY").is_some() {
        report_compile_memory();
        return;
    }
    if std::env::var_os("SNAPSHOT_BENCH_DELTA_ONLY").is_some() {
        report_delta();
        return;
    }
    if std::env::var_os("SNAPSHOT_BENCH_CHANGES_ONLY").is_some() {
        report_sustained_changes();
        return;
    }
    report_compile_memory();
    report_swap_under_traffic();
    report_delta();
    report_sustained_changes();
    report_http_push();
    if std::env::var_os("SNAPSHOT_BENCH_REPORT_ONLY").is_some() {
        return;
    }
    let mut criterion = Criterion::default().configure_from_args();
    bench_compile(&mut criterion);
    criterion.final_summary();
}
