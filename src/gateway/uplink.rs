//! The proxy's link to its control planes: `[proxy] control_urls` tried in order with
//! failover, the proxy's admin token (`[proxy] control_token`), one HTTP client that speaks
//! HTTPS to `https://` URLs with the trust `crate::plane_tls` built (a CA or pinned
//! certificates, and this proxy's own certificate for mutual TLS). The snapshot subscriber and the lease
//! transport both speak through it, so they move to the next control plane together and a
//! URL that failed one of them is not tried again by the other first.
//!
//! It owns which URL is current and logs each move once. It does not retry or back off
//! (callers do, with `crate::backoff`), and knows nothing of what it carries.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Why an exchange with a control plane got no answer.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// `why` is the whole chain of causes in one line (`… invalid peer certificate:
    /// UnknownIssuer`): the client's own message says only "client error (Connect)".
    #[error("control plane {url} unreachable: {why}")]
    Unreachable {
        url: String,
        why: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("control plane {url} did not answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
}

/// An answer of a control plane, whatever its status.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

pub struct Uplink {
    urls: Vec<String>,
    /// Index into `urls` of the control plane now used.
    current: AtomicUsize,
    token: String,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl Uplink {
    /// `urls` must not be empty (config validation makes sure of it for a proxy); `tls` is
    /// how `https://` URLs are trusted (config validation makes sure there is one when a URL
    /// is `https://`).
    pub fn new(urls: Vec<String>, token: &str, tls: Option<rustls::ClientConfig>) -> Uplink {
        assert!(!urls.is_empty(), "an uplink needs at least one control URL");
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.enforce_http(false);
        // Without configured trust no URL is https:// (validated): an empty root store then
        // refuses any that would be, rather than trusting anything.
        let tls = tls.unwrap_or_else(|| {
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth()
        });
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        Uplink {
            urls,
            current: AtomicUsize::new(0),
            token: token.to_owned(),
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    /// The control plane now used.
    pub fn current(&self) -> (usize, &str) {
        let index = self.current.load(Ordering::Acquire) % self.urls.len();
        (index, &self.urls[index])
    }

    /// Moves on from the control plane at `failed` to the next one, unless another caller
    /// already did. Returns the URL now current.
    pub fn fail_over(&self, failed: usize) -> &str {
        let next = (failed + 1) % self.urls.len();
        if self.urls.len() > 1
            && self
                .current
                .compare_exchange(failed, next, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            tracing::warn!(
                from = %self.urls[failed],
                to = %self.urls[next],
                "control plane failing: moving to the next in proxy.control_urls"
            );
        }
        self.current().1
    }

    /// `POST {current}{path}` with the admin token and a JSON body, answered within
    /// `timeout`. Returns the control plane's index with the outcome, for
    /// [`Uplink::fail_over`].
    pub async fn post(
        &self,
        path: &str,
        json: Vec<u8>,
        timeout: Duration,
    ) -> (usize, Result<Reply, UplinkError>) {
        let (index, base) = self.current();
        let url = format!("{base}{path}");
        let request = http::Request::post(&url)
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(json)))
            .expect("a valid request");
        let unreachable =
            |source: Box<dyn std::error::Error + Send + Sync>| UplinkError::Unreachable {
                url: base.to_owned(),
                why: causes(source.as_ref()),
                source,
            };
        let call = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| unreachable(Box::new(e)))?;
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| unreachable(Box::new(e)))?
                .to_bytes();
            Ok(Reply {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        let outcome = tokio::time::timeout(timeout, call)
            .await
            .unwrap_or_else(|_| {
                Err(UplinkError::Timeout {
                    url: base.to_owned(),
                    timeout,
                })
            });
        (index, outcome)
    }
}

/// `error` and its sources in one line, each said once (`client error (Connect): invalid
/// peer certificate: UnknownIssuer`).
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut said = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !said.contains(&text) {
            said.push_str(": ");
            said.push_str(&text);
        }
        next = cause.source();
    }
    said
}

/// A control plane that does not accept a connection within this long counts as down.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
