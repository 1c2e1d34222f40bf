//! Request throttling on the data plane (CONTRACT §7 step 6; Huawei APIG 流控): the counters,
//! the compiled form of a policy bound to an API, and the phase that admits or refuses a call.
//!
//! A policy limits the calls in a fixed window (`time_interval` × `time_unit`, aligned to the
//! Unix epoch on the control plane's clock) to one API (type 1) or to all its APIs together
//! (type 2), per API, per user (the tenant: a market buyer's domain), per app and per client
//! IP, with per-app and per-tenant exceptions. Each limited thing is one [`Counter`]: one
//! atomic word holding the window and the calls used in it, so that taking a call is one
//! compare-and-swap, with no lock and no allocation. Counters live in the
//! [`ThrottleRegistry`], outside the snapshot, so a new snapshot keeps them (as quota cells);
//! the compiled snapshot holds `Arc`s to them, resolved at compile time: the hot path looks
//! nothing up by string. Only per-IP counters are found per request, in a sharded map keyed by
//! the address (its shard's read lock, never a string).
//!
//! Where proxies share a control plane (`marketgate proxy`), a counter admits only what the
//! control plane allotted to this proxy for the window (`crate::throttle_allotment`,
//! docs/throttling.md): the fleet's sum per window never exceeds the limit. In `serve` it is
//! one local counter holding the whole limit.
//!
//! Must not do I/O: the allotment exchange is `gateway::allotments`'s.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use dashmap::DashMap;
use hashbrown::HashMap;
use prometheus::IntCounter;

use crate::snapshot::TimeUnit;

/// Per-IP counters one policy scope keeps before it forgets those of past windows.
pub const MAX_IP_COUNTERS: usize = 65_536;

/// `(window << 32) | calls`.
fn pack(window: u32, calls: u32) -> u64 {
    (u64::from(window) << 32) | u64::from(calls)
}

fn unpack(word: u64) -> (u32, u32) {
    ((word >> 32) as u32, word as u32)
}

/// Is window `a` later than `b` (window numbers wrap at 2^32)?
fn later(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// The calls taken from one limited thing (an API, a user, an app or an IP under one policy
/// scope) in the current window, and, on a leased proxy, the calls allotted to it for that
/// window. Invariant: `used ≤ min(limit, allotted)` within a window.
#[derive(Debug)]
pub struct Counter {
    /// Its name in allotment exchanges: `{policy}[/{api}]/{kind}[/{subject}]`.
    key: Box<str>,
    used: AtomicU64,
    allotted: AtomicU64,
    /// A refill of this counter's allotment is wanted (leased mode).
    pub(crate) wanted: AtomicBool,
    /// `window + 1` of the last window the control plane had nothing left to grant in.
    exhausted: AtomicU64,
    /// What was allotted in the window before the current allotment's (the allotment rate
    /// kept while the control plane is unreachable).
    last_total: AtomicU64,
    /// The limit and window of the policy scope it counts for (set at compile time; the
    /// allotment client asks with them).
    limit: AtomicU64,
    window_ms: AtomicU64,
}

impl Counter {
    fn new(key: Box<str>) -> Counter {
        Counter {
            key,
            used: AtomicU64::new(0),
            allotted: AtomicU64::new(0),
            wanted: AtomicBool::new(false),
            exhausted: AtomicU64::new(0),
            last_total: AtomicU64::new(0),
            limit: AtomicU64::new(0),
            window_ms: AtomicU64::new(1000),
        }
    }

    /// The limit it counts against and the window's length (ms).
    pub fn limit_and_window(&self) -> (u64, u64) {
        (
            self.limit.load(Ordering::Relaxed),
            self.window_ms.load(Ordering::Relaxed),
        )
    }

    fn set_limit(&self, limit: u64, window_ms: u64) {
        self.limit.store(limit, Ordering::Relaxed);
        self.window_ms.store(window_ms.max(1), Ordering::Relaxed);
    }

    /// The control plane had nothing left to grant in `window`.
    pub fn set_exhausted(&self, window: u64) {
        self.exhausted.store(window + 1, Ordering::Release);
    }

    fn exhausted_in(&self, window: u64) -> bool {
        self.exhausted.load(Ordering::Acquire) == window + 1
    }

    /// What was allotted for the window before the current allotment's.
    pub fn last_total(&self) -> u64 {
        self.last_total.load(Ordering::Relaxed)
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// Takes one call of `window` if fewer than `allowance` were taken in it: the calls used
    /// after this one. A window older than the counter's is counted in the counter's (a call
    /// racing the boundary), never the other way round. Hot path: one compare-and-swap.
    fn take(&self, window: u32, allowance: u64) -> Option<u64> {
        let mut word = self.used.load(Ordering::Acquire);
        loop {
            let (held, calls) = unpack(word);
            let (window, calls) = if held == window || later(held, window) {
                (held, u64::from(calls))
            } else {
                (window, 0)
            };
            if calls >= allowance {
                return None;
            }
            let next = pack(window, (calls + 1) as u32);
            match self
                .used
                .compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(calls + 1),
                Err(seen) => word = seen,
            }
        }
    }

    /// Gives back a call taken in `window` (another counter refused the request).
    fn give_back(&self, window: u32) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
                let (held, calls) = unpack(word);
                (held == window && calls > 0).then(|| pack(held, calls - 1))
            });
    }

    /// Calls taken in `window`.
    pub fn used_in(&self, window: u32) -> u64 {
        let (held, calls) = unpack(self.used.load(Ordering::Acquire));
        if held == window {
            u64::from(calls)
        } else {
            0
        }
    }

    /// Calls allotted to this proxy for `window` (leased mode).
    pub fn allotted_in(&self, window: u32) -> u64 {
        let (held, calls) = unpack(self.allotted.load(Ordering::Acquire));
        if held == window {
            u64::from(calls)
        } else {
            0
        }
    }

    /// Adds `calls` to this proxy's allotment for `window` (a grant; a grant for a past
    /// window is ignored, one for a later window replaces the old window's).
    pub fn allot(&self, window: u32, calls: u64) {
        let before = self
            .allotted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
                let (held, have) = unpack(word);
                if held == window {
                    Some(pack(
                        window,
                        (u64::from(have) + calls).min(u64::from(u32::MAX)) as u32,
                    ))
                } else if later(window, held) || word == 0 {
                    Some(pack(window, calls.min(u64::from(u32::MAX)) as u32))
                } else {
                    None
                }
            });
        if let Ok(word) = before {
            let (held, have) = unpack(word);
            if held != window && word != 0 {
                self.last_total.store(u64::from(have), Ordering::Relaxed);
            }
        }
    }
}

/// The per-IP counters of one policy scope.
#[derive(Debug)]
pub struct IpTable {
    scope: Box<str>,
    limit: u64,
    window_ms: u64,
    counters: DashMap<IpAddr, Arc<Counter>, hashbrown::DefaultHashBuilder>,
}

impl IpTable {
    /// The counter of `ip`, made on first sight (its key is formatted then, once).
    fn counter(&self, ip: IpAddr, window: u32) -> Arc<Counter> {
        if let Some(counter) = self.counters.get(&ip) {
            return counter.clone();
        }
        if self.counters.len() >= MAX_IP_COUNTERS {
            self.counters.retain(|_, c| c.used_in(window) > 0);
        }
        self.counters
            .entry(ip)
            .or_insert_with(|| {
                let counter = Arc::new(Counter::new(format!("{}/ip/{ip}", self.scope).into()));
                counter.set_limit(self.limit, self.window_ms);
                counter
            })
            .clone()
    }
}

/// Every counter, by key, held weakly: a counter lives as long as a compiled snapshot (or a
/// request) holds it, and a policy changed keeps its counts.
#[derive(Debug, Default)]
pub struct ThrottleRegistry {
    counters: Mutex<std::collections::HashMap<Box<str>, Weak<Counter>>>,
    ips: Mutex<std::collections::HashMap<Box<str>, Weak<IpTable>>>,
    /// Counters admit only what the control plane allotted (`marketgate proxy` with a
    /// control plane: set when its allotment client starts).
    leased: AtomicBool,
    /// The control plane's clock minus this host's, in milliseconds (leased mode), measured
    /// at each allotment exchange.
    offset_ms: AtomicI64,
}

impl ThrottleRegistry {
    /// A registry whose counters hold the whole limit (`serve`, or a proxy without control
    /// plane), or, `leased`, only what the control plane allots.
    pub fn new(leased: bool) -> ThrottleRegistry {
        ThrottleRegistry {
            leased: AtomicBool::new(leased),
            ..ThrottleRegistry::default()
        }
    }

    pub fn leased(&self) -> bool {
        self.leased.load(Ordering::Relaxed)
    }

    /// From now on counters admit only what the control plane allots (the allotment client
    /// starts).
    pub fn lease(&self) {
        self.leased.store(true, Ordering::Relaxed);
    }

    /// The counter named `key` (made on first sight). Compile time only.
    pub fn counter(&self, key: &str) -> Arc<Counter> {
        let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(counter) = counters.get(key).and_then(Weak::upgrade) {
            return counter;
        }
        if counters.len() > 1024 && counters.len().is_power_of_two() {
            counters.retain(|_, c| c.strong_count() > 0);
        }
        let counter = Arc::new(Counter::new(key.into()));
        counters.insert(key.into(), Arc::downgrade(&counter));
        counter
    }

    /// The per-IP table of policy scope `scope` (made on first sight). Compile time only.
    pub fn ip_table(&self, scope: &str, limit: u64, window_ms: u64) -> Arc<IpTable> {
        let mut tables = self.ips.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(table) = tables.get(scope).and_then(Weak::upgrade) {
            return table;
        }
        tables.retain(|_, t| t.strong_count() > 0);
        let table = Arc::new(IpTable {
            scope: scope.into(),
            limit,
            window_ms,
            counters: DashMap::default(),
        });
        tables.insert(scope.into(), Arc::downgrade(&table));
        table
    }

    /// Now on the control plane's clock, in milliseconds since the epoch.
    pub fn now_ms(&self, local_ms: i64) -> u64 {
        (local_ms + self.offset_ms.load(Ordering::Relaxed)).max(0) as u64
    }

    /// Records the control plane's clock offset (leased mode).
    pub fn set_offset_ms(&self, offset: i64) {
        self.offset_ms.store(offset, Ordering::Relaxed);
    }
}

/// One policy's limits, shared by the APIs it is bound to.
#[derive(Debug)]
pub struct PolicyRule {
    pub id: Box<str>,
    pub name: Box<str>,
    pub api_limit: u64,
    pub user_limit: Option<u64>,
    pub app_limit: Option<u64>,
    pub ip_limit: Option<u64>,
    pub interval: u64,
    pub unit: TimeUnit,
    /// The window, in milliseconds.
    pub window_ms: u64,
}

impl PolicyRule {
    /// The window `now_ms` (control-plane clock) falls in.
    pub fn window(&self, now_ms: u64) -> u64 {
        now_ms / self.window_ms
    }
}

/// The counters of one calling app under one bound API's policy scope, with their limits
/// (an exception already applied).
#[derive(Debug, Clone)]
struct Caller {
    app: Option<(Arc<Counter>, u64)>,
    user: Option<(Arc<Counter>, u64)>,
}

/// A caller's counter as [`ApiThrottle::callers`] shows it: its key and limit, if limited.
pub type CounterView<'a> = Option<(&'a str, u64)>;

/// A policy as bound to one API: what the throttling phase runs. Cloned (its callers
/// copied, its counters shared) when a delta changes who calls the API.
#[derive(Debug, Clone)]
pub struct ApiThrottle {
    pub rule: Arc<PolicyRule>,
    /// What its counters' keys start with: the policy, and for an exclusive policy the API.
    scope: Box<str>,
    api: Arc<Counter>,
    /// By app index: the apps that can reach this API (its group's buyers, its authorized
    /// apps) and are limited as app or user.
    callers: HashMap<u32, Caller>,
    ips: Option<Arc<IpTable>>,
    /// `marketgate_throttled_total{group, policy}`.
    pub throttled: IntCounter,
}

/// Which limit a call met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dimension {
    Api,
    User,
    App,
    Ip,
}

impl Dimension {
    pub fn as_str(self) -> &'static str {
        match self {
            Dimension::Api => "api",
            Dimension::User => "user",
            Dimension::App => "app",
            Dimension::Ip => "ip",
        }
    }
}

/// Calls left and limit of each dimension a policy applied (for `X-Apig-RateLimit-*`).
#[derive(Debug, Clone, Default)]
pub struct Remaining {
    /// `(dimension, remain, limit)`, in the order api, user, app, ip.
    pub dims: [Option<(Dimension, u64, u64)>; 4],
    /// Leased mode: a counter whose allotment for the window this call brought down to its
    /// low-water mark ([`refill_ahead`]), with the window: the caller asks for its refill now,
    /// without waiting, so that the calls after it do not find the allotment spent.
    pub ahead: Option<(Arc<Counter>, u64)>,
}

/// Leased mode: a counter is refilled ahead once this call leaves at most this much of its
/// allotment for the window: half the chunk a proxy asks for at a time
/// (`throttle_allotment::CHUNK_DIVISOR`), so that under steady demand the refill arrives
/// while the rest of the chunk is being spent. A chunk of one call is refilled as soon as it
/// is spent.
pub fn refill_ahead(limit: u64) -> u64 {
    (limit / crate::throttle_allotment::CHUNK_DIVISOR).max(1) / 2
}

/// Why a call was throttled.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub dimension: Dimension,
    pub limit: u64,
    pub interval: u64,
    pub unit: TimeUnit,
    /// Seconds until the window ends (at least 1).
    pub retry_after: u64,
    /// The refusing counter's allotment ran short of its limit, so a refill may admit the
    /// call: that counter and every other of the call's counters whose allotment for the
    /// window is spent too (asked for in one exchange, not one exchange each), with the
    /// window. Empty: the refusal is final for the window.
    pub short: Vec<(Arc<Counter>, u64)>,
    /// Leased mode, within the skew allowance of a window's ends: admitted after this many
    /// milliseconds (0: not so).
    pub settle_ms: u64,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "The throttling threshold has been reached: policy {} over ratelimit, limit:{}, time:{} {}",
            self.dimension.as_str(),
            self.limit,
            self.interval,
            self.unit.word()
        )
    }
}

impl ApiThrottle {
    /// Compiles `rule` as bound to one API. `scope` names its counters (the policy, and for
    /// an exclusive policy the API too); `callers` are the apps that can reach the API with
    /// their user and exception limits (`app_limit`, `user_limit` already resolved).
    pub fn new<'c>(
        rule: Arc<PolicyRule>,
        scope: &str,
        callers: impl IntoIterator<Item = (u32, &'c str, Option<u64>, Option<(&'c str, Option<u64>)>)>,
        registry: &ThrottleRegistry,
        throttled: IntCounter,
    ) -> ApiThrottle {
        let window_ms = rule.window_ms;
        let api = registry.counter(&format!("{scope}/api"));
        api.set_limit(rule.api_limit, window_ms);
        let ips = rule
            .ip_limit
            .map(|limit| registry.ip_table(scope, limit, window_ms));
        let mut throttle = ApiThrottle {
            rule,
            scope: scope.into(),
            api,
            callers: HashMap::new(),
            ips,
            throttled,
        };
        for (index, app_id, app_limit, user) in callers {
            throttle.set_caller(index, app_id, app_limit, user, registry);
        }
        throttle
    }

    /// Makes app `index` (wire id `app_id`) a caller with these limits (`app_limit`,
    /// `user_limit` already resolved), replacing what it had; with neither limit it is no
    /// caller. Counters come from `registry` (made on first sight, their limits set).
    pub fn set_caller(
        &mut self,
        index: u32,
        app_id: &str,
        app_limit: Option<u64>,
        user: Option<(&str, Option<u64>)>,
        registry: &ThrottleRegistry,
    ) {
        let window_ms = self.rule.window_ms;
        let scope = &self.scope;
        let counter = |key: String, limit: u64| {
            let counter = registry.counter(&key);
            counter.set_limit(limit, window_ms);
            (counter, limit)
        };
        let app = app_limit.map(|limit| counter(format!("{scope}/app/{app_id}"), limit));
        let user = user.and_then(|(user, limit)| {
            limit.map(|limit| counter(format!("{scope}/user/{user}"), limit))
        });
        if app.is_some() || user.is_some() {
            self.callers.insert(index, Caller { app, user });
        } else {
            self.callers.remove(&index);
        }
    }

    /// App `index` no longer calls this API.
    pub fn remove_caller(&mut self, index: u32) {
        self.callers.remove(&index);
    }

    /// Each caller's app index with the keys and limits of its app and user counters, in
    /// no particular order (tests compare compiled forms by it).
    pub fn callers(&self) -> impl Iterator<Item = (u32, CounterView<'_>, CounterView<'_>)> {
        fn view(counter: &Option<(Arc<Counter>, u64)>) -> CounterView<'_> {
            counter.as_ref().map(|(c, limit)| (c.key(), *limit))
        }
        self.callers
            .iter()
            .map(|(&index, caller)| (index, view(&caller.app), view(&caller.user)))
    }

    /// What its counters' keys start with.
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// The throttling phase: takes one call from every counter that applies (ip, app, user,
    /// api), or none of them and says which refused. Hot path: one compare-and-swap per
    /// counter, an integer-keyed lookup of the app, and for an IP limit one sharded-map read.
    pub fn admit(
        &self,
        app: Option<u32>,
        ip: IpAddr,
        now_ms: u64,
        registry: &ThrottleRegistry,
    ) -> Result<Remaining, Refusal> {
        let rule = &*self.rule;
        let full_window = rule.window(now_ms);
        let window = full_window as u32;
        let leased = registry.leased();
        if leased {
            // Within the skew allowance of either end of the window no proxy admits: its
            // clock may be in the neighbouring window (docs/throttling.md).
            let into = now_ms % rule.window_ms;
            let guard = crate::throttle_allotment::SKEW_ALLOWANCE_MS.min(rule.window_ms / 4);
            let settle_ms = if into < guard {
                guard - into
            } else if into >= rule.window_ms - guard {
                rule.window_ms - into + guard
            } else {
                0
            };
            if settle_ms > 0 {
                return Err(Refusal {
                    dimension: Dimension::Api,
                    limit: rule.api_limit,
                    interval: rule.interval,
                    unit: rule.unit,
                    retry_after: 1,
                    short: Vec::new(),
                    settle_ms,
                });
            }
        }
        let caller = app.and_then(|index| self.callers.get(&index));
        let ip_counter = match (&self.ips, rule.ip_limit) {
            (Some(table), Some(limit)) => Some((table.counter(ip, window), limit)),
            _ => None,
        };
        let dims: [Option<(Dimension, &Arc<Counter>, u64)>; 4] = [
            ip_counter.as_ref().map(|(c, l)| (Dimension::Ip, c, *l)),
            caller
                .and_then(|c| c.app.as_ref())
                .map(|(c, l)| (Dimension::App, c, *l)),
            caller
                .and_then(|c| c.user.as_ref())
                .map(|(c, l)| (Dimension::User, c, *l)),
            Some((Dimension::Api, &self.api, rule.api_limit)),
        ];
        let mut remaining = Remaining::default();
        for (i, (dimension, counter, limit)) in dims
            .iter()
            .enumerate()
            .filter_map(|(i, d)| Some((i, (*d)?)))
        {
            let allowance = if leased {
                limit.min(counter.allotted_in(window))
            } else {
                limit
            };
            match counter.take(window, allowance) {
                Some(used) => {
                    // Reported api, user, app, ip (Huawei's header order).
                    remaining.dims[3 - i] = Some((dimension, limit.saturating_sub(used), limit));
                    if leased
                        && allowance < limit
                        && allowance - used <= refill_ahead(limit)
                        && remaining.ahead.is_none()
                        && !counter.wanted.load(Ordering::Acquire)
                    {
                        remaining.ahead = Some((counter.clone(), full_window));
                    }
                }
                None => {
                    for (_, taken, _) in dims[..i].iter().flatten() {
                        taken.give_back(window);
                    }
                    let window_end = (full_window + 1) * rule.window_ms;
                    let retry_after = window_end.saturating_sub(now_ms).div_ceil(1000).max(1);
                    let spent = |counter: &Counter, limit: u64| {
                        let allowance = limit.min(counter.allotted_in(window));
                        allowance < limit
                            && counter.used_in(window) >= allowance
                            && !counter.exhausted_in(full_window)
                    };
                    // Only a refusal by an allotment (not by the limit) may be lifted by a
                    // refill; then the counters after it that are spent too are asked for
                    // with it (at a window's start, all of them).
                    let short = if leased && spent(counter, limit) {
                        dims[i..]
                            .iter()
                            .flatten()
                            .filter(|(_, c, l)| spent(c, *l))
                            .map(|(_, c, _)| ((*c).clone(), full_window))
                            .collect()
                    } else {
                        Vec::new()
                    };
                    return Err(Refusal {
                        dimension,
                        limit,
                        interval: rule.interval,
                        unit: rule.unit,
                        retry_after,
                        short,
                        settle_ms: 0,
                    });
                }
            }
        }
        Ok(remaining)
    }
}

/// `remain:9,limit:10,time:10 second`: a `X-Apig-RateLimit-*` value (debug mode only).
pub fn header_value(remain: u64, limit: u64, rule: &PolicyRule) -> String {
    format!(
        "remain:{remain},limit:{limit},time:{} {}",
        rule.interval,
        rule.unit.word()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(api: u64, app: Option<u64>, ip: Option<u64>) -> Arc<PolicyRule> {
        Arc::new(PolicyRule {
            id: "p".into(),
            name: "p".into(),
            api_limit: api,
            user_limit: None,
            app_limit: app,
            ip_limit: ip,
            interval: 1,
            unit: TimeUnit::Second,
            window_ms: 1000,
        })
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn a_window_admits_the_limit_then_refuses_then_a_new_window_admits_again() {
        let registry = ThrottleRegistry::new(false);
        let throttle = ApiThrottle::new(
            rule(3, None, None),
            "p",
            [],
            &registry,
            IntCounter::new("t", "t").unwrap(),
        );
        for left in [2, 1, 0] {
            let admitted = throttle.admit(None, ip(1), 5_000, &registry).unwrap();
            assert_eq!(admitted.dims[0], Some((Dimension::Api, left, 3)));
        }
        let refused = throttle.admit(None, ip(1), 5_999, &registry).unwrap_err();
        assert_eq!(refused.dimension, Dimension::Api);
        assert_eq!(refused.retry_after, 1);
        assert_eq!(
            refused.to_string(),
            "The throttling threshold has been reached: policy api over ratelimit, limit:3, time:1 second"
        );
        assert!(throttle.admit(None, ip(1), 6_000, &registry).is_ok());
    }

    #[test]
    fn a_refusal_by_a_narrow_limit_gives_back_what_the_call_took() {
        let registry = ThrottleRegistry::new(false);
        let callers = [(0u32, "a0", Some(1), None), (1, "a1", Some(1), None)];
        let throttle = ApiThrottle::new(
            rule(10, Some(1), Some(5)),
            "p",
            callers,
            &registry,
            IntCounter::new("t", "t").unwrap(),
        );
        assert!(throttle.admit(Some(0), ip(1), 0, &registry).is_ok());
        let refused = throttle.admit(Some(0), ip(1), 0, &registry).unwrap_err();
        assert_eq!(refused.dimension, Dimension::App);
        // The refused call's IP take was given back: 4 more from that IP pass (5 in all).
        assert!(throttle.admit(Some(1), ip(1), 0, &registry).is_ok());
        for _ in 0..3 {
            assert!(throttle.admit(None, ip(1), 0, &registry).is_ok());
        }
        let refused = throttle.admit(None, ip(1), 0, &registry).unwrap_err();
        assert_eq!(refused.dimension, Dimension::Ip);
        assert!(throttle.admit(None, ip(2), 0, &registry).is_ok());
    }

    #[test]
    fn concurrent_takes_never_exceed_the_limit() {
        let registry = Arc::new(ThrottleRegistry::new(false));
        let throttle = Arc::new(ApiThrottle::new(
            rule(1000, None, None),
            "p",
            [],
            &registry,
            IntCounter::new("t", "t").unwrap(),
        ));
        let admitted: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let (t, r) = (throttle.clone(), registry.clone());
                    s.spawn(move || {
                        (0..500)
                            .filter(|_| t.admit(None, ip(1), 0, &r).is_ok())
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(admitted, 1000);
    }

    #[test]
    fn a_call_short_of_several_allotments_asks_for_all_of_them_at_once_and_refills_ahead() {
        let registry = ThrottleRegistry::new(true);
        let throttle = ApiThrottle::new(
            rule(100, Some(20), None),
            "p",
            [(0u32, "a0", Some(20), None)],
            &registry,
            IntCounter::new("t", "t").unwrap(),
        );
        // A window's first call: neither the app's nor the API's allotment is there yet; it
        // asks for both in one exchange, not for the API's only once the app's came.
        let refused = throttle.admit(Some(0), ip(1), 500, &registry).unwrap_err();
        assert_eq!(refused.dimension, Dimension::App);
        let keys: Vec<&str> = refused.short.iter().map(|(c, _)| c.key()).collect();
        assert_eq!(keys, ["p/app/a0", "p/api"]);
        for (counter, window) in &refused.short {
            counter.allot(*window as u32, 10);
        }
        // The app's chunk is 2 (a tenth of 20): granted 10, the call that leaves 1 asks
        // for the app's refill ahead; the API's (chunk 10, granted 10) once 5 are left.
        let mut ahead = Vec::new();
        for _ in 0..9 {
            let admitted = throttle.admit(Some(0), ip(1), 500, &registry).unwrap();
            ahead.push(admitted.ahead.map(|(c, _)| c.key().to_owned()));
        }
        assert_eq!(ahead[..4], [None, None, None, None]);
        assert_eq!(ahead[4].as_deref(), Some("p/api"));
        assert_eq!(ahead[8].as_deref(), Some("p/app/a0"));
        // Refused by the limit, not by an allotment: nothing to ask for.
        let registry = ThrottleRegistry::new(true);
        let throttle = ApiThrottle::new(
            rule(100, Some(1), None),
            "q",
            [(0u32, "a0", Some(1), None)],
            &registry,
            IntCounter::new("t", "t").unwrap(),
        );
        let refused = throttle.admit(Some(0), ip(1), 500, &registry).unwrap_err();
        for (counter, window) in &refused.short {
            counter.allot(*window as u32, 1);
        }
        assert!(throttle.admit(Some(0), ip(1), 500, &registry).is_ok());
        let refused = throttle.admit(Some(0), ip(1), 500, &registry).unwrap_err();
        assert_eq!(refused.dimension, Dimension::App);
        assert!(refused.short.is_empty(), "{:?}", refused.short);
    }

    #[test]
    fn a_leased_counter_admits_only_its_allotment() {
        let registry = ThrottleRegistry::new(true);
        let throttle = ApiThrottle::new(
            rule(10, None, None),
            "p",
            [],
            &registry,
            IntCounter::new("t", "t").unwrap(),
        );
        let refused = throttle.admit(None, ip(1), 500, &registry).unwrap_err();
        let [(counter, window)] = &refused.short[..] else {
            panic!("short of its allotment: {:?}", refused.short)
        };
        let (counter, window) = (counter.clone(), *window);
        counter.allot(window as u32, 2);
        assert!(throttle.admit(None, ip(1), 500, &registry).is_ok());
        assert!(throttle.admit(None, ip(1), 600, &registry).is_ok());
        assert_eq!(
            throttle
                .admit(None, ip(1), 700, &registry)
                .unwrap_err()
                .short
                .len(),
            1
        );
        // Nothing is admitted near the window's ends; an allotment is for its window only.
        assert_eq!(
            throttle
                .admit(None, ip(1), 990, &registry)
                .unwrap_err()
                .settle_ms,
            60
        );
        assert!(throttle.admit(None, ip(1), 1_500, &registry).is_err());
        // Once the control plane has nothing left for the window, a refusal is final.
        counter.set_exhausted(1);
        assert!(throttle
            .admit(None, ip(1), 1_500, &registry)
            .unwrap_err()
            .short
            .is_empty());
        assert_eq!(counter.last_total(), 0);
        counter.allot(1, 3);
        assert_eq!(counter.last_total(), 2);
    }
}
