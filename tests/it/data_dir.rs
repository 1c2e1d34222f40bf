//! One process per `data_dir`, with real processes: a second `serve`, `proxy` or `control`
//! (on SQLite) started on a live `data_dir` refuses before it touches anything there, naming
//! the holder's pid; the first one's buyer's `quota_used` stays exact across its clean
//! restart; and every file it keeps there is 0600 in a 0700 directory.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::support::control::{self as ctl, bought_group, config_toml, Api, Auth, Bought};
use crate::support::gateway::{request, signed_as, Backend, Buyer};
use crate::support::process::{refused, Process};

const DOMAIN: &str = "lock.market.test";
const SERVE_READY: &str = "marketgate serve: both planes listening";

fn serve_config(dir: &Path, data: &Path) -> std::path::PathBuf {
    let database_url = format!("sqlite://{}", data.join("marketgate.db").display());
    let toml = format!(
        "data_dir = '{}'\n{}[gateway]\nlisten = '127.0.0.1:0'\n",
        data.display(),
        config_toml(&database_url, "127.0.0.1:0")
    );
    let path = dir.join("serve.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

/// One signed call, retried while the data plane has not yet applied the purchase (404/401
/// answers take no call); returns once one call was served.
async fn call_once(buyers: std::net::SocketAddr, bought: &Bought) {
    let buyer = Buyer::new(buyers);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let call = signed_as(
            &bought.key,
            &bought.secret,
            request("GET", DOMAIN, "/call", Bytes::new()),
        );
        let answer = buyer.send(call).await;
        if answer.status == 200 {
            return;
        }
        assert!(
            matches!(answer.status.as_u16(), 401 | 404),
            "unexpected {answer:?}"
        );
        assert!(
            Instant::now() < deadline,
            "the purchase never reached the data plane"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn quota_used(control: std::net::SocketAddr, purchase_id: &str) -> u64 {
    let market =
        Api::new(control, Auth::Token(ctl::MARKET_TOKEN.into())).as_domain(ctl::BUYER_DOMAIN);
    let answer = market
        .get(&format!(
            "{}/purchases/{purchase_id}",
            ctl::market_base(ctl::BUYER_PROJECT)
        ))
        .await;
    ctl::expect_status("buyer's view", &answer, 200);
    answer.1["quota_used"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_a_live_data_dir_refuses_and_no_call_is_lost() {
    let backend = Backend::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = serve_config(dir.path(), &data);
    let mut first = Process::start("serve", &config, SERVE_READY).await;
    let bought = bought_group(first.addr("control"), backend.addr, DOMAIN, 10).await;
    call_once(first.addr("buyers"), &bought).await;

    // Every role refuses, naming the holder.
    let holder = format!("pid {}", first.pid());
    let said = refused("serve", &config).await;
    assert!(
        said.contains("is in use by another marketgate process"),
        "{said}"
    );
    assert!(said.contains(&holder), "{said}");
    let proxy = dir.path().join("proxy.toml");
    std::fs::write(
        &proxy,
        format!(
            "data_dir = '{}'\n[gateway]\nlisten = '127.0.0.1:0'\n[admin]\nlisten = '127.0.0.1:0'\ntoken = 'admin-token'\n",
            data.display()
        ),
    )
    .unwrap();
    let said = refused("proxy", &proxy).await;
    assert!(said.contains(&holder), "{said}");
    let database_url = format!("sqlite://{}", data.join("marketgate.db").display());
    let control = dir.path().join("control.toml");
    std::fs::write(
        &control,
        format!(
            "data_dir = '{}'\n{}",
            data.display(),
            config_toml(&database_url, "127.0.0.1:0")
        ),
    )
    .unwrap();
    let said = refused("control", &control).await;
    assert!(said.contains(&holder), "{said}");

    // The first one never noticed: its clean restart reports exactly the one call served.
    call_once(first.addr("buyers"), &bought).await;
    first.terminate();
    let restarted = Process::start("serve", &config, SERVE_READY).await;
    assert_eq!(
        quota_used(restarted.addr("control"), &bought.purchase_id).await,
        2
    );
    assert_eq!(backend.hits(), 2);

    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "data_dir");
    for entry in std::fs::read_dir(&data).unwrap().flatten() {
        if entry.file_type().unwrap().is_file() {
            assert_eq!(mode(&entry.path()), 0o600, "{}", entry.path().display());
        }
    }
}
