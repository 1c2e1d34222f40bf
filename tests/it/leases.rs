//! Quota leases (docs/quota-leases.md): several proxies share one purchase, and the backend
//! receives exactly the calls bought — never more, whatever the concurrency, and a proxy that
//! crashes gives its unused lease back when it comes back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use marketgate::gateway::leasing::{LeaseClient, LeaseService, LeaseServiceError};
use marketgate::lease::{LeaseExchange, LeaseReply};
use marketgate::serve::InProcessLeases;
use marketgate::shutdown::ShutdownTrigger;
use serde_json::json;

use crate::support::control::{self as ctl, expect_status, Control};
use crate::support::gateway::{request, signed_as, Backend, Buyer, TestGateway};

const MARKET_DOMAIN: &str = "shared.example.com";
/// `gateway.quota_journal_block` of these proxies: the most a crash may lose per purchase.
const JOURNAL_BLOCK: u64 = 16;
/// How long a drain may take on a loaded machine (each round ends with a refill wait).
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A purchase of `quota` calls on the market, served through a real backend.
struct Market {
    control: Control,
    backend: Backend,
    purchase_id: String,
    key: String,
    secret: String,
}

impl Market {
    async fn with_purchase(quota: u64) -> Market {
        Self::with_purchase_on(&ctl::Backend::Sqlite, quota).await
    }

    async fn with_purchase_on(store: &ctl::Backend, quota: u64) -> Market {
        let backend = Backend::echo().await;
        let control = Control::start(store).await;
        let bought = ctl::bought_group(control.addr, backend.addr, MARKET_DOMAIN, quota).await;
        Market {
            purchase_id: bought.purchase_id,
            key: bought.key,
            secret: bought.secret,
            control,
            backend,
        }
    }

    /// A proxy that leases this market's quota in-process, under `node_id`, in `dir`.
    async fn proxy(&self, node_id: &str, dir: Arc<tempfile::TempDir>) -> LeasedProxy {
        let service = Arc::new(InProcessLeases(self.control.cp.clone()));
        self.proxy_with(node_id, dir, "", service).await
    }

    /// A proxy with extra config and its own lease service.
    async fn proxy_with(
        &self,
        node_id: &str,
        dir: Arc<tempfile::TempDir>,
        extra: &str,
        service: Arc<dyn LeaseService>,
    ) -> LeasedProxy {
        let config = format!(
            "[gateway]\nquota_journal_block = {JOURNAL_BLOCK}\n[proxy]\nnode_id = '{node_id}'\n{extra}"
        );
        let gw = TestGateway::start_leased(dir, &config).await;
        // A restarted proxy may already serve this version from its disk copy.
        match gw.gateway.apply_snapshot(ctl::served(&self.control).await) {
            Ok(_) | Err(marketgate::gateway::SnapshotRejection::NotNewer { .. }) => {}
            Err(other) => panic!("snapshot refused: {other}"),
        }
        let exchanges = Arc::new(RunToTheirEnd {
            service,
            in_flight: Arc::default(),
        });
        let client = Arc::new(LeaseClient::new(gw.gateway.clone(), exchanges.clone()));
        let (trigger, shutdown) = ShutdownTrigger::new();
        let runner = client.clone();
        let task = tokio::spawn(async move {
            runner.recover(&shutdown).await;
            runner.run(shutdown).await
        });
        LeasedProxy {
            node_id: node_id.to_owned(),
            exchanges,
            buyer: Buyer::new(gw.buyers),
            gw,
            client,
            task,
            _trigger: trigger,
        }
    }

    fn call(&self) -> http::Request<http_body_util::Full<Bytes>> {
        signed_as(
            &self.key,
            &self.secret,
            request("GET", MARKET_DOMAIN, "/call", Bytes::new()),
        )
    }

    /// Another buyer's purchase of `quota` calls of the same group.
    async fn second_purchase(&self, order_id: &str, quota: u64) -> OtherBuyer {
        let market = self.control.client(ctl::MARKET_TOKEN);
        let group_id = self.control.cp.snapshot().await.groups[0].id.clone();
        let bought = market
            .as_domain("other-buyer")
            .post(
                &format!("{}/api-groups/purchase", ctl::market_base("other-project")),
                json!({"order_id": order_id, "group_id": group_id,
                       "start_time": "1700000000", "expire_time": "4102444800",
                       "req_quota": quota.to_string(), "order_type": "1"}),
            )
            .await;
        expect_status("second purchase", &bought, 201);
        OtherBuyer {
            key: bought.1["app_key"].as_str().unwrap().to_owned(),
            secret: bought.1["app_secret"].as_str().unwrap().to_owned(),
        }
    }

    async fn ledger(&self) -> marketgate::lease::Ledger {
        self.control.cp.ledger(&self.purchase_id).await.unwrap()
    }
}

/// Another buyer's credentials.
struct OtherBuyer {
    key: String,
    secret: String,
}

impl OtherBuyer {
    fn call(&self) -> http::Request<http_body_util::Full<Bytes>> {
        signed_as(
            &self.key,
            &self.secret,
            request("GET", MARKET_DOMAIN, "/call", Bytes::new()),
        )
    }
}

struct LeasedProxy {
    node_id: String,
    exchanges: Arc<RunToTheirEnd>,
    gw: TestGateway,
    buyer: Buyer,
    client: Arc<LeaseClient>,
    task: tokio::task::JoinHandle<()>,
    _trigger: ShutdownTrigger,
}

impl LeasedProxy {
    /// A clean stop: drain, flush the journal, report and give back the lease.
    async fn stop(self) {
        self.task.abort();
        self.gw.stop().await;
        self.client.finish().await.unwrap();
    }

    /// A kill -9: nothing flushed, nothing reported, the lease stranded. Returns once an
    /// exchange it had sent has been committed or refused by the control plane, so that the
    /// ledger read next is the one the crash left.
    async fn crash(self) -> Arc<tempfile::TempDir> {
        self.task.abort();
        let dir = self.gw.crash().await;
        self.exchanges.settled().await;
        dir
    }
}

/// A proxy's lease service whose exchanges run to their end even when the proxy dies with
/// one in flight, as a real control plane finishes a request whose client is gone. (Aborting
/// the lease client's task drops its side only; the store's commit may land after, so a
/// ledger read right after a crash could be overtaken by it: 801 calls read as stranded,
/// 780 a moment later.)
struct RunToTheirEnd {
    service: Arc<dyn LeaseService>,
    /// Held for reading by each exchange in flight.
    in_flight: Arc<tokio::sync::RwLock<()>>,
}

impl RunToTheirEnd {
    /// Waits until no exchange is in flight.
    async fn settled(&self) {
        let _none = self.in_flight.write().await;
    }
}

#[async_trait::async_trait]
impl LeaseService for RunToTheirEnd {
    async fn exchange(&self, exchange: LeaseExchange) -> Result<LeaseReply, LeaseServiceError> {
        let running = self.in_flight.clone().read_owned().await;
        let service = self.service.clone();
        tokio::spawn(async move {
            let _running = running;
            service.exchange(exchange).await
        })
        .await
        .expect("the exchange task")
    }
}

/// Sends calls round-robin from `clients` concurrent buyers, `each` calls apiece; returns
/// the number answered 200. Every other answer must be 405 APIG.0501 (calls used up) or 503
/// APIG.0606 (calls left are held by another proxy: retry later).
async fn load(market: &Market, proxies: &[LeasedProxy], clients: usize, each: usize) -> u64 {
    let ok = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let buyer = proxies[c % proxies.len()].buyer.clone();
        let requests: Vec<_> = (0..each).map(|_| market.call()).collect();
        let ok = ok.clone();
        tasks.push(tokio::spawn(async move {
            for request in requests {
                let answer = buyer.send(request).await;
                match answer.status.as_u16() {
                    200 => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    405 => assert_eq!(answer.code(), "APIG.0501", "{:?}", answer.body),
                    // Calls left but held by another proxy, not moved here within the refill
                    // wait: retry later, never "used up".
                    503 => assert_eq!(answer.code(), "APIG.0606", "{:?}", answer.body),
                    other => panic!("unexpected {other}: {:?}", answer.body),
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    ok.load(Ordering::SeqCst)
}

/// Calls every proxy in turn until a whole round serves nothing, the ledger has nothing left
/// to lease and these proxies hold nothing in it: whatever they held has then been served and
/// reported, and what is left is held by proxies not drained (a crashed one's stranded lease).
///
/// "Nothing left to lease" alone is not enough: a call that found its cell dry is answered
/// 503 once the refill wait (500 ms) is over, and on a loaded machine the refill it asked for
/// may commit just after, leaving the calls granted in a lease that no round has served yet.
async fn drain(market: &Market, proxies: &[LeasedProxy]) -> u64 {
    let mut served = 0;
    let deadline = std::time::Instant::now() + DRAIN_TIMEOUT;
    loop {
        let mut round = 0;
        for proxy in proxies {
            loop {
                let answer = proxy.buyer.send(market.call()).await;
                if answer.status != 200 {
                    break;
                }
                round += 1;
            }
        }
        served += round;
        let ledger = market.ledger().await;
        let held_here: u64 = proxies
            .iter()
            .filter_map(|p| ledger.leases.get(&p.node_id))
            .map(|lease| lease.held)
            .sum();
        if round == 0 && ledger.unleased() == Some(0) && held_here == 0 {
            return served;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never drained: {ledger:?}, {} calls at the backend",
            market.backend.hits()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_proxies_share_one_purchase_exactly() {
    for store in ctl::Backend::all().await {
        three_proxies_share_one_purchase_exactly_on(&store).await;
    }
}

async fn three_proxies_share_one_purchase_exactly_on(store: &ctl::Backend) {
    const QUOTA: u64 = 3000;
    let market = Market::with_purchase_on(store, QUOTA).await;
    let mut proxies = Vec::new();
    for n in 0..3 {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        proxies.push(market.proxy(&format!("proxy-{n}"), dir).await);
    }

    let served = load(&market, &proxies, 64, 70).await; // 4480 calls offered for 3000
    assert!(market.backend.hits() <= QUOTA, "over-admitted");
    let served = served + drain(&market, &proxies).await;

    assert_eq!(
        market.backend.hits(),
        QUOTA,
        "the backend got exactly what was bought"
    );
    assert_eq!(served, QUOTA);
    for proxy in proxies {
        proxy.stop().await;
    }
    let ledger = market.ledger().await;
    assert_eq!(ledger.used, QUOTA, "every served call was reported");
    assert_eq!(ledger.held(), 0, "clean stops give every lease back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_proxy_returns_its_unused_lease_when_it_comes_back() {
    for store in ctl::Backend::all().await {
        a_crashed_proxy_returns_its_unused_lease_on(&store).await;
    }
}

async fn a_crashed_proxy_returns_its_unused_lease_on(store: &ctl::Backend) {
    const QUOTA: u64 = 1000;
    let market = Market::with_purchase_on(store, QUOTA).await;
    let dir_a = Arc::new(tempfile::tempdir().unwrap());
    let crashing = market.proxy("proxy-a", dir_a.clone()).await;
    let steady = market
        .proxy("proxy-b", Arc::new(tempfile::tempdir().unwrap()))
        .await;

    let served = load(&market, std::slice::from_ref(&crashing), 8, 25).await;
    assert_eq!(served, 200);
    crashing.crash().await;
    // Read what proxy-a left behind only once it is dead: an exchange it had in flight (a
    // usage report turning held into used) may commit up to the moment it dies, so a read
    // before the crash can be overtaken by it.
    let stranded = market.ledger().await.leases["proxy-a"].held;
    assert!(stranded > 0, "proxy-a held a lease when it died");

    // While proxy-a is down its lease is stranded (not granted to anyone else), and the
    // others never over-admit.
    drain(&market, std::slice::from_ref(&steady)).await;
    assert!(market.backend.hits() <= QUOTA);
    assert_eq!(market.ledger().await.leases["proxy-a"].held, stranded);

    // proxy-a comes back on its directory: its journal is reported (at most one block more
    // than it served: never less) and its lease given back.
    let back = market.proxy("proxy-a", dir_a).await;
    back.client.wait_recovered().await;
    let ledger = market.ledger().await;
    assert!(!ledger.leases.contains_key("proxy-a") || ledger.leases["proxy-a"].held == 0);
    let hits = market.backend.hits();
    assert!(ledger.used >= hits, "a served call is never granted again");
    assert!(
        ledger.used <= hits + JOURNAL_BLOCK,
        "a crash loses at most one block"
    );

    let proxies = [steady, back];
    drain(&market, &proxies).await;
    let hits = market.backend.hits();
    assert!(hits <= QUOTA, "over-admitted: {hits}");
    assert!(
        hits >= QUOTA - JOURNAL_BLOCK,
        "lost more than one journal block: {hits}"
    );
    for proxy in proxies {
        proxy.stop().await;
    }
}

/// The in-process ledger behind a switch: while `down`, every exchange fails as an
/// unreachable control plane would.
struct Switchable {
    ledger: InProcessLeases,
    down: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl LeaseService for Switchable {
    async fn exchange(&self, exchange: LeaseExchange) -> Result<LeaseReply, LeaseServiceError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(LeaseServiceError::Unreachable("control plane down".into()));
        }
        self.ledger.exchange(exchange).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_control_plane_down_proxies_serve_from_their_leases() {
    // 10 s in-process (with a restart half-way); the 60 s outage runs once, with real
    // processes, in fleet.rs. MARKETGATE_TEST_OUTAGE_SECS sets both.
    let outage = std::env::var("MARKETGATE_TEST_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10u64);
    let market = Market::with_purchase(100_000).await;
    let exhausted = market.second_purchase("used-up-order", 3).await;
    let control = Arc::new(Switchable {
        ledger: InProcessLeases(market.control.cp.clone()),
        down: false.into(),
    });
    let leases = "lease_min_calls = 2000\nlease_max_calls = 4000\n";
    let dir_b = Arc::new(tempfile::tempdir().unwrap());
    let a = market
        .proxy_with(
            "proxy-a",
            Arc::new(tempfile::tempdir().unwrap()),
            leases,
            control.clone(),
        )
        .await;
    let b = market
        .proxy_with("proxy-b", dir_b.clone(), leases, control.clone())
        .await;
    for proxy in [&a, &b] {
        assert_eq!(proxy.buyer.send(market.call()).await.status, 200);
        for _ in 0..3 {
            proxy.buyer.send(exhausted.call()).await;
        }
    }
    let refused = a.buyer.send(exhausted.call()).await;
    assert_eq!(
        (refused.status.as_u16(), refused.code()),
        (405, "APIG.0501".into())
    );
    // Both proxies have persisted what they hold before the outage: an exchange persists its
    // answer before it lets the next one start, so one more pass returns only after that.
    // (A 300 ms sleep stood in for this.)
    for proxy in [&a, &b] {
        proxy.client.pass(0.0).await.unwrap();
    }

    control.down.store(true, Ordering::SeqCst);
    let started = std::time::Instant::now();
    let mut b = Some(b);
    let mut restarted_in = None;
    let mut rounds = 0;
    while started.elapsed().as_secs() < outage {
        // Half-way, proxy-b is killed and restarted: from its disk it serves at once.
        if restarted_in.is_none() && started.elapsed().as_secs() >= outage / 2 {
            b.take().unwrap().crash().await;
            let restart = std::time::Instant::now();
            let back = market
                .proxy_with("proxy-b", dir_b.clone(), leases, control.clone())
                .await;
            let answer = back.buyer.send(market.call()).await;
            assert_eq!(answer.status, 200, "restarted proxy: {:?}", answer.body);
            restarted_in = Some(restart.elapsed());
            b = Some(back);
        }
        for proxy in [&a, b.as_ref().unwrap()] {
            let answer = proxy.buyer.send(market.call()).await;
            assert_eq!(
                answer.status, 200,
                "calls left must be served: {:?}",
                answer.body
            );
            // Used up: 405 where the proxy learnt it, 503 APIG.0606 (retry later) where it
            // cannot know (restarted during the outage); either at once, never after a wait.
            let asked = std::time::Instant::now();
            let answer = proxy.buyer.send(exhausted.call()).await;
            let code = (answer.status.as_u16(), answer.code());
            assert!(
                code == (405, "APIG.0501".into()) || code == (503, "APIG.0606".into()),
                "{code:?}"
            );
            assert!(
                asked.elapsed() < std::time::Duration::from_millis(250),
                "answered at once, not after a refill wait: {:?}",
                asked.elapsed()
            );
        }
        rounds += 1;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let restarted_in = restarted_in.expect("proxy-b was restarted");
    assert!(
        restarted_in < std::time::Duration::from_secs(2),
        "{restarted_in:?}"
    );
    assert!(rounds > 0);

    // The control plane is back: usage is reported, nothing lost beyond one journal block
    // (the crash), nothing over-admitted.
    control.down.store(false, Ordering::SeqCst);
    a.stop().await;
    b.unwrap().stop().await;
    let ledger = market.ledger().await;
    let hits = market.backend.hits() - 3; // the used-up purchase's three calls
    assert!(
        ledger.used >= hits,
        "served calls are all counted: {} < {hits}",
        ledger.used
    );
    assert!(ledger.used <= hits + JOURNAL_BLOCK);
}
