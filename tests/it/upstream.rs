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

/// One request as [`Scripted`] read it: its head (lower-cased) and its body (de-chunked).
#[derive(Clone, Debug)]
struct Seen {
    head: String,
    body: Vec<u8>,
}

/// What [`Scripted`] does with a request.
enum Reply {
    /// Writes these bytes and reads the next request on the connection.
    Answer(&'static [u8]),
    /// Writes these bytes and closes the connection.
    AnswerAndClose(&'static [u8]),
    /// Closes the connection without answering.
    Close,
}

/// A raw backend that reads each request whole (a body by Content-Length or chunked),
/// records it, and does what `reply` says for it, given the request and its index on its
/// connection (from 0). Counts the connections it accepted and those that ended (closed by
/// either side).
struct Scripted {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicU64>,
    ended: Arc<AtomicU64>,
    seen: Arc<std::sync::Mutex<Vec<Seen>>>,
}

fn find(buf: &[u8], what: &[u8]) -> Option<usize> {
    buf.windows(what.len()).position(|w| w == what)
}

/// Reads more into `buf`; false at EOF or an error.
async fn fill(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 16384];
    match stream.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

/// Reads one request off `stream`; `None` if the connection ends first.
async fn read_request(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<Seen> {
    let end = loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            break end;
        }
        if !fill(stream, buf).await {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    buf.drain(..end + 4);
    let mut body = Vec::new();
    if head.contains("\r\ntransfer-encoding: chunked") {
        loop {
            let line = loop {
                if let Some(line) = find(buf, b"\r\n") {
                    break line;
                }
                if !fill(stream, buf).await {
                    return None;
                }
            };
            let size = String::from_utf8_lossy(&buf[..line]).into_owned();
            let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
            buf.drain(..line + 2);
            while buf.len() < size + 2 {
                if !fill(stream, buf).await {
                    return None;
                }
            }
            body.extend_from_slice(&buf[..size]);
            assert_eq!(&buf[size..size + 2], b"\r\n", "chunk framing");
            buf.drain(..size + 2);
            if size == 0 {
                break;
            }
        }
    } else if let Some(length) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map(|v| v.trim().parse::<usize>().unwrap())
    {
        while buf.len() < length {
            if !fill(stream, buf).await {
                return None;
            }
        }
        body = buf.drain(..length).collect();
    }
    Some(Seen { head, body })
}

impl Scripted {
    async fn start(reply: fn(&Seen, usize) -> Reply) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let ended = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (a, e, s) = (accepted.clone(), ended.clone(), seen.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                a.fetch_add(1, Ordering::SeqCst);
                let (e, s) = (e.clone(), s.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut index = 0;
                    while let Some(request) = read_request(&mut stream, &mut buf).await {
                        let reply = reply(&request, index);
                        s.lock().unwrap().push(request);
                        index += 1;
                        match reply {
                            Reply::Answer(bytes) => {
                                if stream.write_all(bytes).await.is_err() {
                                    break;
                                }
                            }
                            Reply::AnswerAndClose(bytes) => {
                                let _ = stream.write_all(bytes).await;
                                break;
                            }
                            Reply::Close => break,
                        }
                    }
                    drop(stream);
                    e.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Scripted {
            addr,
            accepted,
            ended,
            seen,
        }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    fn ended(&self) -> u64 {
        self.ended.load(Ordering::SeqCst)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// `calls` signed GETs in a row, each answered `status` with `body`.
async fn calls(gw: &TestGateway, calls: usize, status: u16, body: &[u8]) {
    let buyer = Buyer::new(gw.buyers);
    for call in 1..=calls {
        let answer = buyer.signed("GET", MARKET, "/v1/echo/1", b"").await;
        assert_eq!(answer.status, status, "call {call}: {:?}", answer.body);
        assert_eq!(&answer.body[..], body, "call {call}");
    }
}

#[tokio::test]
async fn a_chunked_answer_is_decoded_and_its_connection_reused() {
    let backend = Scripted::start(|_, _| {
        Reply::Answer(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n",
        )
    })
    .await;
    let gw = TestGateway::with(market(1, backend.addr, None)).await;
    calls(&gw, 3, 200, b"hello world").await;
    assert_eq!(backend.accepted(), 1, "one connection for 3 calls");
    for seen in backend.seen() {
        let hosts: Vec<&str> = seen
            .head
            .lines()
            .filter(|l| l.starts_with("host:"))
            .collect();
        assert_eq!(hosts, [format!("host: {}", backend.addr)], "{}", seen.head);
    }
}

#[tokio::test]
async fn a_content_length_answer_is_read_exactly_and_its_connection_reused() {
    let backend = Scripted::start(|_, _| {
        Reply::Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-Seller: s\r\n\r\nhello world")
    })
    .await;
    let gw = TestGateway::with(market(1, backend.addr, None)).await;
    let buyer = Buyer::new(gw.buyers);
    for _ in 0..3 {
        let answer = buyer.signed("GET", MARKET, "/v1/echo/1", b"").await;
        assert_eq!(answer.status, 200);
        assert_eq!(&answer.body[..], b"hello world");
        assert_eq!(answer.headers["x-seller"], "s");
        assert_eq!(answer.headers["content-length"], "11");
    }
    assert_eq!(backend.accepted(), 1, "one connection for 3 calls");
}

/// No length and no chunking: the body runs to the backend's close, and the connection
/// (closed) is not used again.
#[tokio::test]
async fn a_close_delimited_answer_is_read_to_the_end_and_not_reused() {
    let backend =
        Scripted::start(|_, _| Reply::AnswerAndClose(b"HTTP/1.1 200 OK\r\n\r\nuntil the close"))
            .await;
    let gw = TestGateway::with(market(1, backend.addr, None)).await;
    calls(&gw, 2, 200, b"until the close").await;
    assert_eq!(backend.accepted(), 2);
}

/// `Connection: close` from a backend that then keeps its end open: the gateway closes the
/// connection after the answer and opens a new one for the next call.
#[tokio::test]
async fn an_answer_with_connection_close_is_not_reused() {
    let backend = Scripted::start(|_, _| {
        Reply::Answer(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")
    })
    .await;
    let gw = TestGateway::with(market(1, backend.addr, None)).await;
    calls(&gw, 2, 200, b"ok").await;
    assert_eq!(backend.accepted(), 2);
    assert!(
        eventually(Duration::from_secs(5), || backend.ended() == 2).await,
        "the gateway closed both connections: {} ended",
        backend.ended()
    );
}

/// RFC 9112 §6.3: Transfer-Encoding and Content-Length together are read as chunked, and the
/// connection is not reused.
#[tokio::test]
async fn an_answer_with_transfer_encoding_and_content_length_is_chunked_and_not_reused() {
    let backend = Scripted::start(|_, _| {
        Reply::Answer(
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )
    })
    .await;
    let gw = TestGateway::with(market(1, backend.addr, None)).await;
    calls(&gw, 2, 200, b"hello").await;
    assert_eq!(backend.accepted(), 2);
    assert!(
        eventually(Duration::from_secs(5), || backend.ended() == 2).await,
        "the gateway closed both connections"
    );
}

/// Answers without a body (204, and any answer to HEAD, whatever its Content-Length says)
/// end at their head, and the connection is reused.
#[tokio::test]
async fn bodiless_answers_to_head_and_204_keep_the_connection() {
    let backend = Scripted::start(|seen, _| {
        if seen.head.starts_with("head ") {
            Reply::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
        } else {
            Reply::Answer(b"HTTP/1.1 204 No Content\r\n\r\n")
        }
    })
    .await;
    let gw = TestGateway::with(market(1, backend.addr, Some(10))).await;
    let buyer = Buyer::new(gw.buyers);
    for method in ["HEAD", "GET", "HEAD", "GET"] {
        let answer = buyer.signed(method, MARKET, "/v1/echo/1", b"").await;
        let want = if method == "HEAD" { 200 } else { 204 };
        assert_eq!(answer.status, want, "{method}");
        assert!(answer.body.is_empty(), "{method}");
    }
    assert_eq!(backend.accepted(), 1, "one connection for 4 calls");
    let methods: Vec<String> = backend
        .seen()
        .iter()
        .map(|s| s.head.split(' ').next().unwrap().to_owned())
        .collect();
    assert_eq!(methods, ["head", "get", "head", "get"]);
    assert!(
        backend
            .seen()
            .iter()
            .all(|s| !s.head.contains("content-length")),
        "no content-length on an empty GET or HEAD"
    );
}

#[tokio::test]
async fn a_100_continue_before_the_answer_is_skipped() {
    let backend = Scripted::start(|_, _| {
        Reply::Answer(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        )
    })
    .await;
    let gw = TestGateway::with(market(1, backend.addr, None)).await;
    calls(&gw, 2, 200, b"ok").await;
    assert_eq!(backend.accepted(), 1);
}

/// A head that is not HTTP is the backend's failure: 502, and the call counts (the backend
/// got it: CONTRACT §8). A backend that reads the call and closes without a word is the
/// same. Neither connection is used again.
#[tokio::test]
async fn a_malformed_answer_or_none_is_502_and_the_call_counts() {
    let backend = Scripted::start(|seen, _| {
        if seen.head.contains("/echo/1 ") {
            Reply::Answer(b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n")
        } else {
            Reply::Close
        }
    })
    .await;
    let gw = TestGateway::with(market(1, backend.addr, Some(10))).await;
    let buyer = Buyer::new(gw.buyers);
    for path in ["/v1/echo/1", "/v1/echo/2"] {
        let answer = buyer.signed("GET", MARKET, path, b"").await;
        assert_eq!(answer.status, 502, "{path}: {:?}", answer.body);
        assert_eq!(answer.code(), "APIG.0201", "{path}");
    }
    assert_eq!(gw.gateway.quota().get("p1").unwrap().used(), 2);
    assert_eq!(backend.accepted(), 2);
}

/// A reused connection that the backend closes on reading the next call, answering nothing
/// (a close racing the checkout): the call, its body whole, is sent again on a new
/// connection and answered; it counts once.
#[tokio::test]
async fn a_reused_connection_closed_without_an_answer_is_retried_once_on_a_new_one() {
    let backend = Scripted::start(|_, index| {
        if index == 0 {
            Reply::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        } else {
            Reply::Close
        }
    })
    .await;
    let gw = TestGateway::with(market(1, backend.addr, Some(10))).await;
    let buyer = Buyer::new(gw.buyers);
    for call in 1..=3 {
        let answer = buyer
            .signed("POST", MARKET, "/v1/echo/1", b"{\"a\":1}")
            .await;
        assert_eq!(answer.status, 200, "call {call}: {:?}", answer.body);
        assert_eq!(&answer.body[..], b"ok");
    }
    assert_eq!(gw.gateway.quota().get("p1").unwrap().used(), 3);
    // Call 1 on connection 1; calls 2 and 3 each tried on the last one, then a new one.
    assert_eq!(backend.accepted(), 3);
    let seen = backend.seen();
    assert_eq!(seen.len(), 5);
    assert!(seen.iter().all(|s| s.body == b"{\"a\":1}"), "{seen:?}");
}

/// The buyer's head with a signature over an unsigned payload, so that the body streams.
fn signed_head(method: &str, path: &str) -> String {
    let mut request = request(method, MARKET, path, bytes::Bytes::new());
    request.headers_mut().insert(
        "x-sdk-content-sha256",
        http::HeaderValue::from_static("UNSIGNED-PAYLOAD"),
    );
    let request = signed_as(KEY, SECRET, request);
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    for (name, value) in request.headers() {
        head.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap()));
    }
    head
}

/// A chunked request body of unknown length streams to the backend chunked, intact.
#[tokio::test]
async fn a_streamed_request_body_arrives_chunked_and_intact() {
    let backend =
        Scripted::start(|_, _| Reply::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"))
            .await;
    let gw = TestGateway::with(market(1, backend.addr, Some(10))).await;
    let big: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let mut wire = signed_head("POST", "/v1/echo/1").into_bytes();
    wire.extend_from_slice(b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n");
    wire.extend_from_slice(b"5\r\nhello\r\n");
    wire.extend_from_slice(format!("{:x}\r\n", big.len()).as_bytes());
    wire.extend_from_slice(&big);
    wire.extend_from_slice(b"\r\n0\r\n\r\n");
    let answer = raw_until_close(gw.buyers, &wire).await;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "{}",
        &answer[..answer.len().min(300)]
    );
    assert!(answer.ends_with("ok"), "{answer}");
    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].head.contains("\r\ntransfer-encoding: chunked"),
        "{}",
        seen[0].head
    );
    assert!(!seen[0].head.contains("content-length"), "{}", seen[0].head);
    let mut want = b"hello".to_vec();
    want.extend_from_slice(&big);
    assert_eq!(seen[0].body.len(), want.len());
    assert!(seen[0].body == want, "the body arrived altered");
}
