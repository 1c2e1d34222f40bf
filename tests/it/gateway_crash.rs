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
