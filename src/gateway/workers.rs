//! The data plane's threads: one event loop per core, as nginx, HAProxy and Envoy run.
//!
//! `gateway.workers = N` (0, the default: one per core this process may run on) starts N
//! threads, each a current-thread tokio runtime that accepts on its own listening socket
//! bound to the same address with `SO_REUSEPORT` (the kernel spreads new connections among
//! them) and forwards through its own upstream pool. A request never leaves the thread that
//! accepted its connection. What the workers share is the [`Gateway`]: the snapshot (one
//! `ArcSwap`) and the quota cells (atomics), so a purchase is counted exactly whichever
//! worker serves it. This module owns how many loops run and on which runtime; the accept
//! loop itself is [`super::listener`]'s. It does not run anything of the control plane's
//! (lease exchanges, snapshot applies, the admin listener): those stay on the caller's
//! runtime, off the request threads.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use super::forward::Upstream;
use super::{Gateway, Inner};
use crate::bind::BindError;
use crate::config::GatewayConfig;
use crate::shutdown::Shutdown;

/// Pending connections the kernel queues on each worker's listening socket.
pub const LISTEN_BACKLOG: i32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot start gateway worker {index}")]
    Start {
        index: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("gateway worker {index} stopped without finishing its drain")]
    Lost { index: usize },
}

/// How many task polls a worker's runtime runs before it polls for I/O and timers, when
/// tasks are always ready (tokio's default: 61). hyper serves up to 16 pipelined requests in
/// one poll of a connection, so with 61 a connection pipelining as fast as it can (4,000
/// wrong credentials in one write) kept another buyer's backend answer unread for up to
/// ~1,000 of its requests: 0.4 to 1.9 s in a debug build on a loaded machine. With 8, at most
/// ~128; each extra I/O poll is one `epoll_wait` with no timeout, and only while tasks are
/// always ready.
pub const WORKER_EVENT_INTERVAL: u32 = 8;

/// The longest a worker's runtime goes without a timer due (see [`keep_a_timer_due`]).
pub const WORKER_TIMER_FLOOR: Duration = Duration::from_secs(1);

/// How many workers `gateway.workers` asks for: itself, or for 0 the cores this process may
/// run on (its CPU affinity and cgroup quota, as `std::thread::available_parallelism` reads
/// them; `taskset -c 0` gives one).
pub fn worker_count(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// What one worker's accept loops share: its upstream pool (no other thread uses it) and
/// its count of accepted connections (`marketgate_connections_accepted_total{worker}`).
#[derive(Clone)]
pub(crate) struct WorkerContext {
    pub(crate) upstream: Upstream,
    pub(crate) accepted: prometheus::IntCounter,
}

impl WorkerContext {
    pub(crate) fn new(gateway: &Inner, index: usize) -> WorkerContext {
        WorkerContext {
            upstream: Upstream::new(&gateway.config.gateway),
            accepted: gateway.metrics.worker_accepted(index),
        }
    }
}

/// `count` listening sockets on `addr` (the value of config key `key`), each with
/// `SO_REUSEPORT`. With port 0 the first socket picks the port and the others bind that one,
/// so every worker serves one address.
///
/// `SO_REUSEPORT` would let this process join a port another process of the same user
/// already serves (another marketgate, silently sharing its buyers). So the address is first
/// bound once without it, which fails with "address in use" if anything holds the port, as
/// a plain bind would; only then are the workers' sockets bound.
pub fn bind_reuseport(
    key: &'static str,
    addr: SocketAddr,
    count: usize,
) -> Result<Vec<std::net::TcpListener>, BindError> {
    let error = |addr: SocketAddr| move |source| BindError { key, addr, source };
    let target = {
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .map_err(error(addr))?;
        probe.set_reuse_address(true).map_err(error(addr))?;
        probe.bind(&addr.into()).map_err(error(addr))?;
        probe
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .ok_or_else(|| error(addr)(std::io::ErrorKind::AddrNotAvailable.into()))?
    };
    (0..count.max(1))
        .map(|_| bind_one(target).map_err(error(target)))
        .collect()
}

fn bind_one(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// The buyer-facing sockets of every worker: `plain[i]` (and `tls[i]` when
/// `gateway.tls_listen` is set) are worker `i`'s.
#[derive(Debug)]
pub struct BuyerSockets {
    plain: Vec<std::net::TcpListener>,
    tls: Vec<std::net::TcpListener>,
}

impl BuyerSockets {
    /// Binds `gateway.listen` (and `gateway.tls_listen`) once per worker.
    pub fn bind(config: &GatewayConfig) -> Result<BuyerSockets, BindError> {
        let count = worker_count(config.workers);
        let plain = bind_reuseport("gateway.listen", config.listen, count)?;
        let tls = match config.tls_listen {
            Some(addr) => bind_reuseport("gateway.tls_listen", addr, count)?,
            None => Vec::new(),
        };
        Ok(BuyerSockets { plain, tls })
    }

    /// How many workers these sockets are for.
    pub fn workers(&self) -> usize {
        self.plain.len()
    }

    /// The address every worker accepts plain HTTP on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.plain.first().map_or_else(
            || Err(std::io::ErrorKind::NotFound.into()),
            |s| s.local_addr(),
        )
    }

    /// The address every worker accepts TLS on, when `gateway.tls_listen` is set.
    pub fn tls_addr(&self) -> Option<std::io::Result<SocketAddr>> {
        self.tls.first().map(|s| s.local_addr())
    }
}

/// Runs one worker thread per socket until `shutdown`, each draining its own connections;
/// returns once every worker has stopped.
pub async fn run(
    gateway: Gateway,
    sockets: BuyerSockets,
    shutdown: Shutdown,
) -> Result<(), WorkerError> {
    let mut tls = sockets.tls.into_iter();
    let mut stopped = Vec::with_capacity(sockets.plain.len());
    for (index, plain) in sockets.plain.into_iter().enumerate() {
        let tls = tls.next();
        let gateway = gateway.clone();
        let shutdown = shutdown.clone();
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("gateway-worker-{index}"))
            .spawn(move || {
                let runtime = match worker_runtime() {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        tracing::error!(index, %error, "cannot start a gateway worker runtime");
                        return;
                    }
                };
                run_on_worker(&runtime, serve_worker(gateway, index, plain, tls, shutdown));
                let _ = done.send(());
            })
            .map_err(|source| WorkerError::Start { index, source })?;
        stopped.push((index, finished));
    }
    for (index, finished) in stopped {
        finished.await.map_err(|_| WorkerError::Lost { index })?;
    }
    Ok(())
}

/// A worker's runtime: current-thread, so no work stealing and no cross-thread wake-ups on
/// the request path (PERF-NOTES.md, BENCHMARKS.md). I/O is polled every
/// [`WORKER_EVENT_INTERVAL`] task polls, not tokio's 61, so that one connection pipelining
/// requests as fast as it can cannot hold back its worker's other connections (adversarial
/// test `guessing_credentials_is_bounded_per_peer`).
fn worker_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .event_interval(WORKER_EVENT_INTERVAL)
        .build()
}

/// Runs `work` on a worker's `runtime` with [`keep_a_timer_due`] beside it.
fn run_on_worker<F: Future>(runtime: &tokio::runtime::Runtime, work: F) -> F::Output {
    runtime.block_on(async {
        let floor = tokio::spawn(keep_a_timer_due());
        let output = work.await;
        floor.abort();
        output
    })
}

/// Keeps a timer due within [`WORKER_TIMER_FLOOR`] on this runtime, for ever.
///
/// Why: tokio's timer wakes its own driver (an `eventfd` write, and the `epoll_wait` it
/// ends) whenever a timer is set to expire before the driver's next planned wake-up, even
/// from the driver's own thread. Every request sets such timers (the backend call's
/// timeout, hyper's header-read timeout), and with no earlier timer due, as on a connection
/// that waits for its answer alone, each cost one `write(2)` per request. With a timer
/// always due within a second, a request's timers (longer than that) never move the
/// wake-up forward. The price: an idle worker wakes once a second.
async fn keep_a_timer_due() {
    let mut tick = tokio::time::interval(WORKER_TIMER_FLOOR);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// One worker's loops: plain and (when configured) TLS, on this thread's runtime.
async fn serve_worker(
    gateway: Gateway,
    index: usize,
    plain: std::net::TcpListener,
    tls: Option<std::net::TcpListener>,
    shutdown: Shutdown,
) {
    let plain = match tokio::net::TcpListener::from_std(plain) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(index, %error, "a gateway worker cannot register its socket");
            return;
        }
    };
    let context = WorkerContext::new(&gateway.inner, index);
    let tls_task = tls.and_then(|socket| match tokio::net::TcpListener::from_std(socket) {
        Ok(listener) => {
            let gateway = gateway.clone();
            let context = context.clone();
            let shutdown = shutdown.clone();
            Some(tokio::spawn(async move {
                gateway
                    .serve_buyers_through(context, listener, true, shutdown)
                    .await
            }))
        }
        Err(error) => {
            tracing::error!(index, %error, "a gateway worker cannot register its TLS socket");
            None
        }
    });
    gateway
        .serve_buyers_through(context, plain, false, shutdown)
        .await;
    if let Some(task) = tls_task {
        let _ = task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Poll;

    /// Port 0: the first socket picks the port, every other worker's socket binds that one.
    #[test]
    fn every_worker_socket_binds_the_same_address() {
        let sockets = bind_reuseport("gateway.listen", ([127, 0, 0, 1], 0).into(), 3).unwrap();
        let addrs: Vec<SocketAddr> = sockets.iter().map(|s| s.local_addr().unwrap()).collect();
        assert_eq!(addrs.len(), 3);
        assert_ne!(addrs[0].port(), 0);
        assert!(addrs.iter().all(|a| *a == addrs[0]), "{addrs:?}");
    }

    /// A port another socket holds (even one with `SO_REUSEPORT`, as another marketgate's
    /// would be) is refused, naming the key, as a plain bind is.
    #[test]
    fn a_port_already_served_is_refused_not_shared() {
        let theirs = bind_reuseport("gateway.listen", ([127, 0, 0, 1], 0).into(), 1).unwrap();
        let addr = theirs[0].local_addr().unwrap();
        let err = bind_reuseport("gateway.listen", addr, 2).unwrap_err();
        assert_eq!(err.key, "gateway.listen");
        assert_eq!(err.source.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    }

    /// Write system calls this thread has made (Linux task I/O accounting).
    fn thread_writes() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").expect("task I/O accounting");
        io.lines()
            .find_map(|line| line.strip_prefix("syscw: "))
            .and_then(|n| n.parse().ok())
            .expect("a syscw line")
    }

    /// Requests that each set a timer longer than the floor (as a backend call's timeout
    /// does) between two parks of the runtime (as a connection waits for its next request)
    /// cost no driver wake-up (a `write(2)` on its eventfd) on a worker's runtime. On a
    /// plain current-thread runtime with a later timer due (hyper's header-read timeout),
    /// as on a worker without the floor, each costs one.
    #[test]
    fn a_request_timer_does_not_wake_the_worker_driver() {
        const REQUESTS: u64 = 200;
        let requests = || async {
            tokio::spawn(tokio::time::sleep(Duration::from_secs(30)));
            // Let the runtime settle (the floor's first tick fires at once).
            tokio::time::sleep(Duration::from_millis(20)).await;
            let before = thread_writes();
            for _ in 0..REQUESTS {
                {
                    let call =
                        tokio::time::timeout(Duration::from_secs(5), std::future::pending::<()>());
                    tokio::pin!(call);
                    let pending =
                        std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx).is_pending()));
                    assert!(pending.await);
                }
                // Parks (the driver plans its next wake-up), as between two requests.
                tokio::task::yield_now().await;
            }
            thread_writes() - before
        };
        let plain = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(requests());
        let worker = run_on_worker(&worker_runtime().unwrap(), requests());
        assert!(plain >= REQUESTS, "the plain runtime's wake-ups: {plain}");
        assert!(
            worker < REQUESTS / 20,
            "the worker runtime's wake-ups: {worker}"
        );
    }

    #[test]
    fn zero_workers_means_the_cores_this_process_may_use() {
        assert_eq!(worker_count(3), 3);
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(worker_count(0), cores);
    }
}
