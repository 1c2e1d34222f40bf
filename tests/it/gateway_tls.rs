//! The TLS listener: a certificate per market domain by SNI from the snapshot, the default
//! one from config otherwise, ALPN h2 and http/1.1, and Host/SNI agreement.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use marketgate::gateway::Gateway;
use marketgate::shutdown::ShutdownTrigger;
use marketgate::snapshot::Certificate;
use rustls::pki_types::ServerName;
use tokio::net::TcpListener;

use crate::support::gateway::*;

struct TlsGateway {
    addr: std::net::SocketAddr,
    _trigger: ShutdownTrigger,
    _dir: tempfile::TempDir,
    market_cert: rcgen::CertifiedKey,
    default_cert: rcgen::CertifiedKey,
    backend: Backend,
}

async fn tls_gateway() -> TlsGateway {
    let backend = Backend::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let market_cert = rcgen::generate_simple_self_signed(vec![MARKET.to_owned()]).unwrap();
    let default_cert = rcgen::generate_simple_self_signed(vec!["default.test".to_owned()]).unwrap();
    let cert_path = dir.path().join("default.pem");
    let key_path = dir.path().join("default.key");
    std::fs::write(&cert_path, default_cert.cert.pem()).unwrap();
    std::fs::write(&key_path, default_cert.key_pair.serialize_pem()).unwrap();
    let config = config(
        dir.path(),
        &format!(
            "[gateway]\ntls_cert = '{}'\ntls_key = '{}'\n",
            cert_path.display(),
            key_path.display()
        ),
    );
    let gateway = Gateway::open(&config).unwrap();
    let mut snapshot = market(1, backend.addr, None);
    snapshot.certificates.push(Certificate {
        domains: vec![MARKET.to_owned()],
        cert_pem: market_cert.cert.pem(),
        key_pem: market_cert.key_pair.serialize_pem(),
    });
    gateway.apply_snapshot(snapshot).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (trigger, shutdown) = ShutdownTrigger::new();
    tokio::spawn(async move { gateway.serve_buyers_tls(listener, shutdown).await });
    TlsGateway {
        addr,
        _trigger: trigger,
        _dir: dir,
        market_cert,
        default_cert,
        backend,
    }
}

/// Connects with `sni`, trusting only `trusted`; returns the negotiated ALPN and a sender.
async fn connect(
    addr: std::net::SocketAddr,
    sni: &str,
    trusted: &rcgen::CertifiedKey,
    alpn: &[&[u8]],
) -> Result<
    (
        Option<Vec<u8>>,
        tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    ),
    std::io::Error,
> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.cert.der().clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let stream = connector
        .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp)
        .await?;
    let negotiated = stream.get_ref().1.alpn_protocol().map(|p| p.to_vec());
    Ok((negotiated, stream))
}

async fn send_h1(
    stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    request: http::Request<Full<Bytes>>,
) -> Answer {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let response = sender.send_request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

#[tokio::test]
async fn market_domain_gets_its_certificate_by_sni_and_is_served() {
    let gw = tls_gateway().await;
    let (alpn, stream) = connect(gw.addr, MARKET, &gw.market_cert, &[b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    let answer = send_h1(
        stream,
        signed_as(
            KEY,
            SECRET,
            request("GET", MARKET, "/v1/echo/9", Bytes::new()),
        ),
    )
    .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(gw.backend.last().headers["x-forwarded-proto"], "https");
}

#[tokio::test]
async fn unknown_server_names_get_the_default_certificate() {
    let gw = tls_gateway().await;
    assert!(connect(gw.addr, "default.test", &gw.default_cert, &[])
        .await
        .is_ok());
    // The market certificate is not offered for another name.
    assert!(connect(gw.addr, "default.test", &gw.market_cert, &[])
        .await
        .is_err());
}

#[tokio::test]
async fn host_and_sni_must_agree() {
    let gw = tls_gateway().await;
    let (_, stream) = connect(gw.addr, MARKET, &gw.market_cert, &[b"http/1.1"])
        .await
        .unwrap();
    let answer = send_h1(
        stream,
        signed_as(
            KEY,
            SECRET,
            request("GET", OTHER_MARKET, "/v1/x", Bytes::new()),
        ),
    )
    .await;
    assert_eq!(
        (answer.status.as_u16(), answer.code().as_str()),
        (400, "APIG.0201")
    );
    assert_eq!(gw.backend.hits(), 0);
}

#[tokio::test]
async fn h2_is_negotiated_by_alpn() {
    let gw = tls_gateway().await;
    let (alpn, stream) = connect(gw.addr, MARKET, &gw.market_cert, &[b"h2", b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut request = signed_as(
        KEY,
        SECRET,
        request("GET", MARKET, "/v1/echo/2", Bytes::new()),
    );
    // HTTP/2 carries the host in :authority.
    *request.uri_mut() = format!("https://{MARKET}/v1/echo/2").parse().unwrap();
    request.headers_mut().remove("host");
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
}
