//! Accepting buyer connections, plain and TLS, and draining them on shutdown.
//!
//! Owns the accept loop, hyper-util's `auto` server (HTTP/1.1 and HTTP/2) with its header
//! limits and header-read timeout (slowloris), the TLS acceptor whose certificate is chosen
//! by SNI from the current snapshot (else the default from config) with ALPN h2 and
//! http/1.1 and whose TLS versions are a bound domain's (`min_ssl_version`), and the graceful drain bounded by `gateway.drain_timeout`. It does not decide
//! requests: each request goes to [`super::handler::handle`] with its [`ConnInfo`].

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper::service::service_fn;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::handler::{handle, ConnInfo};
use super::workers::WorkerContext;
use super::Inner;
use crate::accept::{self, ListenerSpec, Peer, TlsChooser};
use crate::shutdown::Shutdown;
use crate::snapshot::compile::{certified_key_pem, CertificateError};
use crate::snapshot::MinTlsVersion;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the default certificate does not load")]
    Certificate(#[source] CertificateError),
}

/// Loads `gateway.tls_cert` / `gateway.tls_key`.
pub fn load_default_cert(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    certified_key_pem(&read(cert)?, &read(key)?).map_err(TlsError::Certificate)
}

/// Chooses a certificate by SNI from the snapshot served at handshake time (else the
/// default one).
struct SniResolver {
    gateway: Arc<Inner>,
}

impl std::fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SniResolver")
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let from_snapshot = hello.server_name().and_then(|name| {
            self.gateway
                .current
                .load()
                .as_ref()
                .and_then(|s| s.certificates.get(name).cloned())
        });
        from_snapshot.or_else(|| self.gateway.default_cert.clone())
    }
}

/// The buyers' TLS configurations, chosen per ClientHello: TLS 1.2 and 1.3, or TLS 1.3 only
/// for a bound domain whose `min_ssl_version` is `TLSv1.3` (its handshakes in TLS 1.2 fail
/// with a `protocol_version` alert). `TLSv1.1` and `TLSv1.2` need nothing more: rustls never
/// speaks below 1.2.
pub(crate) fn tls_chooser(gateway: Arc<Inner>) -> TlsChooser {
    let config = |versions: &[&'static rustls::SupportedProtocolVersion]| {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver {
            gateway: gateway.clone(),
        }));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    };
    let any = config(rustls::DEFAULT_VERSIONS);
    let tls13 = config(&[&rustls::version::TLS13]);
    let rules = gateway.clone();
    Arc::new(move |hello: &ClientHello<'_>| {
        let tls13_only = hello.server_name().is_some_and(|name| {
            rules.current.load().as_ref().is_some_and(|s| {
                s.domain_rules
                    .get(name)
                    .is_some_and(|r| r.min_tls_version == MinTlsVersion::Tls13)
            })
        });
        if tls13_only {
            tls13.clone()
        } else {
            any.clone()
        }
    })
}

/// The bounds of one worker's buyer listener (`name`: `buyers` or `buyers_tls`), from
/// `[gateway]`: `max_connections` is the listener's across all workers, shared evenly.
/// How many times `gateway.max_header_bytes` hyper may buffer of a buyer's request head
/// before it answers 431 itself (its answer has no APIG body): the room in which the
/// handler's own checks answer instead. Costs at most this many times the head limit per
/// connection, only while a head is being read.
pub const HEAD_ROOM: usize = 2;

pub(crate) fn spec(gateway: &Inner, name: &'static str) -> ListenerSpec {
    let config = &gateway.config.gateway;
    let mut limits = config.connections;
    let workers = super::workers::worker_count(config.workers);
    limits.max_connections = (limits.max_connections / workers).max(1);
    ListenerSpec {
        name,
        limits,
        // hyper's own bound is HEAD_ROOM times ours: a head between the two reaches the
        // handler, which answers 431 (or 414) with the APIG body and `X-Request-Id`; only
        // past hyper's bound does hyper answer a bare 431 itself (docs/request-lifecycle.md).
        max_header_bytes: config.max_header_bytes.saturating_mul(HEAD_ROOM),
        h2_max_concurrent_streams: config.h2_max_concurrent_streams,
        tls_handshake_timeout: config.tls_handshake_timeout,
        drain_timeout: config.drain_timeout,
        error_code: crate::apig::BAD_REQUEST,
        head_room: HEAD_ROOM,
    }
}

/// Accepts buyers until `shutdown`, then waits for open connections up to the drain timeout
/// (the accept loop and its bounds are [`crate::accept`]'s). Requests forward through the
/// worker's upstream pool (`context`).
pub(crate) async fn serve(
    gateway: Arc<Inner>,
    context: WorkerContext,
    listener: tokio::net::TcpListener,
    tls: Option<TlsChooser>,
    shutdown: Shutdown,
) {
    gateway.listening.store(true, Ordering::Release);
    if tls.is_some() {
        if let Ok(addr) = listener.local_addr() {
            gateway.tls_port.store(addr.port(), Ordering::Relaxed);
        }
    }
    let name = if tls.is_some() {
        "buyers_tls"
    } else {
        "buyers"
    };
    let spec = spec(&gateway, name);
    let mut metrics = gateway.metrics.accept.clone();
    metrics.also_open = Some(gateway.metrics.connections_active.clone());
    let make = move |peer: Peer| {
        let conn = Arc::new(ConnInfo::new(peer.addr, peer.tls, peer.sni));
        let gateway = gateway.clone();
        context.accepted.inc();
        let upstream = context.upstream.clone();
        service_fn(move |req| handle(gateway.clone(), upstream.clone(), conn.clone(), req))
    };
    accept::serve(listener, spec, tls, metrics, make, shutdown).await
}
