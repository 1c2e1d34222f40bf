//! A fleet of real processes, wired as an operator wires them (CONTRACT §1, §5, §7): one
//! `marketgate control` and three `marketgate proxy` binaries that no control-plane config
//! names: each proxy subscribes to the control plane's admin listener for snapshots and
//! leases quota from it over HTTP (`proxy.control_urls`).
//!
//! They share one purchase of Q calls under 64 concurrent buyers while one proxy is killed
//! with SIGKILL mid-run and later restarted on its data directory. The backend must never
//! receive more than Q calls; while the proxy is down its lease stays stranded (granted to no
//! one else); when it is back its journal reports what it served and gives the lease back;
//! and the crash costs the buyer at most one journal block plus the calls in flight on the
//! victim when it died (docs/quota-leases.md). On SQLite and, when it answers, PostgreSQL.
//!
//! The in-process versions of these scenarios (tests/it/leases.rs) cover the ledger's corner
//! cases quickly; this one proves the binaries' own wiring and a real `kill -9`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;

use crate::support::control::{self as ctl, bought_group, config_toml, Api, Auth, Bought};
use crate::support::gateway::{admin_get, request, signed_as, Backend, Buyer, ADMIN_TOKEN};
use crate::support::process::{free_port, Process};

const QUOTA: u64 = 3000;
const CLIENTS: usize = 64;
/// Calls each client offers: 64 × 70 = 4480 for 3000 bought.
const CALLS_PER_CLIENT: usize = 70;
const PROXIES: usize = 3;
/// The proxy that is killed, once the backend has seen [`KILL_AFTER`] calls.
const VICTIM: usize = 1;
const KILL_AFTER: u64 = QUOTA / 3;
const JOURNAL_BLOCK: u64 = 8;
const DOMAIN: &str = "fleet.example.com";
/// How long the fleet may take to agree (snapshot pushed, leases recovered).
const CONVERGE: Duration = Duration::from_secs(20);

/// A `marketgate proxy` process of the fleet: its admin address and data directory outlive
/// the process, so that it can be restarted as the same node.
struct FleetProxy {
    node: String,
    config: std::path::PathBuf,
    process: Process,
}

impl FleetProxy {
    async fn start(dir: &Path, node: &str, admin: SocketAddr, control_admin: SocketAddr) -> Self {
        let data_dir = dir.join(node);
        std::fs::create_dir_all(&data_dir).unwrap();
        let config = dir.join(format!("{node}.toml"));
        std::fs::write(
            &config,
            format!(
                "data_dir = '{}'\n\
                 [gateway]\nlisten = '127.0.0.1:0'\nquota_journal_block = {JOURNAL_BLOCK}\n\
                 [admin]\nlisten = '{admin}'\ntoken = '{ADMIN_TOKEN}'\n\
                 [proxy]\nnode_id = '{node}'\ncontrol_urls = ['http://{control_admin}']\n\
                 [log]\nformat = 'json'\n",
                data_dir.display()
            ),
        )
        .unwrap();
        let process = Process::start("proxy", &config, "proxy listening").await;
        FleetProxy {
            node: node.to_owned(),
            config,
            process,
        }
    }

    /// The same node again, on its data directory and admin address.
    async fn restart(&mut self) {
        self.process = Process::start("proxy", &self.config, "proxy listening").await;
    }

    fn buyer(&self) -> Buyer {
        Buyer::new(self.process.addr("buyers"))
    }
}

/// The control plane process and what the test reads from it.
struct Fleet {
    control: Process,
    proxies: Vec<FleetProxy>,
    bought: Bought,
    backend: Backend,
    _dir: tempfile::TempDir,
}

impl Fleet {
    /// Starts the control plane on `store`, the proxies, and the buyer's purchase; returns
    /// once every proxy serves the snapshot that holds it.
    async fn start(store: &ctl::Backend) -> Fleet {
        let backend = Backend::echo().await;
        let dir = tempfile::tempdir().unwrap();
        let database_url = store.fresh_database(dir.path()).await;
        // A restarted proxy comes back on its own admin address (for the test to find it).
        let admins: Vec<SocketAddr> = (0..PROXIES).map(|_| free_port()).collect();
        // Its own data_dir: one process per data_dir, and tests run side by side.
        let toml = format!(
            "data_dir = '{}'\n{}",
            dir.path().join("control-data").display(),
            config_toml(&database_url, "127.0.0.1:0").replace(
                "token = \"admin-token\"",
                &format!("token = \"{ADMIN_TOKEN}\""),
            )
        );
        let config = dir.path().join("control.toml");
        std::fs::write(&config, toml).unwrap();
        let control = Process::start("control", &config, "control plane listening").await;

        let mut proxies = Vec::new();
        for (n, admin) in admins.iter().enumerate() {
            let node = format!("proxy-{n}");
            proxies.push(FleetProxy::start(dir.path(), &node, *admin, control.addr("admin")).await);
        }
        let bought = bought_group(control.addr("listen"), backend.addr, DOMAIN, QUOTA).await;
        let fleet = Fleet {
            control,
            proxies,
            bought,
            backend,
            _dir: dir,
        };
        let version = fleet.control_version().await;
        for proxy in &fleet.proxies {
            fleet.serves(proxy, version).await;
        }
        fleet
    }

    async fn control_version(&self) -> u64 {
        let answer = admin_get(self.control.addr("admin"), "/v1/snapshot/version", true).await;
        answer.json()["version"].as_u64().expect("a version")
    }

    /// Waits until `proxy` serves `version` or newer (sent to its subscription).
    async fn serves(&self, proxy: &FleetProxy, version: u64) {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let answer = admin_get(proxy.process.addr("admin"), "/v1/snapshot/version", true).await;
            if answer.json()["version"].as_u64() >= Some(version) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} never got version {version}",
                proxy.node
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn call(&self) -> http::Request<http_body_util::Full<Bytes>> {
        signed_as(
            &self.bought.key,
            &self.bought.secret,
            request("GET", DOMAIN, "/call", Bytes::new()),
        )
    }

    /// Calls each node holds, per the control plane's ledger (`GET /v1/proxies`).
    async fn held(&self) -> std::collections::BTreeMap<String, u64> {
        let answer = admin_get(self.control.addr("admin"), "/v1/proxies", true).await;
        assert_eq!(answer.status, 200);
        let leases = answer.json()["leases"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        leases
            .iter()
            .map(|l| {
                let node = l["node_id"].as_str().unwrap().to_owned();
                (node, l["calls_held"].as_u64().unwrap())
            })
            .collect()
    }

    /// The buyer's view of the purchase (market API row 12).
    async fn purchase(&self) -> Value {
        let market = Api::new(
            self.control.addr("listen"),
            Auth::Token(ctl::MARKET_TOKEN.into()),
        )
        .as_domain(ctl::BUYER_DOMAIN);
        let answer = market
            .get(&format!(
                "{}/purchases/{}",
                ctl::market_base(ctl::BUYER_PROJECT),
                self.bought.purchase_id
            ))
            .await;
        ctl::expect_status("buyer's view", &answer, 200);
        answer.1
    }

    /// Calls neither used nor leased, per the control plane.
    async fn unleased(&self) -> u64 {
        let left = self.purchase().await["quota_left"].as_u64().unwrap();
        left.saturating_sub(self.held().await.values().sum())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_binaries_shares_one_purchase_through_a_kill_9() {
    for store in ctl::Backend::all().await {
        fleet_through_a_kill_9_on(&store).await;
    }
}

async fn fleet_through_a_kill_9_on(store: &ctl::Backend) {
    let mut fleet = Fleet::start(store).await;
    let buyers: Arc<Vec<Buyer>> = Arc::new(fleet.proxies.iter().map(FleetProxy::buyer).collect());
    let ok = Arc::new(AtomicU64::new(0));
    // Calls cut off by the kill: taken from the victim's quota, perhaps never forwarded.
    let cut_off = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let requests: Vec<_> = (0..CALLS_PER_CLIENT).map(|_| fleet.call()).collect();
        let (buyers, ok, cut_off) = (buyers.clone(), ok.clone(), cut_off.clone());
        clients.push(tokio::spawn(async move {
            let mut at = c % PROXIES;
            for request in requests {
                // A proxy that is gone refuses the connection: the buyer moves on to the next.
                let answer = loop {
                    match buyers[at].try_send(request.clone()).await {
                        Ok(answer) => break answer,
                        Err(error) => {
                            if !refused(&*error) {
                                cut_off.fetch_add(1, Ordering::SeqCst);
                            }
                            at = (at + 1) % PROXIES;
                        }
                    }
                };
                match answer.status.as_u16() {
                    200 => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    405 => assert_eq!(answer.code(), "APIG.0501", "{:?}", answer.body),
                    // Calls left, but held by another proxy (the victim's stranded lease):
                    // retry later, never "used up".
                    503 => assert_eq!(answer.code(), "APIG.0606", "{:?}", answer.body),
                    other => panic!("unexpected {other}: {:?}", answer.body),
                }
            }
        }));
    }

    // Mid-run, the victim is killed: nothing flushed, nothing reported, its lease stranded.
    let deadline = Instant::now() + CONVERGE;
    while fleet.backend.hits() < KILL_AFTER {
        assert!(Instant::now() < deadline, "the load never got going");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    fleet.proxies[VICTIM].process.kill_9();
    for client in clients {
        client.await.unwrap();
    }
    assert!(
        fleet.backend.hits() <= QUOTA,
        "over-admitted: {}",
        fleet.backend.hits()
    );
    let victim = fleet.proxies[VICTIM].node.clone();
    let stranded = fleet.held().await.get(&victim).copied().unwrap_or(0);
    assert!(stranded > 0, "{victim} held a lease when it was killed");

    // The others drain what they can: the stranded lease is granted to no one else.
    let served = ok.load(Ordering::SeqCst) + drain(&fleet, &[0, 2]).await;
    assert!(
        fleet.backend.hits() <= QUOTA,
        "over-admitted: {}",
        fleet.backend.hits()
    );
    assert_eq!(fleet.held().await.get(&victim).copied(), Some(stranded));

    // The victim comes back on its data directory: its journal is reported (at most one block
    // more than it served, never less) and its lease given back.
    fleet.proxies[VICTIM].restart().await;
    fleet.proxies[VICTIM]
        .process
        .logged("leases recovered from the journal")
        .await;
    assert_eq!(
        fleet.held().await.get(&victim).copied().unwrap_or(0),
        0,
        "the journal gave the stranded lease back"
    );
    let used = fleet.purchase().await["quota_used"].as_u64().unwrap();
    let hits = fleet.backend.hits();
    assert!(
        used >= hits,
        "a served call is never granted again: {used} < {hits}"
    );

    // What it gave back is served by the fleet; never more than bought.
    let served = served + drain(&fleet, &[0, 1, 2]).await;
    for proxy in &mut fleet.proxies {
        proxy.process.terminate();
    }
    let hits = fleet.backend.hits();
    assert!(hits <= QUOTA, "over-admitted: {hits}");
    // The crash costs the buyer at most one journal block, plus the calls that were in
    // flight on the victim (taken; whether they reached the backend it could not record).
    let cut_off = cut_off.load(Ordering::SeqCst);
    assert!(
        hits >= QUOTA - JOURNAL_BLOCK - cut_off,
        "the crash lost more than one journal block and {cut_off} calls cut off: \
         {hits} of {QUOTA} served"
    );
    // Calls in flight on the victim when it died may have reached the backend unanswered.
    assert!(served <= hits);
    let purchase = fleet.purchase().await;
    let used = purchase["quota_used"].as_u64().unwrap();
    assert!(
        (hits..=hits + JOURNAL_BLOCK + cut_off).contains(&used),
        "the ledger counts every served call, and no more than the crash may lose: \
         {used} for {hits}, {cut_off} cut off"
    );
    assert!(
        fleet.held().await.values().all(|held| *held == 0),
        "SIGTERM gives every lease back"
    );
    fleet.control.terminate();
}

/// How many proxies share the purchase in [`a_busy_purchase_is_shared_by_sixteen_proxies`]:
/// 16 as the issue asks, fewer with `MARKETGATE_TEST_FLEET_PROXIES` where the machine bears
/// fewer processes.
fn fleet_size() -> usize {
    std::env::var("MARKETGATE_TEST_FLEET_PROXIES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16)
}

/// Calls of the purchase the fleet shares: far less than 60 s of its traffic (the outage
/// budget each proxy asks for), so the proxies contend for it from the start.
const SHARED_QUOTA: u64 = 10_000;
/// Buyers per proxy, each sending one call after another.
const CLIENTS_PER_PROXY: usize = 2;
/// The first half of the fleet is loaded this long alone, so that it holds all it can get
/// before the second half asks (how the 405s of stop 17 came about).
const HEAD_START: Duration = Duration::from_secs(2);
/// The whole run must end within this.
const SHARED_RUN: Duration = Duration::from_secs(180);

/// 16 proxy processes share one heavily used purchase (docs/quota-leases.md, fair shares and
/// give-back): the first half take what they can for their outage budgets, then the second
/// half ask. No buyer is told "used up" (405 APIG.0501) while calls are left — one is only
/// once at most the calls in flight are left — every call bought is served, and the backend
/// never receives more than bought. A buyer whose proxy waited for calls being moved to it
/// longer than the refill wait is answered 503 APIG.0606 and retries; those are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_purchase_is_shared_by_sixteen_proxies() {
    let size = fleet_size();
    let clients = size * CLIENTS_PER_PROXY;
    let backend = Backend::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let database_url = ctl::Backend::Sqlite.fresh_database(dir.path()).await;
    let control = control_process(dir.path(), &database_url, "").await;
    let control_admin = control.addr("admin");
    let bought = bought_group(control.addr("listen"), backend.addr, DOMAIN, SHARED_QUOTA).await;
    let mut proxies = Vec::new();
    for n in 0..size {
        let node = format!("sharer-{n}");
        proxies.push(FleetProxy::start(dir.path(), &node, free_port(), control_admin).await);
    }
    let call = move || {
        signed_as(
            &bought.key,
            &bought.secret,
            request("GET", DOMAIN, "/call", Bytes::new()),
        )
    };
    for proxy in &proxies {
        let deadline = Instant::now() + CONVERGE;
        while proxy.buyer().send(call()).await.status != 200 {
            assert!(Instant::now() < deadline, "{} never served", proxy.node);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    let ok = Arc::new(AtomicU64::new(size as u64));
    // Backend hits at each 503 APIG.0606 (calls being moved to the proxy took longer than
    // the refill wait): when in the run they happen.
    let retried_at = Arc::new(std::sync::Mutex::new(Vec::new()));
    // Backend hits at each 405: it is right only once at most the calls in flight are left.
    let used_up_at = Arc::new(std::sync::Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let n = c % size;
        let buyer = proxies[n].buyer();
        let (ok, retried_at, used_up_at) = (ok.clone(), retried_at.clone(), used_up_at.clone());
        let hits = backend.hits.clone();
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            if n >= size / 2 {
                tokio::time::sleep(HEAD_START).await;
            }
            loop {
                assert!(started.elapsed() < SHARED_RUN, "the purchase never ran out");
                let answer = buyer.send(call()).await;
                match (answer.status.as_u16(), answer.code().as_str()) {
                    (200, _) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    (405, "APIG.0501") => {
                        used_up_at.lock().unwrap().push(hits.load(Ordering::SeqCst));
                        return;
                    }
                    (503, "APIG.0606") => {
                        retried_at.lock().unwrap().push(hits.load(Ordering::SeqCst));
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    (status, _) => panic!("unexpected {status}: {:?}", answer.body),
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed();
    let hits = backend.hits();
    let used_up_at = used_up_at.lock().unwrap().clone();
    let mut retried_at = retried_at.lock().unwrap().clone();
    retried_at.sort_unstable();
    let early = used_up_at
        .iter()
        .filter(|at| **at + (clients as u64) < SHARED_QUOTA)
        .count();
    eprintln!(
        "{size} proxies, {clients} buyers, Q = {SHARED_QUOTA}: {hits} served in {elapsed:?}, \
         {} answered 405 (the earliest at {} backend hits, {early} while more than the calls \
         in flight were left), {} answered 503 APIG.0606 and retried (at backend hits \
         {retried_at:?})",
        used_up_at.len(),
        used_up_at.iter().min().copied().unwrap_or(0),
        retried_at.len()
    );
    assert!(hits <= SHARED_QUOTA, "over-admitted: {hits}");
    assert_eq!(
        early, 0,
        "told 'used up' while calls were left: {used_up_at:?}"
    );
    assert_eq!(hits, SHARED_QUOTA, "every call bought was served");
    assert_eq!(ok.load(Ordering::SeqCst), hits);
    for proxy in &mut proxies {
        proxy.process.terminate();
    }
}

/// Two proxy processes claim one `node_id`, each on its own data directory (a copied config,
/// a cloned VM): the second is refused snapshots and leases with an error naming both
/// incarnations, and logs it; it never serves and never touches the first one's lease; the
/// backend never receives more than bought.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_with_one_node_id_one_is_refused() {
    const BOUGHT: u64 = 300;
    let backend = Backend::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let database_url = ctl::Backend::Sqlite.fresh_database(dir.path()).await;
    let control = control_process(dir.path(), &database_url, "").await;
    let control_admin = control.addr("admin");
    let bought = bought_group(control.addr("listen"), backend.addr, DOMAIN, BOUGHT).await;
    let call = || {
        signed_as(
            &bought.key,
            &bought.secret,
            request("GET", DOMAIN, "/call", Bytes::new()),
        )
    };
    let (first_dir, second_dir) = (dir.path().join("first"), dir.path().join("second"));
    std::fs::create_dir_all(&first_dir).unwrap();
    std::fs::create_dir_all(&second_dir).unwrap();
    let mut first = FleetProxy::start(&first_dir, "twin", free_port(), control_admin).await;
    let deadline = Instant::now() + CONVERGE;
    while first.buyer().send(call()).await.status != 200 {
        assert!(Instant::now() < deadline, "the first never served");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut second = FleetProxy::start(&second_dir, "twin", free_port(), control_admin).await;
    let refusal = "the control plane refuses this proxy's node id";
    second.process.logged(refusal).await;
    let incarnation = |dir: &Path| {
        let state: Value =
            serde_json::from_slice(&std::fs::read(dir.join("twin/lease-state.json")).unwrap())
                .unwrap();
        state["incarnation"].as_str().unwrap().to_owned()
    };
    let (held_by, claimed_by) = (incarnation(&first_dir), incarnation(&second_dir));
    let records = second.process.records();
    let reason = records
        .iter()
        .find(|r| r["fields"]["message"] == refusal)
        .and_then(|r| r["fields"]["reason"].as_str())
        .unwrap();
    assert!(
        reason.contains(&held_by) && reason.contains(&claimed_by),
        "the refusal names both incarnations ({held_by}, {claimed_by}): {reason}"
    );

    // Both are called until the first has served everything bought: the second never
    // serves (no snapshot, no lease), the first serves exactly what was bought.
    let mut served = 1;
    loop {
        let answer = second.buyer().send(call()).await;
        assert_eq!(
            (answer.status.as_u16(), answer.code().as_str()),
            (503, "APIG.0606"),
            "{:?}",
            answer.body
        );
        let answer = first.buyer().send(call()).await;
        match (answer.status.as_u16(), answer.code().as_str()) {
            (200, _) => served += 1,
            (405, "APIG.0501") => break,
            (status, _) => panic!("unexpected {status}: {:?}", answer.body),
        }
        assert!(served <= BOUGHT, "over-admitted");
    }
    assert_eq!(served, BOUGHT);
    assert_eq!(
        backend.hits(),
        BOUGHT,
        "the backend never past what was bought"
    );
    assert_eq!(
        second.process.count_logged(refusal),
        1,
        "logged once, not per attempt"
    );
    let answer = admin_get(control_admin, "/v1/proxies", true).await;
    let leases = answer.json()["leases"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        leases.iter().filter(|l| l["node_id"] == "twin").count() <= 1,
        "one lease for the node id: {leases:?}"
    );
    second.process.terminate();
    first.process.terminate();
}

/// Starts `marketgate control` on `database_url` with its own data directory under `dir`,
/// the tests' admin token and `control_extra` keys in its `[control]` table.
async fn control_process(dir: &Path, database_url: &str, control_extra: &str) -> Process {
    let toml = format!("data_dir = '{}'\n", dir.join("control-data").display())
        + &config_toml(database_url, "127.0.0.1:0")
            .replace(
                "token = \"admin-token\"",
                &format!("token = \"{ADMIN_TOKEN}\""),
            )
            .replacen("[control]\n", &format!("[control]\n{control_extra}"), 1);
    let config = dir.join("control.toml");
    std::fs::write(&config, toml).unwrap();
    Process::start("control", &config, "control plane listening").await
}

/// Calls the proxies at `nodes` in turn until a whole round serves nothing, the control plane
/// has nothing left to lease and these proxies hold nothing in its ledger (what is left is a
/// killed proxy's stranded lease); returns the calls served.
///
/// "Nothing left to lease" alone is not enough: a call that found its cell dry is answered 503
/// once the refill wait (500 ms) is over, and on a loaded machine the refill it asked for can
/// commit just after, leaving calls granted to a proxy that no round has served yet.
async fn drain(fleet: &Fleet, nodes: &[usize]) -> u64 {
    let mut served = 0;
    let deadline = Instant::now() + CONVERGE;
    loop {
        let mut round = 0;
        for &n in nodes {
            let buyer = fleet.proxies[n].buyer();
            while buyer.send(fleet.call()).await.status == 200 {
                round += 1;
            }
        }
        served += round;
        let held = fleet.held().await;
        let held_here: u64 = nodes
            .iter()
            .filter_map(|&n| held.get(&fleet.proxies[n].node))
            .sum();
        let unleased = fleet.unleased().await;
        if round == 0 && unleased == 0 && held_here == 0 {
            return served;
        }
        assert!(
            Instant::now() < deadline,
            "the fleet never ran dry: {unleased} unleased, held {held:?}"
        );
    }
}

/// Was the call refused before it was sent (nothing listens there any more)?
fn refused(error: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    error
        .downcast_ref::<hyper_util::client::legacy::Error>()
        .is_some_and(|e| e.is_connect())
}

/// How long every control plane is down in [`a_fleet_joins_by_itself_and_rides_out_an_outage`]:
/// 60 s as the issue asks, shorter with `MARKETGATE_TEST_OUTAGE_SECS` while developing.
fn outage() -> Duration {
    Duration::from_secs(
        std::env::var("MARKETGATE_TEST_OUTAGE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    )
}

/// A control plane and three proxies that no config names, all serving within a second of
/// start; a fourth joins under load; then the control plane is killed and stays down for
/// [`outage`] under steady load: no buyer with calls left is refused, and the idle proxy uses
/// under 2% of a core. Then a proxy stopped for good leaves the list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_joins_by_itself_and_rides_out_an_outage() {
    let backend = Backend::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let store = ctl::Backend::Sqlite;
    let database_url = store.fresh_database(dir.path()).await;
    let control = control_process(dir.path(), &database_url, "proxy_expiry_secs = 3\n").await;
    let control_admin = control.addr("admin");
    let bought = bought_group(control.addr("listen"), backend.addr, DOMAIN, 1_000_000_000).await;

    let mut proxies = Vec::new();
    for n in 0..3 {
        proxies.push(joined(dir.path(), &format!("joiner-{n}"), control_admin).await);
    }
    let call = move || {
        signed_as(
            &bought.key,
            &bought.secret,
            request("GET", DOMAIN, "/call", Bytes::new()),
        )
    };
    // Each proxy serves the purchase (its snapshot holds it).
    for proxy in &proxies {
        let deadline = Instant::now() + CONVERGE;
        while proxy.buyer().send(call()).await.status != 200 {
            assert!(Instant::now() < deadline, "{} never served", proxy.node);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    // Steady load on the three (40 calls/s each).
    let refusals = Arc::new(AtomicU64::new(0));
    let served = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..6 {
        let buyer = proxies[c % 3].buyer();
        let requests: Vec<_> = (0..64).map(|_| call()).collect();
        let (refusals, served, stop) = (refusals.clone(), served.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            // Calls sent on a fixed schedule whether or not the last one was answered (an open
            // loop): the offered rate is 20 calls/s per client whatever the machine's load does
            // to latency, so the rate the leases were sized on before the outage is the rate
            // during it ("steady load"). The rate is one a loaded 2-core machine sustains in
            // debug builds: with one call in flight per client at 50/s, the calls answered per
            // second followed the machine's load (12 816 in a 60 s outage, 213/s for 300/s
            // offered, during a full-suite run), and when that load fell mid-outage the rate
            // rose past what the leases were sized on: 163 refused.
            let mut schedule = tokio::time::interval(Duration::from_millis(50));
            schedule.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut in_flight = tokio::task::JoinSet::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                schedule.tick().await;
                while let Some(answered) = in_flight.try_join_next() {
                    answered.unwrap();
                }
                let (buyer, request) = (buyer.clone(), requests[i % requests.len()].clone());
                let (refusals, served) = (refusals.clone(), served.clone());
                i += 1;
                in_flight.spawn(async move {
                    let answer = buyer.send(request).await;
                    if answer.status == 200 {
                        served.fetch_add(1, Ordering::SeqCst);
                    } else {
                        refusals.fetch_add(1, Ordering::SeqCst);
                        eprintln!("refused: {} {:?}", answer.status, answer.body);
                    }
                });
            }
            while let Some(answered) = in_flight.join_next().await {
                answered.unwrap();
            }
        }));
    }
    // A fourth joins under load (and stays idle); a fifth joins and dies: it leaves the list
    // once silent for control.proxy_expiry_secs.
    proxies.push(joined(dir.path(), "joiner-3", control_admin).await);
    let mut gone = joined(dir.path(), "joiner-gone", control_admin).await;
    assert!(in_touch(control_admin)
        .await
        .contains(&"joiner-gone".to_owned()));
    gone.process.kill_9();
    let deadline = Instant::now() + CONVERGE;
    while in_touch(control_admin)
        .await
        .contains(&"joiner-gone".to_owned())
    {
        assert!(
            Instant::now() < deadline,
            "a dead proxy never left the list"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let listed = in_touch(control_admin).await;
    assert_eq!(listed, ["joiner-0", "joiner-1", "joiner-2", "joiner-3"]);
    // Every control plane gone.
    let mut control = control;
    control.kill_9();
    let idle = &proxies[3].process;
    let (cpu_before, at) = (idle.cpu_time(), Instant::now());
    let served_before = served.load(Ordering::SeqCst);
    tokio::time::sleep(outage()).await;
    let idle_cpu = (idle.cpu_time() - cpu_before).as_secs_f64() / at.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.await.unwrap();
    }
    let during = served.load(Ordering::SeqCst) - served_before;
    eprintln!(
        "outage {:?}: {during} calls served, {} refused, idle proxy CPU {:.2}% of a core",
        outage(),
        refusals.load(Ordering::SeqCst),
        idle_cpu * 100.0
    );
    assert!(during > 0);
    assert_eq!(
        refusals.load(Ordering::SeqCst),
        0,
        "no buyer with calls left refused"
    );
    assert!(
        idle_cpu < 0.02,
        "idle proxy used {:.2}% of a core",
        idle_cpu * 100.0
    );
    for proxy in &mut proxies {
        proxy.process.terminate();
    }
}

/// Starts a proxy named `node` subscribed to `control_admin` and waits until it is ready,
/// which must be within a second of its start.
async fn joined(dir: &Path, node: &str, control_admin: SocketAddr) -> FleetProxy {
    let started = Instant::now();
    let spawned = std::time::SystemTime::now();
    let proxy = FleetProxy::start(dir, node, free_port(), control_admin).await;
    let admin = proxy.process.addr("admin");
    while admin_get(admin, "/readyz", false).await.status != 200 {
        assert!(started.elapsed() < CONVERGE, "{node} never ready");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ready = started.elapsed();
    eprintln!("{node}: serving {ready:?} after its start");
    assert!(
        ready < Duration::from_secs(1),
        "{node} ready only after {ready:?}; its log, in ms after its spawn: {}",
        timeline(&proxy.process, spawned)
    );
    proxy
}

/// Where a start spent its time: each of `process`'s log records so far (its message, cut
/// short) at its own timestamp, in milliseconds after `spawned`.
fn timeline(process: &Process, spawned: std::time::SystemTime) -> String {
    let spawned = time::OffsetDateTime::from(spawned);
    process
        .records()
        .iter()
        .map(|record| {
            let at = record["timestamp"].as_str().and_then(|t| {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
            });
            let message: String = record["fields"]["message"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(40)
                .collect();
            match at {
                Some(at) => format!("{} {message}", (at - spawned).whole_milliseconds()),
                None => format!("? {message}"),
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The node ids `GET /v1/proxies` lists on the control plane's admin listener.
async fn in_touch(control_admin: SocketAddr) -> Vec<String> {
    let answer = admin_get(control_admin, "/v1/proxies", true).await;
    answer.json()["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["node_id"].as_str().unwrap().to_owned())
        .collect()
}
