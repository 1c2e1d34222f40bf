//! The real binary killed with SIGKILL: a restarted proxy never grants a served call again,
//! and loses at most `gateway.quota_journal_block` calls (the buyer here calls one at a time,
//! so no call is in flight at the kill).

use crate::support::gateway::*;
use crate::support::process::Process;

const BLOCK: u64 = 8;
const QUOTA: u64 = 100;

/// Starts `marketgate proxy` in `dir` (local quota: no control plane).
async fn start(dir: &std::path::Path) -> Process {
    let config = dir.join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = '{}'\n[gateway]\nlisten = '127.0.0.1:0'\nquota_journal_block = {BLOCK}\n[admin]\nlisten = '127.0.0.1:0'\ntoken = '{ADMIN_TOKEN}'\n[log]\nformat = 'json'\n",
            dir.display()
        ),
    )
    .unwrap();
    Process::start("proxy", &config, "proxy listening").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_never_grants_a_served_call_again() {
    let backend = Backend::echo().await;
    let dir = tempfile::tempdir().unwrap();

    let mut first = start(dir.path()).await;
    let answer = push(
        first.addr("admin"),
        serde_json::to_vec(&market(1, backend.addr, Some(QUOTA))).unwrap(),
        None,
    )
    .await;
    assert_eq!(answer.status, 200);
    let buyer = Buyer::new(first.addr("buyers"));
    for _ in 0..21 {
        assert_eq!(
            buyer.signed("GET", MARKET, "/v1/echo/1", b"").await.status,
            200
        );
    }
    first.kill_9();

    // The restarted proxy serves from the snapshot on disk, before any push.
    let mut second = start(dir.path()).await;
    let buyer = Buyer::new(second.addr("buyers"));
    let mut granted = 0;
    loop {
        let answer = buyer.signed("GET", MARKET, "/v1/echo/1", b"").await;
        match answer.status.as_u16() {
            200 => granted += 1,
            405 => break,
            other => panic!("unexpected {other}"),
        }
    }
    second.kill_9();
    assert!(
        backend.hits() <= QUOTA,
        "served {} of {QUOTA}",
        backend.hits()
    );
    assert!(
        backend.hits() >= QUOTA - BLOCK,
        "lost more than one journal block: served {}",
        backend.hits()
    );
    assert_eq!(backend.hits(), 21 + granted);
}

/// Issue 10: a kill -9 under load strands at most about [`JOURNAL_LEAD`] of a purchase's
/// traffic (its unspent reservation) plus the calls in flight. Before reservations followed
/// the rate, ~540 calls were stranded at 350 req/s (1.5 s of traffic). Clients call as fast
/// as the proxy answers; the bound is measured against the rate they got, with a factor of
/// two for a rate that moves under a busy machine.
///
/// [`JOURNAL_LEAD`]: marketgate::gateway::quota::JOURNAL_LEAD
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_strands_about_a_quarter_second_of_traffic() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    const CLIENTS: u64 = 8;
    const BIG_QUOTA: u64 = 1_000_000;
    let backend = Backend::echo().await;
    let dir = tempfile::tempdir().unwrap();
    // The default quota_journal_block (4096): the rate, not the cap, sizes the step.
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = '{}'\n[gateway]\nlisten = '127.0.0.1:0'\n[admin]\nlisten = '127.0.0.1:0'\ntoken = '{ADMIN_TOKEN}'\n[log]\nformat = 'json'\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let mut first = Process::start("proxy", &config, "proxy listening").await;
    let answer = push(
        first.addr("admin"),
        serde_json::to_vec(&market(1, backend.addr, Some(BIG_QUOTA))).unwrap(),
        None,
    )
    .await;
    assert_eq!(answer.status, 200);
    let buyer = Buyer::new(first.addr("buyers"));
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (buyer, stop, answered) = (buyer.clone(), stop.clone(), answered.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let answer = buyer.signed("GET", MARKET, "/v1/echo/1", b"").await;
                if answer.status != 200 {
                    break;
                }
                answered.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Two seconds of load; the rate over the last second is the one the step follows.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (from, at) = (answered.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rate = (answered.load(Ordering::Relaxed) - from) as f64 / at.elapsed().as_secs_f64();
    first.kill_9();
    stop.store(true, Ordering::Relaxed);
    // Clients whose call was in flight at the kill end by panicking in `Buyer::signed` (it
    // expects an answer): their join errors are that, and ignored.
    for client in clients {
        let _ = client.await;
    }
    let served = backend.hits();

    let second = Process::start("proxy", &config, "proxy listening").await;
    let usage = admin_get(second.addr("admin"), "/v1/usage", true)
        .await
        .json();
    let used = usage["purchases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["purchase_id"] == "p1")
        .map(|p| p["used"].as_u64().unwrap())
        .unwrap();
    assert!(
        used >= served,
        "a served call granted again: used {used}, served {served}"
    );
    let stranded = used - served;
    let lead = marketgate::gateway::quota::JOURNAL_LEAD.as_secs_f64();
    let bound = (2.0 * rate * lead).max(2.0 * marketgate::gateway::quota::MIN_JOURNAL_STEP as f64)
        as u64
        + CLIENTS;
    eprintln!(
        "kill -9 under load: {rate:.0} calls/s, {served} served, {stranded} stranded \
         ({:.0} ms of traffic; bound {bound}); load {}",
        stranded as f64 / rate.max(1.0) * 1000.0,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    assert!(
        stranded <= bound,
        "{stranded} calls stranded at {rate:.0} calls/s (bound {bound})"
    );
}
