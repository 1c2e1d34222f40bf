//! TLS between the planes (docs/operations.md, "TLS between the planes"): the admin listener
//! serving HTTPS (`[admin] tls_cert`, `tls_key`; `tls_client_ca` asks every client for a
//! certificate signed by that CA: mutual TLS), and a proxy's trust in its control planes
//! (`[proxy] control_ca`, a CA file, or `control_cert_sha256`, pinned certificates; with
//! `control_client_cert`/`control_client_key` as its own certificate for mutual TLS).
//!
//! It turns those files into rustls configurations at start, naming the key of any file that
//! does not read or parse. It owns no socket: the accept loop (`crate::accept`) serves with
//! the acceptor, and the uplink (`crate::gateway::uplink`) connects with the client
//! configuration. A leaf: it depends on the configuration only.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::config::{AdminTls, ControlTrust, ProxyConfig};

#[derive(Debug, thiserror::Error)]
pub enum PlaneTlsError {
    #[error("{key}: cannot read {}", .path.display())]
    Read {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{key}: {} holds no PEM certificate", .path.display())]
    NoCertificate { key: &'static str, path: PathBuf },
    #[error("{key}: {} holds no PEM private key", .path.display())]
    NoKey { key: &'static str, path: PathBuf },
    #[error("{key}: {} is refused by rustls", .path.display())]
    Refused {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{key}: {} holds no usable CA certificate", .path.display())]
    Verifier {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, PlaneTlsError> {
    std::fs::read(path).map_err(|source| PlaneTlsError::Read {
        key,
        path: path.to_owned(),
        source,
    })
}

fn certificates(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, PlaneTlsError> {
    let pem = read(key, path)?;
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| PlaneTlsError::Read {
            key,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(PlaneTlsError::NoCertificate {
            key,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn private_key(key: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, PlaneTlsError> {
    let pem = read(key, path)?;
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|source| PlaneTlsError::Read {
            key,
            path: path.to_owned(),
            source,
        })?
        .ok_or_else(|| PlaneTlsError::NoKey {
            key,
            path: path.to_owned(),
        })
}

fn roots(key: &'static str, path: &Path) -> Result<Arc<RootCertStore>, PlaneTlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(key, path)? {
        roots.add(cert).map_err(|source| PlaneTlsError::Refused {
            key,
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(Arc::new(roots))
}

/// The admin listener's TLS acceptor, when `[admin] tls_cert` is set: its certificate, and
/// with `tls_client_ca` a client certificate required of every connection.
pub fn admin_acceptor(
    tls: Option<&AdminTls>,
) -> Result<Option<tokio_rustls::TlsAcceptor>, PlaneTlsError> {
    let Some(tls) = tls else {
        return Ok(None);
    };
    let chain = certificates("admin.tls_cert", &tls.cert)?;
    let key = private_key("admin.tls_key", &tls.key)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions");
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots("admin.tls_client_ca", ca)?,
                provider(),
            )
            .build()
            .map_err(|source| PlaneTlsError::Verifier {
                key: "admin.tls_client_ca",
                path: ca.clone(),
                source: Box::new(source),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config =
        builder
            .with_single_cert(chain, key)
            .map_err(|source| PlaneTlsError::Refused {
                key: "admin.tls_key",
                path: tls.key.clone(),
                source,
            })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
}

/// How a proxy checks its control planes' certificates: `None` when it has no trust
/// configured (then every control URL is `http://`, which the config makes sure of).
pub fn uplink_client_config(
    proxy: &ProxyConfig,
) -> Result<Option<rustls::ClientConfig>, PlaneTlsError> {
    let Some(trust) = &proxy.control_trust else {
        return Ok(None);
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions");
    let builder = match trust {
        ControlTrust::Ca(path) => {
            let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
                roots("proxy.control_ca", path)?,
                provider(),
            )
            .build()
            .map_err(|source| PlaneTlsError::Verifier {
                key: "proxy.control_ca",
                path: path.clone(),
                source: Box::new(source),
            })?;
            builder.with_webpki_verifier(verifier)
        }
        ControlTrust::Pinned(pins) => {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Pinned {
                    pins: pins.clone(),
                    provider: provider(),
                }))
        }
    };
    let config = match &proxy.control_identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                certificates("proxy.control_client_cert", cert)?,
                private_key("proxy.control_client_key", key)?,
            )
            .map_err(|source| PlaneTlsError::Refused {
                key: "proxy.control_client_key",
                path: key.clone(),
                source,
            })?,
    };
    Ok(Some(config))
}

/// The SHA-256 of a DER certificate, in lower-case hex: what `proxy.control_cert_sha256`
/// lists (`openssl x509 -in cert.pem -outform DER | sha256sum`).
pub fn certificate_sha256(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Trusts exactly the certificates whose SHA-256 is pinned, whoever signed them and whatever
/// names they carry (an operator who pins has said which certificate is the control plane);
/// the handshake's signatures are still checked against that certificate's key.
#[derive(Debug)]
struct Pinned {
    /// Lower-case hex SHA-256 digests of DER certificates.
    pins: Vec<String>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let digest = certificate_sha256(end_entity);
        if self.pins.contains(&digest) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the control plane's certificate (sha256 {digest}) is not one pinned in \
                 proxy.control_cert_sha256"
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
