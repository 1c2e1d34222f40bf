//! The upstream client (`gateway/forward.rs`): keep-alive reuse, a backend that closes
//! connections between calls, the idle timeout, and the `Host` the backend sees. The backend
//! here is raw TCP so that the test sees every connection it is given.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::gateway::*;

/// A backend that answers every request `200 ok`, counts the connections it accepted and
/// those it saw end, and closes each connection after one answer when `close_after_one`.
struct RawBackend {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicU64>,
    ended: Arc<AtomicU64>,
    hosts: Arc<std::sync::Mutex<Vec<String>>>,
}

impl RawBackend {
    async fn start(close_after_one: bool) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let ended = Arc::new(AtomicU64::new(0));
        let hosts = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (a, e, h) = (accepted.clone(), ended.clone(), hosts.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                a.fetch_add(1, Ordering::SeqCst);
                let (e, h) = (e.clone(), h.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let n = match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        buf.extend_from_slice(&chunk[..n]);
                        // GET requests without a body: one head per "\r\n\r\n".
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                            buf.drain(..end + 4);
                            if let Some(host) = head
                                .lines()
                                .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
                            {
                                h.lock().unwrap().push(host);
                            }
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if stream.write_all(answer).await.is_err() {
                                break;
                            }
                            if close_after_one {
                                e.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                        }
                    }
                    e.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        RawBackend {
            addr,
            accepted,
            ended,
            hosts,
        }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    fn ended(&self) -> u64 {
        self.ended.load(Ordering::SeqCst)
    }
}

/// Polls `condition` every 10 ms until it holds or `within` has passed.
async fn eventually(within: Duration, condition: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    condition()
}

#[tokio::test]
async fn sequential_calls_reuse_one_upstream_connection_and_send_the_backend_host() {
    let backend = RawBackend::start(false).await;
    let gw = TestGateway::with(market(1, backend.addr, None)).await;
    let buyer = Buyer::new(gw.buyers);
    for _ in 0..5 {
        let answer = buyer.signed("GET", MARKET, "/v1/echo/1", b"").await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        assert_eq!(&answer.body[..], b"ok");
    }
    assert_eq!(
        backend.accepted(),
        1,
        "one keep-alive connection for 5 calls"
    );
    let hosts = backend.hosts.lock().unwrap().clone();
    assert_eq!(hosts, vec![backend.addr.to_string(); 5]);
}

/// A backend that closes each connection after answering (without saying so): the next call
/// is not sent on the dead connection but on a new one, and succeeds.
#[tokio::test]
async fn a_connection_the_backend_closed_while_idle_is_not_reused() {
    let backend = RawBackend::start(true).await;
    let gw = TestGateway::with(market(1, backend.addr, Some(10))).await;
    let buyer = Buyer::new(gw.buyers);
    for call in 1..=3u64 {
        let answer = buyer.signed("GET", MARKET, "/v1/echo/1", b"").await;
        assert_eq!(answer.status, 200, "call {call}: {:?}", answer.body);
        assert!(
            eventually(Duration::from_secs(5), || backend.ended() == call).await,
            "the backend closed connection {call}"
        );
    }
    assert_eq!(backend.accepted(), 3);
}

/// `gateway.upstream_pool_idle_secs`: an idle connection is closed after it, with no call
/// coming to find it.
#[tokio::test]
async fn idle_upstream_connections_are_closed_after_the_idle_timeout() {
    let backend = RawBackend::start(false).await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let gw = TestGateway::start_in(dir, "[gateway]\nupstream_pool_idle_secs = 1\n").await;
    gw.gateway
        .apply_snapshot(market(1, backend.addr, None))
        .unwrap();
    let buyer = Buyer::new(gw.buyers);
    let answer = buyer.signed("GET", MARKET, "/v1/echo/1", b"").await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(backend.ended(), 0, "kept alive after the call");
    assert!(
        eventually(Duration::from_secs(5), || backend.ended() == 1).await,
        "the idle connection was closed"
    );
}
