//! The real `marketgate control` binary: a write answered 2xx survives `kill -9` right after.

use serde_json::json;

use crate::support::control::*;
use crate::support::process::Process;

/// Starts `marketgate control` on 127.0.0.1:0; returns it and its market API's address.
async fn start(config: &std::path::Path) -> (Process, std::net::SocketAddr) {
    let process = Process::start("control", config, "control plane listening").await;
    let addr = process.addr("listen");
    (process, addr)
}

#[tokio::test]
async fn control_binary_write_survives_kill_9() {
    for backend in Backend::all().await {
        let dir = tempfile::tempdir().unwrap();
        let url = backend.fresh_database(dir.path()).await;
        let config = dir.path().join("control.toml");
        std::fs::write(&config, config_toml(&url, "127.0.0.1:0")).unwrap();

        let (mut child, addr) = start(&config).await;
        let seller = Api::new(addr, Auth::Token(SELLER_TOKEN.into()));
        let created = seller
            .post(
                &format!("{}/api-groups", mgmt(SELLER_PROJECT)),
                json!({"name": "kill9_group"}),
            )
            .await;
        expect_status("create", &created, 201);
        child.kill_9();

        let (mut child, addr) = start(&config).await;
        let seller = Api::new(addr, Auth::Token(SELLER_TOKEN.into()));
        let id = created.1["id"].as_str().unwrap();
        let shown = seller
            .get(&format!("{}/api-groups/{id}", mgmt(SELLER_PROJECT)))
            .await;
        child.kill_9();
        expect_status("the write is there after kill -9", &shown, 200);
        assert_eq!(shown.1["name"], "kill9_group");
    }
}
