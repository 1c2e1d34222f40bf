//! The one accept loop every listener runs (buyer HTTP and HTTPS, control, admin), and the
//! guards that bound each connection.
//!
//! A listener serves at most `max_connections` connections (a semaphore, as mini-redis's
//! `MAX_CONNECTIONS`). When they are all taken, every connection with no request in flight
//! is told to close (idle keep-alive connections, and ones that never sent a request: what a
//! flood of idle sockets is), and the loop waits up to [`ACCEPT_QUEUE_WAIT`] for room while
//! new connections wait in the kernel's backlog; one that still finds no room is closed at
//! once. Accept errors (`EMFILE` above all) back off exponentially from
//! [`ACCEPT_BACKOFF_MIN`] to [`ACCEPT_BACKOFF_MAX`] and are logged once per burst, never spun
//! on.
//!
//! A TLS listener reads each ClientHello first and runs the handshake with the server
//! configuration its [`TlsChooser`] picks for it (by SNI: a domain may admit TLS 1.3 only),
//! so that what a configuration does not allow fails the handshake itself.
//!
//! Each connection is bounded in time: a TLS handshake by `tls_handshake_timeout`; the first
//! request must start within `header_read_timeout` (hyper's own header timeout then bounds
//! every HTTP/1 head); and a connection with no request in flight for `idle_timeout` is
//! closed, HTTP/1 and HTTP/2 alike (an HTTP/2 peer that answers pings but sends nothing is
//! idle too). Closing an idle connection is graceful (HTTP/2 sends GOAWAY) and bounded: one
//! that has not finished [`CLOSE_GRACE`] later, with nothing in flight, is dropped. One that
//! never sent a request, or one closed to make room, is dropped at once: it has nothing in
//! flight to be graceful about. On shutdown every connection is asked to close and the
//! loop returns once all are gone or the drain timeout has passed.
//!
//! This module knows nothing of what is served: the caller hands it a service per connection.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::LazyConfigAcceptor;

use crate::auth_guard::{AuthGuard, Penalised};
use crate::config::ConnectionLimits;
use crate::framing::{Evidence, Framing};
use crate::shutdown::Shutdown;

/// How long a new connection waits for room once every slot is taken and the idle ones were
/// told to close.
pub const ACCEPT_QUEUE_WAIT: Duration = Duration::from_millis(1_000);
/// First and longest pause after a failed accept.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(1_000);
/// How long an idle connection asked to close (HTTP/2: GOAWAY) may take before it is dropped.
pub const CLOSE_GRACE: Duration = Duration::from_millis(1_000);
/// Open files kept back from the connection limits for the process's own files, its upstream
/// and inter-plane connections.
pub const FD_RESERVE: u64 = 64;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Everything that bounds one listener.
#[derive(Debug, Clone)]
pub struct ListenerSpec {
    /// The listener's name in logs and metrics: `buyers`, `buyers_tls`, `control`, `admin`.
    pub name: &'static str,
    pub limits: ConnectionLimits,
    /// HTTP/1 read buffer and HTTP/2 header list bound, in bytes.
    pub max_header_bytes: usize,
    pub h2_max_concurrent_streams: u32,
    pub tls_handshake_timeout: Duration,
    /// How long open connections may take to finish once shutdown fires.
    pub drain_timeout: Duration,
    /// The APIG `error_code` of this listener's answers to malformed requests (a head hyper
    /// cannot parse, Content-Length beside Transfer-Encoding): `APIG.0201` for buyers,
    /// `APIG.2000` for the control and admin listeners.
    pub error_code: &'static str,
    /// How many times the configured head limit `max_header_bytes` is (the buyer listener
    /// gives hyper room beyond its own check; 1 elsewhere): the configured limit is named
    /// in the 431 that replaces hyper's.
    pub head_room: usize,
}

/// Counters of one process's listeners, registered by whoever owns the registry.
#[derive(Debug, Clone)]
pub struct AcceptMetrics {
    /// `marketgate_connections_refused_total{listener}`
    pub refused: prometheus::IntCounterVec,
    /// `marketgate_connections_closed_total{listener,reason}` (`idle`, `no_request`, `room`)
    pub closed: prometheus::IntCounterVec,
    /// `marketgate_accept_errors_total{listener}`
    pub accept_errors: prometheus::IntCounterVec,
    /// `marketgate_listener_connections{listener}`
    pub open: prometheus::IntGaugeVec,
    /// `marketgate_listener_max_connections{listener}`: the limit in force (after
    /// `fit_open_file_limit`), for alerts on how full a listener is.
    pub max: prometheus::IntGaugeVec,
    /// `marketgate_auth_failures_total{listener}`: requests refused 401 (a wrong key,
    /// signature, AppCode or token), counted per peer by the listener's `crate::auth_guard`.
    pub auth_failures: prometheus::IntCounterVec,
    /// `marketgate_auth_limited_total{listener}`: requests refused 429 because their peer
    /// made `auth_failure_limit` failed authentications in the current window.
    pub auth_limited: prometheus::IntCounterVec,
    /// A gauge of its own that also counts this listener's open connections (the data plane's
    /// `marketgate_connections_active`, CONTRACT §9).
    pub also_open: Option<prometheus::IntGauge>,
}

impl AcceptMetrics {
    pub fn new() -> AcceptMetrics {
        use prometheus::{IntCounterVec, IntGaugeVec, Opts};
        AcceptMetrics {
            refused: IntCounterVec::new(
                Opts::new(
                    "marketgate_connections_refused_total",
                    "Connections closed at accept: the listener's max_connections were taken",
                ),
                &["listener"],
            )
            .expect("valid metric"),
            closed: IntCounterVec::new(
                Opts::new(
                    "marketgate_connections_closed_total",
                    "Connections closed by the server: idle, no request in time, or room needed",
                ),
                &["listener", "reason"],
            )
            .expect("valid metric"),
            accept_errors: IntCounterVec::new(
                Opts::new(
                    "marketgate_accept_errors_total",
                    "Failed accepts (e.g. too many open files), each followed by a back-off",
                ),
                &["listener"],
            )
            .expect("valid metric"),
            open: IntGaugeVec::new(
                Opts::new(
                    "marketgate_listener_connections",
                    "Open connections per listener",
                ),
                &["listener"],
            )
            .expect("valid metric"),
            max: IntGaugeVec::new(
                Opts::new(
                    "marketgate_listener_max_connections",
                    "The connection limit in force per listener (max_connections)",
                ),
                &["listener"],
            )
            .expect("valid metric"),
            auth_failures: IntCounterVec::new(
                Opts::new(
                    "marketgate_auth_failures_total",
                    "Requests refused for a wrong credential (401): key, signature, AppCode or token",
                ),
                &["listener"],
            )
            .expect("valid metric"),
            auth_limited: IntCounterVec::new(
                Opts::new(
                    "marketgate_auth_limited_total",
                    "Requests refused (429) because their peer made auth_failure_limit failed \
                     authentications in the current window",
                ),
                &["listener"],
            )
            .expect("valid metric"),
            also_open: None,
        }
    }

    /// Registers every family in `registry`.
    pub fn register(&self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.refused.clone()))?;
        registry.register(Box::new(self.closed.clone()))?;
        registry.register(Box::new(self.accept_errors.clone()))?;
        registry.register(Box::new(self.auth_failures.clone()))?;
        registry.register(Box::new(self.auth_limited.clone()))?;
        registry.register(Box::new(self.max.clone()))?;
        registry.register(Box::new(self.open.clone()))
    }
}

impl Default for AcceptMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// What a connection tells the service built for it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: std::net::SocketAddr,
    pub tls: bool,
    /// TLS server name, lower-cased.
    pub sni: Option<Box<str>>,
}

/// Held by a request from its start until its response body is dropped.
struct InFlight(Arc<Evidence>);

impl InFlight {
    fn start(activity: &Arc<Evidence>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The caller's service, counting its requests for the idle check, and refusing those
/// that [`Evidence::smuggling`] names before the service sees them.
#[derive(Clone)]
struct Counted<S> {
    inner: S,
    activity: Arc<Evidence>,
    /// The listener's `error_code` for malformed requests.
    error_code: &'static str,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Counted<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<CountedBody<B>>;
    type Error = S::Error;
    type Future = CountedFuture<S::Future>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let guard = InFlight::start(&self.activity);
        if self.activity.smuggling(&request) {
            tracing::debug!("refused: Content-Length beside Transfer-Encoding");
            return CountedFuture {
                inner: None,
                refused: Some(crate::framing::smuggling_response(self.error_code)),
                guard: Some(guard),
            };
        }
        CountedFuture {
            inner: Some(self.inner.call(request)),
            refused: None,
            guard: Some(guard),
        }
    }
}

pin_project_lite::pin_project! {
    struct CountedFuture<F> {
        #[pin]
        inner: Option<F>,
        refused: Option<Response<Bytes>>,
        guard: Option<InFlight>,
    }
}

impl<F, B, E> Future for CountedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<CountedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(refused) = this.refused.take() {
            let guard = this.guard.take();
            return Poll::Ready(Ok(refused.map(|body| CountedBody {
                inner: None,
                refused: Some(body),
                _guard: guard,
            })));
        }
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Pending;
        };
        let response = std::task::ready!(inner.poll(cx));
        let guard = this.guard.take();
        Poll::Ready(response.map(|r| {
            r.map(|body| CountedBody {
                inner: Some(body),
                refused: None,
                _guard: guard,
            })
        }))
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as in flight until it is dropped: the
    /// service's, or the error body of a request refused before it.
    pub struct CountedBody<B> {
        #[pin]
        inner: Option<B>,
        refused: Option<Bytes>,
        _guard: Option<InFlight>,
    }
}

impl<B: http_body::Body<Data = Bytes>> http_body::Body for CountedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        let this = self.project();
        match this.inner.as_pin_mut() {
            Some(inner) => inner.poll_frame(cx),
            None => Poll::Ready(this.refused.take().map(|b| Ok(http_body::Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Some(inner) => inner.is_end_stream(),
            None => self.refused.is_none(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.inner {
            Some(inner) => inner.size_hint(),
            None => {
                http_body::SizeHint::with_exact(self.refused.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

/// One listener's shared state: its slots and the signal that asks idle connections to go.
struct Slots {
    permits: Arc<Semaphore>,
    /// Bumped when every slot is taken: idle connections close to make room.
    make_room: watch::Sender<u64>,
}

fn builder(spec: &ListenerSpec) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(spec.limits.header_read_timeout)
        .max_buf_size(spec.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(spec.max_header_bytes as u32)
        .max_concurrent_streams(spec.h2_max_concurrent_streams);
    builder
}

/// Picks the server configuration a TLS handshake runs with, from its ClientHello.
pub type TlsChooser =
    Arc<dyn Fn(&rustls::server::ClientHello<'_>) -> Arc<rustls::ServerConfig> + Send + Sync>;

/// The TLS handshake of one connection: the ClientHello, then the handshake with the
/// configuration `choose` picks for it.
async fn handshake(
    stream: tokio::net::TcpStream,
    choose: &TlsChooser,
) -> std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream).await?;
    let config = choose(&start.client_hello());
    start.into_stream(config).await
}

/// Serves `listener` until `shutdown`, building one service per connection with `make`, over
/// TLS when `tls` is given; then drains (see the module docs).
pub async fn serve<M, S, B>(
    listener: TcpListener,
    spec: ListenerSpec,
    tls: Option<TlsChooser>,
    metrics: AcceptMetrics,
    make: M,
    shutdown: Shutdown,
) where
    M: Fn(Peer) -> S + Send + Sync + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let spec = Arc::new(spec);
    let make = Arc::new(make);
    let slots = Arc::new(Slots {
        permits: Arc::new(Semaphore::new(spec.limits.max_connections)),
        make_room: watch::channel(0).0,
    });
    let name = spec.name;
    let open = metrics.open.with_label_values(&[name]);
    // Every series of this listener exists from the start, at 0: "nothing yet" is then
    // told apart from "not exported" (deploy/check-metrics.sh, alerts on `increase`).
    for reason in [Close::NoRequest, Close::Idle, Close::Room] {
        metrics.closed.with_label_values(&[name, reason.label()]);
    }
    metrics.auth_failures.with_label_values(&[name]);
    metrics.auth_limited.with_label_values(&[name]);
    // Added, not set: the workers of one buyer listener each serve a share of its limit.
    let max = metrics.max.with_label_values(&[name]);
    max.add(spec.limits.max_connections as i64);
    let refused = metrics.refused.with_label_values(&[name]);
    let accept_errors = metrics.accept_errors.with_label_values(&[name]);
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut failed_accepts = 0u64;
    let mut refusals = 0u64;
    let stop = shutdown.clone().wait();
    tokio::pin!(stop);
    loop {
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) if is_connection_error(&error) => continue,
                Err(error) => {
                    if failed_accepts == 0 {
                        tracing::warn!(
                            listener = name, %error,
                            "accept failed; backing off (logged once until an accept succeeds)"
                        );
                    }
                    failed_accepts += 1;
                    accept_errors.inc();
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = &mut stop => break,
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        if failed_accepts > 0 {
            tracing::info!(listener = name, failed_accepts, "accepting again");
            failed_accepts = 0;
            backoff = ACCEPT_BACKOFF_MIN;
        }
        let permit = match slots.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                // Full: ask the idle connections to go, and let this one wait for the room.
                slots.make_room.send_modify(|n| *n += 1);
                match tokio::time::timeout(ACCEPT_QUEUE_WAIT, slots.permits.clone().acquire_owned())
                    .await
                {
                    Ok(Ok(permit)) => permit,
                    _ => {
                        if refusals == 0 {
                            tracing::warn!(
                                listener = name,
                                max_connections = spec.limits.max_connections,
                                "connection limit reached: refusing connections (logged once until one is taken again)"
                            );
                        }
                        refusals += 1;
                        refused.inc();
                        drop(stream);
                        continue;
                    }
                }
            }
        };
        if refusals > 0 {
            tracing::info!(listener = name, refusals, "connections taken again");
            refusals = 0;
        }
        let _ = stream.set_nodelay(true);
        let spec = spec.clone();
        let tls = tls.clone();
        let metrics = metrics.clone();
        let room = slots.make_room.subscribe();
        let shutdown = shutdown.clone();
        let open = open.clone();
        let make = make.clone();
        tokio::spawn(async move {
            open.inc();
            if let Some(gauge) = &metrics.also_open {
                gauge.inc();
            }
            match tls {
                None => {
                    let service = make(Peer {
                        addr,
                        tls: false,
                        sni: None,
                    });
                    connection(stream, service, &spec, &metrics, room, shutdown).await;
                }
                Some(choose) => {
                    let handshake = tokio::time::timeout(
                        spec.tls_handshake_timeout,
                        handshake(stream, &choose),
                    )
                    .await;
                    if let Ok(Ok(stream)) = handshake {
                        let sni = stream
                            .get_ref()
                            .1
                            .server_name()
                            .map(|s| s.to_ascii_lowercase().into_boxed_str());
                        let service = make(Peer {
                            addr,
                            tls: true,
                            sni,
                        });
                        connection(stream, service, &spec, &metrics, room, shutdown).await;
                    }
                }
            }
            open.dec();
            if let Some(gauge) = &metrics.also_open {
                gauge.dec();
            }
            drop(permit);
        });
    }
    drop(listener);
    max.sub(spec.limits.max_connections as i64);
    // Every connection saw the shutdown and is closing; they are all gone when every slot is
    // free again.
    let all = spec.limits.max_connections as u32;
    let drained = tokio::time::timeout(
        spec.drain_timeout + CLOSE_GRACE,
        slots.permits.acquire_many(all),
    )
    .await;
    if drained.is_err() {
        tracing::warn!(
            listener = name,
            "drain timeout: closing remaining connections"
        );
    }
}

/// Errors of one connection's accept that say nothing about the listener (the peer gave up
/// before it was accepted): no back-off.
fn is_connection_error(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        error.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
    )
}

/// Why the server closed a connection.
#[derive(Debug, Clone, Copy)]
enum Close {
    /// No request within `header_read_timeout` of opening.
    NoRequest,
    /// No request in flight for `idle_timeout`.
    Idle,
    /// Every slot was taken and this one had nothing in flight.
    Room,
    Shutdown,
}

impl Close {
    fn label(self) -> &'static str {
        match self {
            Close::NoRequest => "no_request",
            Close::Idle => "idle",
            Close::Room => "room",
            Close::Shutdown => "shutdown",
        }
    }
}

/// Serves one connection until it ends or is closed (see the module docs).
async fn connection<I, S, B>(
    io: I,
    service: S,
    spec: &ListenerSpec,
    metrics: &AcceptMetrics,
    mut room: watch::Receiver<u64>,
    shutdown: Shutdown,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let activity = Arc::new(Evidence::default());
    let service = Counted {
        inner: service,
        activity: activity.clone(),
        error_code: spec.error_code,
    };
    let builder = builder(spec);
    let io = Framing::new(
        io,
        activity.clone(),
        spec.error_code,
        spec.max_header_bytes / spec.head_room.max(1),
    );
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let limits = spec.limits;
    // The first check comes at the header-read timeout: a connection that has not started a
    // request by then never will (slowloris, idle sockets); later ones every idle timeout.
    let mut next_check = tokio::time::Instant::now() + limits.header_read_timeout;
    let mut finished_at_check = 0u64;
    let mut first = true;
    let mut closing: Option<(tokio::time::Instant, Close)> = None;
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        let idle = || activity.in_flight.load(Ordering::Relaxed) == 0;
        tokio::select! {
            _ = conn.as_mut() => break,
            _ = tokio::time::sleep_until(next_check), if closing.is_none() => {
                let finished = activity.finished.load(Ordering::Relaxed);
                if idle() && finished == finished_at_check {
                    if first && finished == 0 {
                        // Never sent a request: nothing to be graceful about.
                        closing = Some((tokio::time::Instant::now(), Close::NoRequest));
                        break;
                    }
                    conn.as_mut().graceful_shutdown();
                    closing = Some((tokio::time::Instant::now() + CLOSE_GRACE, Close::Idle));
                }
                first = false;
                finished_at_check = finished;
                next_check = tokio::time::Instant::now() + limits.idle_timeout;
            }
            changed = room.changed(), if closing.is_none() => {
                if changed.is_ok() && idle() {
                    // Room is needed now, and nothing is in flight here: closed at once.
                    closing = Some((tokio::time::Instant::now(), Close::Room));
                    break;
                }
            }
            _ = &mut stop, if !matches!(closing, Some((_, Close::Shutdown))) => {
                conn.as_mut().graceful_shutdown();
                closing = Some((tokio::time::Instant::now() + spec.drain_timeout, Close::Shutdown));
            }
            _ = async {
                match closing {
                    Some((deadline, _)) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            } => {
                let Some((_, reason)) = closing else { continue };
                // A request that slipped in after the close was asked for may finish within
                // the drain timeout; a connection with nothing in flight is dropped now.
                if idle() || matches!(reason, Close::Shutdown) {
                    break;
                }
                closing = Some((tokio::time::Instant::now() + spec.drain_timeout, Close::Shutdown));
            }
        }
    }
    if let Some((_, reason)) = closing {
        if !matches!(reason, Close::Shutdown) {
            metrics
                .closed
                .with_label_values(&[spec.name, reason.label()])
                .inc();
        }
    }
}

/// A request body that has sent nothing for its read timeout.
#[derive(Debug, thiserror::Error)]
#[error("the request body sent nothing for {} ms (body_read_timeout_ms)", .0.as_millis())]
pub struct BodyTimeout(pub Duration);

pin_project_lite::pin_project! {
    /// A request body that fails with [`BodyTimeout`] when no frame arrives for `timeout`
    /// (a slow-body sender holds its connection no longer than that per byte it trickles).
    pub struct TimedBody<B> {
        #[pin]
        inner: B,
        timeout: Duration,
        #[pin]
        deadline: tokio::time::Sleep,
    }
}

impl<B> TimedBody<B> {
    pub fn new(inner: B, timeout: Duration) -> TimedBody<B> {
        TimedBody {
            inner,
            timeout,
            deadline: tokio::time::sleep(timeout),
        }
    }
}

impl<B> http_body::Body for TimedBody<B>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, BoxError>>> {
        let mut this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let next = tokio::time::Instant::now() + *this.timeout;
                this.deadline.as_mut().reset(next);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.deadline.poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(*this.timeout))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Raises the soft open-file limit to the hard one, and lowers `gateway.max_connections` so
/// that a process serving its buyer listeners (plain and TLS, each with its own limit, each
/// connection possibly with an upstream connection beside it), the admin listener and, with
/// `control`, the control listener, stays within it with [`FD_RESERVE`] to spare: then a flood
/// of buyer connections can never starve the control and admin listeners of descriptors.
/// Returns the open-file limit in force.
pub fn fit_open_file_limit(config: &mut crate::config::Config, control: bool) -> u64 {
    let buyer_listeners = 1 + u64::from(config.gateway.tls_listen.is_some());
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            limit = raised;
        }
    }
    let Some(soft) = limit.current else {
        return u64::MAX;
    };
    let mut others = config.admin.connections.max_connections as u64;
    if control {
        others += config.control.connections.max_connections as u64;
    }
    let room = soft.saturating_sub(FD_RESERVE + others);
    let cap = (room / (2 * buyer_listeners.max(1))).max(MIN_BUYER_CONNECTIONS) as usize;
    let configured = config.gateway.connections.max_connections;
    if configured > cap {
        tracing::warn!(
            configured,
            lowered_to = cap,
            open_file_limit = soft,
            "gateway.max_connections lowered to fit the open-file limit (raise LimitNOFILE to serve more)"
        );
        config.gateway.connections.max_connections = cap;
    }
    soft
}

/// The fewest buyer connections [`fit_open_file_limit`] leaves.
pub const MIN_BUYER_CONNECTIONS: u64 = 16;

/// One listener's bound on guessing credentials, as a connection's service applies it: the
/// peer, the listener's table and its counters.
#[derive(Clone)]
pub struct Guarded {
    pub guard: Arc<AuthGuard>,
    pub peer: std::net::IpAddr,
    pub failures: prometheus::IntCounter,
    pub limited: prometheus::IntCounter,
}

impl Guarded {
    /// The guard of listener `name`, with its counters in `metrics`, for connections to come.
    pub fn listener(
        name: &str,
        bound: crate::auth_guard::AuthFailureLimit,
        metrics: &AcceptMetrics,
    ) -> impl Fn(std::net::IpAddr) -> Guarded + Send + Sync + 'static {
        let guard = Arc::new(AuthGuard::new(bound));
        let failures = metrics.auth_failures.with_label_values(&[name]);
        let limited = metrics.auth_limited.with_label_values(&[name]);
        move |peer| Guarded {
            guard: guard.clone(),
            peer,
            failures: failures.clone(),
            limited: limited.clone(),
        }
    }

    /// Before any credential is read: is this peer over its limit?
    pub fn check(&self, now_secs: u64) -> Result<(), Penalised> {
        self.guard.check(self.peer, now_secs).inspect_err(|_| {
            self.limited.inc();
        })
    }

    /// A credential of this peer's was refused.
    pub fn failed(&self, now_secs: u64) {
        self.failures.inc();
        self.guard.failed(self.peer, now_secs);
    }
}

/// The control and admin listeners' answer to a peer over its limit: 429 with
/// `Retry-After`, the APIG error body and a request id.
fn penalised_response(penalised: Penalised) -> Response<axum::body::Body> {
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    let message = penalised.to_string();
    let body = crate::apig::ErrorBody {
        error_code: crate::apig::THROTTLED,
        error_msg: &message,
        request_id: &request_id,
    }
    .to_json();
    Response::builder()
        .status(http::StatusCode::TOO_MANY_REQUESTS)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(
            http::header::RETRY_AFTER,
            penalised.retry_after.as_secs().max(1),
        )
        .header("x-request-id", request_id)
        .body(axum::body::Body::from(body))
        .expect("a valid response")
}

/// An axum router as the per-connection service [`serve`] takes, its request bodies bounded
/// by `body_read_timeout`, and its peer bounded in failed authentications by `guarded`:
/// every 401 the router answers counts, and a peer over its limit is answered 429 before the
/// router (and so any credential check) sees its request.
pub fn router_service(
    router: axum::Router,
    body_read_timeout: Duration,
    guarded: Guarded,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<axum::body::Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<axum::body::Body>, Infallible>> + Send,
> + Clone
       + Send
       + Sync
       + 'static {
    hyper::service::service_fn(move |request: Request<Incoming>| {
        use tower::ServiceExt;
        let router = router.clone();
        let guarded = guarded.clone();
        async move {
            let now = crate::auth_guard::now_secs();
            if let Err(penalised) = guarded.check(now) {
                return Ok(penalised_response(penalised));
            }
            let request =
                request.map(|body| axum::body::Body::new(TimedBody::new(body, body_read_timeout)));
            let response = router.oneshot(request).await?;
            if response.status() == http::StatusCode::UNAUTHORIZED {
                guarded.failed(now);
            }
            Ok(response)
        }
    })
}

/// The bounds of the control or admin listener, from its `[control]` or `[admin]` section.
pub fn router_spec(
    name: &'static str,
    limits: ConnectionLimits,
    config: &crate::config::Config,
) -> ListenerSpec {
    ListenerSpec {
        name,
        limits,
        max_header_bytes: config.gateway.max_header_bytes,
        h2_max_concurrent_streams: config.gateway.h2_max_concurrent_streams,
        tls_handshake_timeout: config.gateway.tls_handshake_timeout,
        drain_timeout: config.gateway.drain_timeout,
        error_code: crate::apig::PARAMETER_ERROR,
        head_room: 1,
    }
}

/// Serves `router` on `listener` with the bounds of `spec` until `shutdown` (the control and
/// admin listeners), over TLS when `tls` is given (the admin listener's `[admin] tls_cert`).
pub async fn serve_router(
    listener: TcpListener,
    spec: ListenerSpec,
    tls: Option<tokio_rustls::TlsAcceptor>,
    metrics: AcceptMetrics,
    router: axum::Router,
    shutdown: Shutdown,
) {
    let body_read_timeout = spec.limits.body_read_timeout;
    // One configuration for every handshake.
    let tls = tls.map(|acceptor| {
        let config = acceptor.config().clone();
        Arc::new(move |_: &rustls::server::ClientHello<'_>| config.clone()) as TlsChooser
    });
    let guarded = Guarded::listener(spec.name, spec.limits.auth_failures, &metrics);
    serve(
        listener,
        spec,
        tls,
        metrics,
        move |peer: Peer| {
            router_service(router.clone(), body_read_timeout, guarded(peer.addr.ip()))
        },
        shutdown,
    )
    .await
}
