//! The real `marketgate control` binary: a write answered 2xx survives `kill -9` right after.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};

use serde_json::json;

use crate::support::control::*;

/// The binary under test: `$MARKETGATE_BIN`, else the one cargo built for these tests.
fn binary() -> String {
    std::env::var("MARKETGATE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_marketgate").to_owned())
}

/// Starts `marketgate control` on 127.0.0.1:0 and reads the bound address from its JSON log.
fn start(config: &std::path::Path) -> (Child, std::net::SocketAddr) {
    let mut command = Command::new(binary());
    // Every MARKETGATE_* variable is a config override for the binary (MARKETGATE_BIN would
    // be an unknown key): the child gets none.
    for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("MARKETGATE_")) {
        command.env_remove(name);
    }
    let mut child = command
        .args(["control", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the binary starts");
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("the binary logs that it listens")
            .unwrap();
        let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if let Some(listen) = entry["fields"]["listen"].as_str() {
            break listen.parse().unwrap();
        }
    };
    // Keep draining so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

#[tokio::test]
async fn control_binary_write_survives_kill_9() {
    for backend in Backend::all().await {
        let dir = tempfile::tempdir().unwrap();
        let url = backend.fresh_database(dir.path()).await;
        let config = dir.path().join("control.toml");
        std::fs::write(&config, config_toml(&url, "127.0.0.1:0")).unwrap();

        let (mut child, addr) = tokio::task::spawn_blocking({
            let config = config.clone();
            move || start(&config)
        })
        .await
        .unwrap();
        let seller = Api::new(addr, Auth::Token(SELLER_TOKEN.into()));
        let created = seller
            .post(
                &format!("{}/api-groups", mgmt(SELLER_PROJECT)),
                json!({"name": "kill9_group"}),
            )
            .await;
        expect_status("create", &created, 201);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let (mut child, addr) = tokio::task::spawn_blocking(move || start(&config))
            .await
            .unwrap();
        let seller = Api::new(addr, Auth::Token(SELLER_TOKEN.into()));
        let id = created.1["id"].as_str().unwrap();
        let shown = seller
            .get(&format!("{}/api-groups/{id}", mgmt(SELLER_PROJECT)))
            .await;
        child.kill().unwrap();
        child.wait().unwrap();
        expect_status("the write is there after kill -9", &shown, 200);
        assert_eq!(shown.1["name"], "kill9_group");
    }
}
