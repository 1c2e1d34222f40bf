//! `marketgate serve` as a real process after an operator restored an older `marketgate.db`
//! (docs/operations.md §9): its data plane's `snapshot.json` is newer than the store. The
//! data plane must come back to the store's market — a new purchase served, a delist
//! enforced — and say so once; pushes to its admin listener are refused; and a store removed
//! while `data_dir` still holds its state is an error at start that names the file.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;

use crate::support::control::{
    bought_group, expect_status, market_base, mgmt, write_serve_config, Api, Auth, BUYER_DOMAIN,
    BUYER_PROJECT, MARKET_TOKEN, SELLER_DOMAIN, SELLER_PROJECT, SELLER_TOKEN,
};
use crate::support::gateway::{admin_get, push, request, signed_as, Answer, Backend, Buyer};
use crate::support::process::Process;

const DOMAIN: &str = "restored.example.com";
const READY: &str = "marketgate serve: both planes listening";
/// How long a change may take to reach the in-process data plane before the test fails.
const ENFORCED_WITHIN: Duration = Duration::from_secs(10);

async fn call(buyers: std::net::SocketAddr, key: &str, secret: &str) -> Answer {
    Buyer::new(buyers)
        .send(signed_as(
            key,
            secret,
            request("GET", DOMAIN, "/call", Bytes::new()),
        ))
        .await
}

/// Calls until the answer has `status` (and `code`, if given); fails after
/// [`ENFORCED_WITHIN`] naming the last answer.
async fn until(
    buyers: std::net::SocketAddr,
    key: &str,
    secret: &str,
    status: u16,
    code: Option<&str>,
) {
    let deadline = Instant::now() + ENFORCED_WITHIN;
    loop {
        let answer = call(buyers, key, secret).await;
        if answer.status == status && code.is_none_or(|code| answer.code() == code) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still {} {:?} after {ENFORCED_WITHIN:?}, waiting for {status} {code:?}",
            answer.status,
            answer.body
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the data plane serves `version` or later.
async fn served_version_reaches(admin: std::net::SocketAddr, version: u64) {
    let deadline = Instant::now() + ENFORCED_WITHIN;
    loop {
        let answer = admin_get(admin, "/v1/snapshot/version", true).await;
        assert_eq!(answer.status, 200);
        if answer.json()["version"].as_u64() >= Some(version) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the data plane never reached {version}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_follows_a_restored_store_and_refuses_a_missing_one() {
    let backend = Backend::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_serve_config(dir.path(), dir.path(), "");
    let db = dir.path().join("marketgate.db");
    let backup = dir.path().join("backup.db");

    let mut serve = Process::start("serve", &config, READY).await;
    let control = serve.addr("control");
    let bought = bought_group(control, backend.addr, DOMAIN, 1_000).await;
    until(serve.addr("buyers"), &bought.key, &bought.secret, 200, None).await;

    // The operator's backup (an online, consistent copy, as `sqlite3 .backup` makes).
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute("VACUUM INTO ?1", [backup.to_str().unwrap()])
        .unwrap();
    // Changes after the backup: the data plane's snapshot moves past the backup's version.
    let seller = Api::new(control, Auth::Token(SELLER_TOKEN.into()));
    for i in 0..5 {
        let group = seller
            .post(
                &format!("{}/api-groups", mgmt(SELLER_PROJECT)),
                json!({"name": format!("after_backup_{i}")}),
            )
            .await;
        expect_status("a change after the backup", &group, 201);
    }
    let backup_version: u64 = rusqlite::Connection::open(&backup)
        .unwrap()
        .query_row(
            "SELECT value FROM meta WHERE key = 'snapshot_version'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    served_version_reaches(serve.addr("admin"), backup_version + 5).await;
    serve.terminate();

    // Restore (docs/operations.md §9 step 2) and start again.
    std::fs::copy(&backup, &db).unwrap();
    for side in ["marketgate.db-wal", "marketgate.db-shm"] {
        let _ = std::fs::remove_file(dir.path().join(side));
    }
    let serve = Process::start("serve", &config, READY).await;
    let (control, buyers, admin) = (
        serve.addr("control"),
        serve.addr("buyers"),
        serve.addr("admin"),
    );

    // A purchase made on the restored store is served (it was 401: the data plane kept its
    // own snapshot, which does not know the new app).
    let market = Api::new(control, Auth::Token(MARKET_TOKEN.into()));
    let group_id = bought.group_id.clone();
    let after = market
        .as_domain(BUYER_DOMAIN)
        .post(
            &format!("{}/api-groups/purchase", market_base(BUYER_PROJECT)),
            json!({"order_id": "after-restore", "group_id": group_id,
                   "start_time": "1700000000", "expire_time": "4102444800",
                   "req_quota": "1000", "order_type": "1"}),
        )
        .await;
    expect_status("purchase after the restore", &after, 201);
    let (key, secret) = (
        after.1["app_key"].as_str().unwrap().to_owned(),
        after.1["app_secret"].as_str().unwrap().to_owned(),
    );
    until(buyers, &key, &secret, 200, None).await;

    // The delist is enforced for both buyers (before the fix: 204, and 200 for ever).
    let delist = market
        .as_domain(SELLER_DOMAIN)
        .delete(&format!(
            "{}/api-groups/delist/{group_id}",
            market_base(SELLER_PROJECT)
        ))
        .await;
    expect_status("delist", &delist, 204);
    until(buyers, &bought.key, &bought.secret, 403, Some("APIG.0306")).await;
    until(buyers, &key, &secret, 403, Some("APIG.0306")).await;
    // A push to serve's data plane, whatever its version, is refused: only the store makes
    // what it serves.
    let foreign = serde_json::to_vec(&json!({"version": 1_000_000})).unwrap();
    assert_eq!(push(admin, foreign, None).await.status, 409);

    // It was said, once.
    let said = "the data plane's snapshot was not made by this store (restored from an older backup?): serving the store's market from now on, at a version past the data plane's";
    serve.logged(said).await;
    assert_eq!(serve.count_logged(said), 1);
    let mut serve = serve;
    serve.terminate();

    // The store removed: an error that names it, and nothing created in its place.
    std::fs::remove_file(&db).unwrap();
    let (status, stderr) = Process::run_to_exit("serve", &config).await;
    assert!(!status.success(), "serve started without its store");
    assert!(
        stderr.contains(db.to_str().unwrap()) && stderr.contains("missing or empty"),
        "{stderr}"
    );
    assert!(
        !db.exists(),
        "an empty store was created in place of the lost one"
    );
}

/// A proxy that holds a version its control plane did not make (here pushed to it directly,
/// as a proxy restored from another store's disk would hold one) is not left there: the
/// control plane moves its version past the proxy's and the proxy serves the market again —
/// a purchase made afterwards is served, a delist refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_ahead_of_its_control_plane_is_brought_back() {
    use crate::support::planes::{call, first_refusal, Planes, CONVERGE};

    let planes = Planes::start(1).await;
    let gid = planes.listed_group("ahead", "ahead.example.com").await;
    let version = planes.converged().await;
    let proxy = &planes.proxies[0];

    let mut foreign = planes.cp.snapshot().await;
    foreign.version = version + 1_000;
    foreign.groups.clear();
    foreign.purchases.clear();
    foreign.apps.clear();
    foreign.app_auths.clear();
    let answer = push(proxy.admin, serde_json::to_vec(&foreign).unwrap(), None).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(proxy.version(), Some(version + 1_000));

    // The next market change reaches the proxy, at a version past the one it held.
    let (key, secret) = planes.buy(&gid, "after-foreign-push", 1_000).await;
    let deadline = Instant::now() + CONVERGE;
    loop {
        let answer = call(&proxy.buyer(), "ahead.example.com", &key, &secret).await;
        if answer.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy stayed on the foreign snapshot: {} {:?}, proxy at {:?}, control at {}",
            answer.status,
            answer.body,
            proxy.version(),
            planes.cp.version()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(planes.cp.version() > version + 1_000);
    let converged = planes.converged().await;
    assert!(converged > version + 1_000);

    let refused = tokio::spawn(first_refusal(
        proxy.buyer(),
        "ahead.example.com".into(),
        key,
        secret,
    ));
    planes.delist(&gid).await;
    refused.await.unwrap();
}
