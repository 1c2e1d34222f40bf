//! The real binary killed with SIGKILL: a restarted proxy never grants a served call again,
//! and loses at most `gateway.quota_journal_block` calls.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use crate::support::gateway::*;

const BLOCK: u64 = 8;
const QUOTA: u64 = 100;

struct Proxy {
    child: Child,
    buyers: SocketAddr,
    admin: SocketAddr,
}

/// Starts `marketgate proxy` and waits for the log line naming its listeners.
fn start(dir: &std::path::Path) -> Proxy {
    let config = dir.join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = '{}'\n[gateway]\nlisten = '127.0.0.1:0'\nquota_journal_block = {BLOCK}\n[admin]\nlisten = '127.0.0.1:0'\ntoken = '{ADMIN_TOKEN}'\n[log]\nformat = 'json'\n",
            dir.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_marketgate"))
        .args(["proxy", "--config"])
        .arg(&config)
        .env_clear()
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let listening = loop {
        let Some(Ok(line)) = lines.next() else {
            break None;
        };
        let record: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if record["fields"]["message"] == "proxy listening" {
            let field = |name: &str| record["fields"][name].as_str()?.parse().ok();
            break field("buyers").zip(field("admin"));
        }
    };
    match listening {
        Some((buyers, admin)) => {
            std::thread::spawn(move || for _ in lines {});
            Proxy {
                child,
                buyers,
                admin,
            }
        }
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the proxy exited before listening");
        }
    }
}

impl Proxy {
    /// SIGKILL, no chance to flush.
    fn kill_9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_never_grants_a_served_call_again() {
    let backend = Backend::echo().await;
    let dir = tempfile::tempdir().unwrap();

    let mut first = start(dir.path());
    let answer = push(
        first.admin,
        serde_json::to_vec(&market(1, backend.addr, Some(QUOTA))).unwrap(),
        None,
    )
    .await;
    assert_eq!(answer.status, 200);
    let buyer = Buyer::new(first.buyers);
    for _ in 0..21 {
        assert_eq!(
            buyer.signed("GET", MARKET, "/v1/echo/1", b"").await.status,
            200
        );
    }
    first.kill_9();

    // The restarted proxy serves from the snapshot on disk, before any push.
    let mut second = start(dir.path());
    let buyer = Buyer::new(second.buyers);
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
