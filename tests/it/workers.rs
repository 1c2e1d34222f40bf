//! The worker model (`gateway.workers`): several current-thread runtimes, each accepting on
//! its own `SO_REUSEPORT` socket of one address, sharing one snapshot and one set of quota
//! cells.

use marketgate::gateway::{Gateway, Listeners};
use marketgate::shutdown::ShutdownTrigger;

use crate::support::gateway::*;

/// The calls bought in the shared-purchase test.
const QUOTA: u64 = 120;

/// Two workers accept on one port and take from one purchase: every connection lands on one
/// of them, both get some, and exactly the calls bought pass — no more, no fewer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_accept_on_one_port_and_share_one_purchase_exactly() {
    let backend = Backend::echo().await;
    let dir = tempfile::tempdir().unwrap();
    // The extra lines follow the helper's `[admin]` table: its listen address first.
    let config = config(
        dir.path(),
        "listen = '127.0.0.1:0'\n[gateway]\nlisten = '127.0.0.1:0'\nworkers = 2\n",
    );
    let gateway = Gateway::open(&config).unwrap();
    gateway
        .apply_snapshot(market(1, backend.addr, Some(QUOTA)))
        .unwrap();
    let listeners = Listeners::bind(&config).await.unwrap();
    assert_eq!(listeners.buyers.workers(), 2);
    let addr = listeners.buyers.local_addr().unwrap();
    let (trigger, shutdown) = ShutdownTrigger::new();
    let serving = {
        let gateway = gateway.clone();
        let router = gateway.admin_router();
        tokio::spawn(async move { gateway.serve_listeners(listeners, router, shutdown).await })
    };

    // Every call on a connection of its own (a new client each time), so the kernel picks a
    // worker for each; 24 buyers at once, 10 calls each: twice the quota.
    let mut tasks = Vec::new();
    for _ in 0..24 {
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut exhausted) = (0u64, 0u64);
            for _ in 0..10 {
                let answer = Buyer::new(addr)
                    .send(signed_as(
                        KEY,
                        SECRET,
                        request("GET", MARKET, "/v1/echo/1", Default::default()),
                    ))
                    .await;
                match answer.status.as_u16() {
                    200 => ok += 1,
                    405 => {
                        assert_eq!(answer.code(), "APIG.0501", "{:?}", answer.body);
                        exhausted += 1;
                    }
                    other => panic!("unexpected {other}: {:?}", answer.body),
                }
            }
            (ok, exhausted)
        }));
    }
    let (mut ok, mut exhausted) = (0, 0);
    for task in tasks {
        let (o, e) = task.await.unwrap();
        ok += o;
        exhausted += e;
    }
    assert_eq!(ok, QUOTA);
    assert_eq!(exhausted, 240 - QUOTA);
    assert_eq!(backend.hits(), QUOTA);

    let accepted = |worker: &str| {
        gateway
            .metrics()
            .registry()
            .gather()
            .iter()
            .filter(|family| family.get_name() == "marketgate_connections_accepted_total")
            .flat_map(|family| family.get_metric().iter())
            .filter(|m| m.get_label().iter().any(|l| l.get_value() == worker))
            .map(|m| m.get_counter().get_value() as u64)
            .sum::<u64>()
    };
    let (first, second) = (accepted("0"), accepted("1"));
    assert_eq!(
        first + second,
        240,
        "every call came on a connection of its own"
    );
    assert!(
        first > 0 && second > 0,
        "both workers accepted: {first} and {second}"
    );

    trigger.fire();
    serving.await.unwrap().unwrap();
    gateway.flush().unwrap();
}
