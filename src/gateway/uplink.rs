//! The proxy's link to its control planes: `[proxy] control_urls` tried in order with
//! failover, the admin token, one HTTP client. The snapshot subscriber and the lease
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
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Why an exchange with a control plane got no answer.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("control plane {url} unreachable")]
    Unreachable {
        url: String,
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
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Uplink {
    /// `urls` must not be empty (config validation makes sure of it for a proxy).
    pub fn new(urls: Vec<String>, admin_token: &str) -> Uplink {
        assert!(!urls.is_empty(), "an uplink needs at least one control URL");
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        Uplink {
            urls,
            current: AtomicUsize::new(0),
            token: admin_token.to_owned(),
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

/// A control plane that does not accept a connection within this long counts as down.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
