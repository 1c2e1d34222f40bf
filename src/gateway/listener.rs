//! Accepting buyer connections, plain and TLS, and draining them on shutdown.
//!
//! Owns the accept loop, hyper-util's `auto` server (HTTP/1.1 and HTTP/2) with its header
//! limits and header-read timeout (slowloris), the TLS acceptor whose certificate is chosen
//! by SNI from the current snapshot (else the default from config) with ALPN h2 and
//! http/1.1, and the graceful drain bounded by `gateway.drain_timeout`. It does not decide
//! requests: each request goes to [`super::handler::handle`] with its [`ConnInfo`].

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use super::handler::{handle, ConnInfo};
use super::workers::WorkerContext;
use super::Inner;
use crate::shutdown::Shutdown;
use crate::snapshot::compile::{certified_key_pem, CertificateError};

/// A TLS handshake must finish within this many milliseconds.
pub const TLS_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

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

/// Chooses a certificate by SNI from the snapshot served at handshake time.
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

pub(crate) fn tls_acceptor(gateway: Arc<Inner>) -> TlsAcceptor {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default versions")
    .with_no_client_auth()
    .with_cert_resolver(Arc::new(SniResolver { gateway }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    TlsAcceptor::from(Arc::new(config))
}

fn builder(gateway: &Inner) -> auto::Builder<TokioExecutor> {
    let limits = &gateway.config.gateway;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32);
    builder
}

/// Accepts until `shutdown`, then waits for open connections up to the drain timeout.
/// Requests forward through the worker's upstream pool (`context`).
pub(crate) async fn serve(
    gateway: Arc<Inner>,
    context: WorkerContext,
    listener: tokio::net::TcpListener,
    tls: Option<TlsAcceptor>,
    shutdown: Shutdown,
) {
    gateway.listening.store(true, Ordering::Release);
    let graceful = GracefulShutdown::new();
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let gateway = gateway.clone();
        context.accepted.inc();
        let upstream = context.upstream.clone();
        let tls = tls.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            gateway.metrics.connections_active.inc();
            let builder = builder(&gateway);
            match tls {
                None => {
                    let conn = Arc::new(ConnInfo::new(peer, false, None));
                    let service = {
                        let gateway = gateway.clone();
                        service_fn(move |req| {
                            handle(gateway.clone(), upstream.clone(), conn.clone(), req)
                        })
                    };
                    let connection = builder.serve_connection(TokioIo::new(stream), service);
                    let _ = watcher.watch(connection.into_owned()).await;
                }
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(
                        std::time::Duration::from_millis(TLS_HANDSHAKE_TIMEOUT_MS),
                        acceptor.accept(stream),
                    )
                    .await;
                    if let Ok(Ok(stream)) = handshake {
                        let sni = stream
                            .get_ref()
                            .1
                            .server_name()
                            .map(|s| s.to_ascii_lowercase().into_boxed_str());
                        let conn = Arc::new(ConnInfo::new(peer, true, sni));
                        let service = {
                            let gateway = gateway.clone();
                            service_fn(move |req| {
                                handle(gateway.clone(), upstream.clone(), conn.clone(), req)
                            })
                        };
                        let connection = builder.serve_connection(TokioIo::new(stream), service);
                        let _ = watcher.watch(connection.into_owned()).await;
                    }
                }
            }
            gateway.metrics.connections_active.dec();
        });
    }
    drop(listener);
    let drain = gateway.config.gateway.drain_timeout;
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(drain) => {
            tracing::warn!("drain timeout: closing remaining connections");
        }
    }
}
