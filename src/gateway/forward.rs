//! Forwarding an admitted call to its backend over pooled keep-alive connections.
//!
//! Owns the upstream client: our own HTTP/1.1 client connections ([`client`]: a boxed
//! `TcpStream` and read buffer, the head parsed with `httparse`), driven from the request's
//! own task, as pingora does — no task per connection, no channel hand-off between tasks,
//! no connection state machine beside the request — kept alive in a pool per worker
//! ([`Upstream`]: one per accept loop, used by one thread) with an idle timeout and a cap
//! per backend, TCP_NODELAY and a connect timeout. Also the backend target (`backend_api`
//! path template filled from the route's parameters, the buyer's query passed through), the
//! headers the backend gets (X-Request-Id, X-Forwarded-*; never the buyer's credentials or
//! hop-by-hop headers) and the per-API timeout. Bodies stream both ways. It does not decide
//! whether a call counts: it reports whether the backend was reached
//! ([`ForwardError::never_reached`]).

mod client;

use std::ops::Range;
use std::time::Duration;

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use hashbrown::HashMap;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Method, Response};
use http_body::{Frame, SizeHint};
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::net::TcpStream;

pub use self::client::ClientError;
use self::client::{BodyReader, Connection, Exchange, Outgoing};
use super::handler::{ConnInfo, APP_CODE_HEADER};
use crate::config::GatewayConfig;
use crate::snapshot::compile::{CompiledBackend, PathPiece};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type both directions use.
pub type Body = BoxBody<Bytes, BoxError>;

/// Upstream connect timeout, milliseconds.
pub const UPSTREAM_CONNECT_TIMEOUT_MS: u64 = 5_000;
/// TCP keep-alive probes on upstream connections start after this many seconds idle.
pub const UPSTREAM_TCP_KEEPALIVE_SECS: u64 = 60;
/// The idle sweep runs at least this often, in milliseconds (closing connections idle longer
/// than `gateway.upstream_pool_idle_secs`).
pub const POOL_SWEEP_MAX_INTERVAL_MS: u64 = 30_000;

pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// A buyer's body streamed on, refused past `max` bytes.
pub fn stream(body: Incoming, max: usize) -> Body {
    Limited::new(body, max).boxed()
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The connection was never made: the call did not reach the backend.
    #[error("cannot connect to the backend")]
    Connect(#[source] std::io::Error),
    /// The connection was made but took nothing of the request (its first write failed,
    /// or the backend closed it before any byte of the request went out).
    #[error("cannot start HTTP/1.1 with the backend")]
    Handshake(#[source] ClientError),
    /// The request may have reached the backend.
    #[error("the backend call failed")]
    Failed(#[source] ClientError),
    #[error("the backend did not answer in time")]
    Timeout,
    #[error("the backend URI does not form")]
    BadTarget,
}

impl ForwardError {
    /// Whether the call certainly never reached the backend (it is then given back).
    pub fn never_reached(&self) -> bool {
        match self {
            ForwardError::Connect(_) | ForwardError::Handshake(_) | ForwardError::BadTarget => true,
            ForwardError::Failed(_) | ForwardError::Timeout => false,
        }
    }
}

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// What the backend call takes from the buyer's request besides its headers and body.
#[derive(Debug)]
pub struct BuyerCall<'a> {
    /// Passed on when the backend's method is `ANY`.
    pub method: &'a http::Method,
    /// The path as sent, without the query.
    pub path: &'a str,
    /// Where the route's parameters lie in `path` (raw, as sent), in template order.
    pub params: &'a [Range<usize>],
    /// Passed on verbatim.
    pub query: Option<&'a str>,
    /// The buyer's Host (or `:authority`), sent as `X-Forwarded-Host`.
    pub host: HeaderValue,
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) never forwarded. A `static`, not a `const`: a
/// const array of `HeaderName`s is built and dropped again at every use (hot path).
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes the hop-by-hop headers and whatever `Connection` names. One pass over the names
/// present finds which of the nine are there (a request usually has none, a backend's answer
/// often `Connection: keep-alive` alone), and only those are removed: each
/// `HeaderMap::remove` hashes and probes its name.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut present = [false; HOP_BY_HOP.len()];
    let mut any = false;
    for name in headers.keys() {
        if let Some(index) = hop_by_hop_index(name) {
            present[index] = true;
            any = true;
        }
    }
    if !any {
        return;
    }
    if present[0] {
        strip_named_in_connection(headers);
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, there)| *there) {
        headers.remove(name);
    }
}

/// Where `name` stands in [`HOP_BY_HOP`], if it is one there. A `match` on the name's text
/// (lengths first) costs a few instructions per name; comparing each name of a head with
/// the nine `HeaderName`s cost ~1k per request.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "te" => 5,
        "trailer" => 6,
        "transfer-encoding" => 7,
        "upgrade" => 8,
        _ => return None,
    })
}

/// Removes the headers a `Connection` header names. The usual tokens (`keep-alive`,
/// `close`, the other hop-by-hop names) are removed anyway or name no header, so they are
/// skipped unparsed and the usual answer allocates nothing here.
fn strip_named_in_connection(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|token| {
            !token.eq_ignore_ascii_case("close")
                && !HOP_BY_HOP
                    .iter()
                    .any(|hop| token.eq_ignore_ascii_case(hop.as_str()))
        })
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect();
    for name in &named {
        headers.remove(name);
    }
}

/// One worker's client to every backend: a pool of idle keep-alive connections per backend
/// authority. Cheap to clone (one `Arc`). Its lock is only ever taken by the worker's own
/// thread (or a test runtime's few), so it is never contended across workers.
#[derive(Clone)]
pub struct Upstream {
    pool: Arc<Pool>,
}

struct Pool {
    /// hashbrown's default hasher (foldhash), not std's SipHash: every request looks its
    /// backend up twice (checkout and checkin), and `Authority` hashes byte by byte.
    hosts: Mutex<HashMap<Authority, HostPool>>,
    max_idle_per_host: usize,
    idle_timeout: Duration,
    sweeping: std::sync::atomic::AtomicBool,
}

/// The idle connections to one backend, oldest first, and its `Host` value (made once).
struct HostPool {
    host: HeaderValue,
    idle: VecDeque<Idle>,
}

struct Idle {
    conn: Box<Connection>,
    since: Instant,
}

/// Where a call goes on its backend: the `backend_api` path with the buyer's parameters
/// filled in (raw, as sent), then the buyer's query. Written straight into the request
/// head, never built as a `String`.
struct Target<'a> {
    pieces: &'a [PathPiece],
    trailing_slash: bool,
    path: &'a str,
    params: &'a [Range<usize>],
    query: Option<&'a str>,
}

impl Target<'_> {
    /// Calls `part` with each piece of the target, in order.
    fn each(&self, mut part: impl FnMut(&[u8])) {
        for piece in self.pieces {
            match piece {
                PathPiece::Literal(l) => part(l.as_bytes()),
                PathPiece::Param(i) => part(
                    self.params
                        .get(*i)
                        .and_then(|span| self.path.get(span.clone()))
                        .unwrap_or("")
                        .as_bytes(),
                ),
            }
        }
        if self.pieces.is_empty() || self.trailing_slash {
            part(b"/");
        }
        if let Some(query) = self.query {
            part(b"?");
            part(query.as_bytes());
        }
    }

    /// Whether the target can go on a request line: visible ASCII only (no space, no
    /// control byte), so that nothing can end the line early.
    fn is_valid(&self) -> bool {
        let mut valid = true;
        self.each(|part| valid &= part.iter().all(|b| (0x21..=0x7e).contains(b)));
        valid
    }

    fn write(&self, dst: &mut Vec<u8>) {
        self.each(|part| dst.extend_from_slice(part));
    }
}

/// Writes the request and waits for the answer's head. Hot path.
async fn exchange_head(
    exchange: &mut Exchange,
    method: &Method,
) -> Result<(Response<()>, BodyReader), ClientError> {
    std::future::poll_fn(|cx| exchange.poll_head(cx, method)).await
}

/// The error for a request that failed on `exchange`: if nothing of it left us, the backend
/// was never reached.
fn failed(error: ClientError, exchange: &Exchange) -> ForwardError {
    if !exchange.sent_any() && error.is_connection_lost() {
        ForwardError::Handshake(error)
    } else {
        ForwardError::Failed(error)
    }
}

impl Upstream {
    pub fn new(config: &GatewayConfig) -> Upstream {
        Upstream {
            pool: Arc::new(Pool {
                hosts: Mutex::new(HashMap::new()),
                max_idle_per_host: config.upstream_pool_idle_per_host,
                idle_timeout: config.upstream_pool_idle,
                sweeping: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Sends the call; the response streams back. Hot path.
    ///
    /// `headers` are the buyer's, taken over rather than copied: credentials, `Host` and
    /// hop-by-hop headers are removed in place and the `X-*` headers added.
    pub async fn forward(
        &self,
        backend: &CompiledBackend,
        buyer: BuyerCall<'_>,
        mut headers: HeaderMap,
        body: Body,
        request_id: &HeaderValue,
        conn: &ConnInfo,
    ) -> Result<Response<Body>, ForwardError> {
        let CompiledBackend::Http {
            authority,
            method,
            path,
            trailing_slash,
            timeout,
        } = backend
        else {
            return Err(ForwardError::BadTarget);
        };
        // Origin form: HTTP/1.1 to an origin server sends the path and query only; the
        // authority goes into Host. Written into the request head as it is sent.
        let target = Target {
            pieces: path,
            trailing_slash: *trailing_slash,
            path: buyer.path,
            params: buyer.params,
            query: buyer.query,
        };
        if !target.is_valid() {
            return Err(ForwardError::BadTarget);
        }

        strip_hop_by_hop(&mut headers);
        // Room for the four headers added below, grown once (Host is written into the
        // request head by the client, the buyer's skipped).
        headers.reserve(4);
        headers.remove(header::AUTHORIZATION);
        headers.remove(APP_CODE_HEADER);
        headers.insert(X_REQUEST_ID, request_id.clone());
        let forwarded_for = match headers.get(X_FORWARDED_FOR).map(HeaderValue::as_bytes) {
            Some(prior) => {
                let mut value = Vec::with_capacity(prior.len() + 2 + conn.peer_ip.len());
                value.extend_from_slice(prior);
                value.extend_from_slice(b", ");
                value.extend_from_slice(conn.peer_ip.as_bytes());
                HeaderValue::from_maybe_shared(Bytes::from(value)).ok()
            }
            None => Some(conn.peer_ip.clone()),
        };
        if let Some(value) = forwarded_for {
            headers.insert(X_FORWARDED_FOR, value);
        }
        headers.insert(X_FORWARDED_HOST, buyer.host);
        headers.insert(
            X_FORWARDED_PROTO,
            HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
        );

        let method = method.as_ref().unwrap_or(buyer.method);
        let body = Outgoing::new(body).map_err(ForwardError::Failed)?;

        let sent = self.send(authority, method, &target, &headers, body);
        let (response, exchange, reader) = match tokio::time::timeout(*timeout, sent).await {
            Err(_) => return Err(ForwardError::Timeout),
            Ok(result) => result?,
        };
        let (mut parts, ()) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let body = UpstreamBody {
            exchange: Some(exchange),
            reader,
            pool: Arc::downgrade(&self.pool),
            authority: authority.clone(),
        };
        Ok(Response::from_parts(parts, BodyExt::boxed(body)))
    }

    /// Sends on an idle connection to `authority` if one is ready, else on a new one. A
    /// reused connection that turns out closed (the backend closed it while idle, after the
    /// checkout looked) before anything of the answer came is given up, and the request is
    /// sent once more on a new connection when its body is whole (it can be written again).
    async fn send(
        &self,
        authority: &Authority,
        method: &Method,
        target: &Target<'_>,
        headers: &HeaderMap,
        body: Outgoing,
    ) -> Result<(Response<()>, Exchange, BodyReader), ForwardError> {
        let (reused, host) = self.checkout(authority);
        let was_reused = reused.is_some();
        let mut conn = match reused {
            Some(conn) => conn,
            None => connect(authority).await?,
        };
        conn.encode_head(method, |dst| target.write(dst), &host, headers, &body);
        let replay = match &body {
            Outgoing::Whole(bytes) if was_reused => Some(bytes.clone()),
            _ => None,
        };
        let mut exchange = Exchange::start(conn, body);
        let error = match exchange_head(&mut exchange, method).await {
            Ok((response, reader)) => return Ok((response, exchange, reader)),
            Err(error) => error,
        };
        let replay = match replay {
            Some(bytes) if !exchange.received_any() && error.is_connection_lost() => bytes,
            _ => return Err(failed(error, &exchange)),
        };
        let mut conn = connect(authority).await?;
        conn.copy_head_from(&exchange.into_connection());
        let mut exchange = Exchange::start(conn, Outgoing::Whole(replay));
        match exchange_head(&mut exchange, method).await {
            Ok((response, reader)) => Ok((response, exchange, reader)),
            Err(error) => Err(failed(error, &exchange)),
        }
    }

    /// The newest idle connection to `authority` that can take a request (older ones past
    /// the idle timeout, or closed by the backend, are dropped on the way), and the `Host`
    /// value for it.
    fn checkout(&self, authority: &Authority) -> (Option<Box<Connection>>, HeaderValue) {
        let mut hosts = self.pool.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let pool = hosts.entry(authority.clone()).or_insert_with(|| HostPool {
            host: host_value(authority),
            idle: VecDeque::new(),
        });
        let host = pool.host.clone();
        while let Some(mut idle) = pool.idle.pop_back() {
            if idle.since.elapsed() < self.pool.idle_timeout && idle.conn.idle_and_open() {
                return (Some(idle.conn), host);
            }
        }
        (None, host)
    }
}

/// `Host` for `authority`: as hyper-util's client sent it, the port only when not 80.
fn host_value(authority: &Authority) -> HeaderValue {
    let text = match authority.port_u16() {
        Some(80) => authority.host(),
        _ => authority.as_str(),
    };
    HeaderValue::from_str(text).expect("an authority is a valid header value")
}

/// Opens a connection to `authority` (TCP_NODELAY, TCP keep-alive) within the connect
/// timeout. Nothing is sent yet: every error here means the call never reached the backend.
async fn connect(authority: &Authority) -> Result<Box<Connection>, ForwardError> {
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port = authority.port_u16().unwrap_or(80);
    let stream = tokio::time::timeout(
        Duration::from_millis(UPSTREAM_CONNECT_TIMEOUT_MS),
        TcpStream::connect((host, port)),
    )
    .await
    .map_err(|_| ForwardError::Connect(std::io::ErrorKind::TimedOut.into()))?
    .map_err(ForwardError::Connect)?;
    let _ = stream.set_nodelay(true);
    let keepalive =
        socket2::TcpKeepalive::new().with_time(Duration::from_secs(UPSTREAM_TCP_KEEPALIVE_SECS));
    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
    Ok(Connection::new(stream))
}

impl Pool {
    /// Takes back a connection whose response ended, unless its backend is at
    /// `gateway.upstream_pool_idle_per_host` idle connections already.
    fn checkin(self: &Arc<Self>, authority: &Authority, conn: Box<Connection>) {
        if self.max_idle_per_host == 0 {
            return;
        }
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let Some(pool) = hosts.get_mut(authority) else {
            return;
        };
        if pool.idle.len() >= self.max_idle_per_host {
            return;
        }
        pool.idle.push_back(Idle {
            conn,
            since: Instant::now(),
        });
        drop(hosts);
        self.start_sweeping();
    }

    /// Starts (once, on the runtime of the first connection kept) the task that closes
    /// connections idle past the timeout while no request comes to take them. It ends when
    /// the pool is dropped.
    fn start_sweeping(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.sweeping.load(Ordering::Relaxed) || self.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.sweeping.store(false, Ordering::Release);
            return;
        };
        let pool: Weak<Pool> = Arc::downgrade(self);
        let every = (self.idle_timeout / 2).clamp(
            Duration::from_millis(1),
            Duration::from_millis(POOL_SWEEP_MAX_INTERVAL_MS),
        );
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(pool) = pool.upgrade() else { return };
                pool.sweep();
            }
        });
    }

    /// Drops idle connections past the idle timeout (each backend's list is oldest first).
    fn sweep(&self) {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        for pool in hosts.values_mut() {
            while pool
                .idle
                .front()
                .is_some_and(|idle| idle.since.elapsed() >= self.idle_timeout)
            {
                pool.idle.pop_front();
            }
        }
    }
}

/// A backend's response body, read off its connection as it is polled (which also writes
/// whatever is left of a streamed request body). Once the answer has been read to its end
/// and the request was all written, the connection goes back to its pool when the body is
/// dropped; dropped before its end, or after an error, the connection is closed.
struct UpstreamBody {
    /// `None` after an error: the connection is closed.
    exchange: Option<Exchange>,
    reader: BodyReader,
    pool: Weak<Pool>,
    authority: Authority,
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(exchange) = &mut this.exchange else {
            return Poll::Ready(None);
        };
        match std::task::ready!(exchange.poll_body(cx, &mut this.reader)) {
            Some(Ok(data)) => Poll::Ready(Some(Ok(Frame::data(data)))),
            Some(Err(error)) => {
                this.exchange = None;
                Poll::Ready(Some(Err(Box::new(error))))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.exchange.is_none() || self.reader.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.reader.exact_remaining() {
            Some(remaining) => SizeHint::with_exact(remaining),
            None => SizeHint::default(),
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // Reusable only if the whole answer was read (its rest would be read as the next
        // answer) and the whole request written.
        let Some(exchange) = self.exchange.take() else {
            return;
        };
        if let (Some(conn), Some(pool)) = (exchange.reusable(&self.reader), self.pool.upgrade()) {
            pool.checkin(&self.authority, conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| {
                (
                    HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                )
            })
            .collect()
    }

    /// Every hop-by-hop header goes, alone or among others, and so does whatever
    /// `Connection` names; end-to-end headers stay, and a head with none is left as it is.
    #[test]
    fn hop_by_hop_headers_are_stripped_and_end_to_end_ones_kept() {
        let end_to_end = [("host", "a"), ("x-sdk-date", "1"), ("accept", "*/*")];
        for (index, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(index), "{name}");
            let mut headers = map(&end_to_end);
            headers.append(name.clone(), HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut headers);
            assert_eq!(headers, map(&end_to_end), "{name}");
        }
        let mut headers = map(&[
            ("connection", "x-private, Keep-Alive"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("x-kept", "2"),
        ]);
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers, map(&[("x-kept", "2")]));
        let mut untouched = map(&end_to_end);
        strip_hop_by_hop(&mut untouched);
        assert_eq!(untouched, map(&end_to_end));
        for name in end_to_end.map(|(name, _)| HeaderName::from_static(name)) {
            assert_eq!(hop_by_hop_index(&name), None, "{name}");
        }
    }
}
