//! Forwarding an admitted call to its backend over pooled keep-alive connections.
//!
//! Owns the upstream client (hyper-util legacy, TCP_NODELAY, pool with idle timeout and a
//! timer), the backend URI (`backend_api` path template filled from the route's parameters,
//! the buyer's query passed through), the headers the backend gets (X-Request-Id,
//! X-Forwarded-*; never the buyer's credentials or hop-by-hop headers) and the per-API
//! timeout. Bodies stream both ways. It does not decide whether a call counts: it reports
//! whether the backend was reached ([`ForwardError::Connect`] means it was not).

use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response};
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::handler::{ConnInfo, APP_CODE_HEADER};
use crate::config::GatewayConfig;
use crate::snapshot::compile::{CompiledBackend, PathPiece};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type both directions use.
pub type Body = BoxBody<Bytes, BoxError>;

/// Upstream connect timeout, milliseconds.
pub const UPSTREAM_CONNECT_TIMEOUT_MS: u64 = 5_000;

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
    Connect(#[source] hyper_util::client::legacy::Error),
    /// The request may have reached the backend.
    #[error("the backend call failed")]
    Failed(#[source] hyper_util::client::legacy::Error),
    #[error("the backend did not answer in time")]
    Timeout,
    #[error("the backend URI does not form")]
    BadTarget,
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

/// Hop-by-hop headers (RFC 9110 §7.6.1) never forwarded.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        strip_named_in_connection(headers);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Removes the headers a `Connection` header names (rare: the common `keep-alive` and
/// `close` are removed anyway), so the usual request allocates nothing here.
fn strip_named_in_connection(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in &named {
        headers.remove(name);
    }
}

/// The pooled client to every backend.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpConnector, Body>,
}

impl Upstream {
    pub fn new(config: &GatewayConfig) -> Upstream {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_keepalive(Some(Duration::from_secs(60)));
        connector.set_connect_timeout(Some(Duration::from_millis(UPSTREAM_CONNECT_TIMEOUT_MS)));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(config.upstream_pool_idle)
            .pool_max_idle_per_host(config.upstream_pool_idle_per_host)
            .build(connector);
        Upstream { client }
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
        // Origin form only: the authority goes into the URI as parsed at compile time,
        // never re-formatted and re-parsed.
        let mut target = String::with_capacity(64);
        for piece in path {
            match piece {
                PathPiece::Literal(l) => target.push_str(l),
                PathPiece::Param(i) => target.push_str(
                    buyer
                        .params
                        .get(*i)
                        .and_then(|span| buyer.path.get(span.clone()))
                        .unwrap_or(""),
                ),
            }
        }
        if path.is_empty() || *trailing_slash {
            target.push('/');
        }
        if let Some(query) = buyer.query {
            target.push('?');
            target.push_str(query);
        }
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = Some(authority.clone());
        uri.path_and_query = Some(
            http::uri::PathAndQuery::from_maybe_shared(Bytes::from(target))
                .map_err(|_| ForwardError::BadTarget)?,
        );
        let uri = http::Uri::from_parts(uri).map_err(|_| ForwardError::BadTarget)?;

        strip_hop_by_hop(&mut headers);
        headers.remove(header::AUTHORIZATION);
        headers.remove(APP_CODE_HEADER);
        headers.remove(header::HOST);
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

        let mut request = Request::new(body);
        *request.method_mut() = method.clone().unwrap_or_else(|| buyer.method.clone());
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;

        let response = match tokio::time::timeout(*timeout, self.client.request(request)).await {
            Err(_) => return Err(ForwardError::Timeout),
            Ok(Err(e)) if e.is_connect() => return Err(ForwardError::Connect(e)),
            Ok(Err(e)) => return Err(ForwardError::Failed(e)),
            Ok(Ok(response)) => response,
        };
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(
            parts,
            body.map_err(|e| Box::new(e) as BoxError).boxed(),
        ))
    }
}
