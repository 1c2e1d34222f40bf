//! The per-request pipeline (CONTRACT §7) as named phases.
//!
//! `check_framing` → `resolve_host` → `route` → (buffer the body if the signature covers it)
//! → `authenticate` → `entitle` → `throttle` → `take_quota` → `forward` (or the MOCK answer). Each phase
//! returns `Result<_, Rejection>`; only [`handle`] writes the error response, the access-log
//! line (target `access`) and the metrics. The request loads the snapshot once and every
//! phase uses that one view. [`decide`] runs the pure phases (no I/O, no quota) for benches.

use std::borrow::Cow;
use std::convert::Infallible;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response};
use http_body::Body as _;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use time::OffsetDateTime;

use super::access_log::AccessRecord;
use super::error::Rejection;
use super::forward::BoxError;
use super::forward::{self, Body, BuyerCall, ForwardError};
use super::metrics::Outcome;
use super::throttle::Remaining;
use super::Inner;
use crate::accept::TimedBody;
use crate::apig::ErrorBody;
use crate::signing::{self, Authorization, Payload, RequestParts};
use crate::snapshot::compile::{
    AuthKind, CompiledApi, CompiledApp, CompiledBackend, CompiledGroup, CompiledPurchase,
    CompiledSnapshot, DomainKind,
};
use crate::snapshot::{MarketState, PurchaseState};

/// The header naming an AppCode.
pub const APP_CODE_HEADER: HeaderName = HeaderName::from_static("x-apig-appcode");
const MODE_HEADER: HeaderName = HeaderName::from_static("x-apig-mode");
/// Longest request target (path and query) accepted, in bytes; longer is 414.
pub const MAX_URI_BYTES: usize = 8 * 1024;
const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");
/// `X-Apig-RateLimit-{api,user,app,ip}`, by [`super::throttle::Dimension`].
const RATE_LIMIT_HEADERS: [HeaderName; 4] = [
    HeaderName::from_static("x-apig-ratelimit-api"),
    HeaderName::from_static("x-apig-ratelimit-user"),
    HeaderName::from_static("x-apig-ratelimit-app"),
    HeaderName::from_static("x-apig-ratelimit-ip"),
];

/// What a connection tells each of its requests.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: std::net::SocketAddr,
    pub tls: bool,
    /// TLS server name, lower-cased.
    pub sni: Option<Box<str>>,
    /// The peer's IP as the `X-Forwarded-For` entry, formatted once per connection.
    pub peer_ip: HeaderValue,
}

impl ConnInfo {
    /// The listener's name in metrics: `buyers` or `buyers_tls`.
    pub fn listener(&self) -> &'static str {
        if self.tls {
            "buyers_tls"
        } else {
            "buyers"
        }
    }

    pub fn new(peer: std::net::SocketAddr, tls: bool, sni: Option<Box<str>>) -> ConnInfo {
        let peer_ip = HeaderValue::from_str(&peer.ip().to_string())
            .expect("an IP address is a valid header value");
        ConnInfo {
            peer,
            tls,
            sni,
            peer_ip,
        }
    }
}

/// The parts of a request head the decision depends on.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a Method,
    /// As sent, without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The Host header (or `:authority`) as sent, port included.
    pub authority: &'a str,
    pub sni: Option<&'a str>,
    pub tls: bool,
    /// The client's address (per-IP throttling limits).
    pub peer: std::net::IpAddr,
}

/// Knobs of the decision taken from config.
#[derive(Debug, Clone, Copy)]
pub struct DecideOptions {
    pub appcode_over_http: bool,
    pub max_clock_skew_secs: i64,
}

/// An admitted request, before quota.
#[derive(Debug)]
pub struct Decision<'s, 'p> {
    pub group: &'s CompiledGroup,
    pub domain: DomainKind,
    pub api: &'s CompiledApi,
    pub params: Vec<&'p str>,
    pub app: Option<&'s CompiledApp>,
    pub purchase: Option<&'s CompiledPurchase>,
    /// What the throttling policy bound to the API left (none bound: empty).
    pub throttled: Remaining,
}

/// Every phase that needs no I/O, in order: resolve host, route, authenticate, entitle,
/// throttle.
/// Hot path; callable from a bench with a compiled snapshot and a request head.
pub fn decide<'s, 'p>(
    snapshot: &'s CompiledSnapshot,
    head: &RequestHead<'p>,
    payload: Payload<'_>,
    now: OffsetDateTime,
    options: DecideOptions,
) -> Result<Decision<'s, 'p>, Rejection> {
    let (group, domain) = resolve_host(snapshot, head)?;
    let (api, params) = route(group, domain, head)?;
    let signed = read_authorization(api, head)?;
    let app = authenticate(
        snapshot,
        api,
        head,
        signed.as_ref(),
        false,
        payload,
        now,
        options,
    )?;
    let purchase = entitle(group, domain, api, app, now)?;
    let throttled = throttle(snapshot, api, app, head.peer, now)?;
    Ok(Decision {
        group,
        domain,
        api,
        params,
        app,
        purchase,
        throttled,
    })
}

/// Phase 0: request framing a proxy must refuse (smuggling vectors).
pub fn check_framing(headers: &HeaderMap) -> Result<(), Rejection> {
    if headers.get_all(header::HOST).iter().count() > 1 {
        return Err(Rejection::BadRequest("more than one Host header"));
    }
    if headers.contains_key(header::CONTENT_LENGTH)
        && headers.contains_key(header::TRANSFER_ENCODING)
    {
        return Err(Rejection::BadRequest(
            "both Content-Length and Transfer-Encoding",
        ));
    }
    if headers.get_all(header::CONTENT_LENGTH).iter().count() > 1 {
        return Err(Rejection::BadRequest("more than one Content-Length header"));
    }
    Ok(())
}

/// The path as routing (and the signature's canonical form) sees it: `%2F` (either case)
/// decoded to `/`. Huawei's signer decodes the whole path before it splits it into segments
/// (docs/spec/signing.md), so `/a%2Fb` and `/a/b` carry one signature; routing the form the
/// signature covers means one signed request reaches one API, never another by a re-encoded
/// slash (as nginx, which also matches locations on the decoded path). Hot path: borrowed,
/// with no allocation, unless the path holds a `%2F`.
pub fn routed_path(path: &str) -> Cow<'_, str> {
    let is_encoded_slash = |w: &[u8]| w[0] == b'%' && w[1] == b'2' && (w[2] | 0x20) == b'f';
    if !path.contains('%') || !path.as_bytes().windows(3).any(is_encoded_slash) {
        return Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut routed = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if i + 2 < bytes.len() && is_encoded_slash(&bytes[i..i + 3]) {
            routed.push('/');
            i += 3;
        } else {
            // `path` is a str and '%', '2', 'F' are ASCII: copying up to the next escape
            // keeps every UTF-8 sequence whole.
            let next = bytes[i + 1..]
                .iter()
                .position(|&b| b == b'%')
                .map_or(bytes.len(), |p| i + 1 + p);
            routed.push_str(&path[i..next]);
            i = next;
        }
    }
    Cow::Owned(routed)
}

/// The size of a request head as sent over HTTP/1 (request line and header lines), to
/// hold it to `gateway.max_header_bytes` (hyper's own bound is `listener::HEAD_ROOM` times
/// that). Hot path: a walk over the header map, no allocation.
fn head_bytes(headers: &HeaderMap, target_bytes: usize) -> usize {
    // "METHOD target HTTP/1.1\r\n", the method counted as a long one.
    let request_line = 7 + 1 + target_bytes + 11;
    headers.iter().fold(request_line + 2, |sum, (name, value)| {
        sum + name.as_str().len() + 2 + value.len() + 2
    })
}

fn host_without_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority
            .split_once(']')
            .map_or(authority, |(h, _)| &h[1..]);
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

/// Phase 1: Host (and SNI) → group.
pub fn resolve_host<'s>(
    snapshot: &'s CompiledSnapshot,
    head: &RequestHead<'_>,
) -> Result<(&'s CompiledGroup, DomainKind), Rejection> {
    let host = host_without_port(head.authority);
    let host: Cow<'_, str> = if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    };
    if let Some(sni) = head.sni {
        if *sni != *host {
            return Err(Rejection::HostSniMismatch);
        }
    }
    let &(index, domain) = snapshot
        .hosts
        .get(host.as_ref())
        .ok_or(Rejection::UnknownHost)?;
    let group = &snapshot.groups[index];
    if domain == DomainKind::Market {
        match group.state {
            MarketState::Delisted => return Err(Rejection::Delisted),
            MarketState::Unlisted | MarketState::Locked => return Err(Rejection::UnknownHost),
            MarketState::OnSale | MarketState::OffSale => {}
        }
    }
    Ok((group, domain))
}

/// Phase 1b, plain HTTP only: a seller's bound domain that asks for HTTPS
/// (`is_http_redirect_to_https`) is answered with a redirect to the same URL over HTTPS, on
/// the port the TLS listener is bound to (`tls_port`; none named when it is 443, or 0: no
/// TLS listener, so TLS is terminated in front, on 443). 301 for GET and HEAD, 308 otherwise (the method
/// and body are kept). Costs nothing while no bound domain exists.
pub fn https_redirect(
    snapshot: &CompiledSnapshot,
    head: &RequestHead<'_>,
    tls_port: u16,
) -> Option<Response<Body>> {
    if head.tls || snapshot.domain_rules.is_empty() {
        return None;
    }
    let host = host_without_port(head.authority).to_ascii_lowercase();
    if !snapshot.domain_rules.get(host.as_str())?.https_redirect {
        return None;
    }
    let port = match tls_port {
        0 | 443 => String::new(),
        port => format!(":{port}"),
    };
    let query = head.query.map_or(String::new(), |q| format!("?{q}"));
    let location = format!("https://{host}{port}{}{query}", head.path);
    let status = if matches!(*head.method, http::Method::GET | http::Method::HEAD) {
        http::StatusCode::MOVED_PERMANENTLY
    } else {
        http::StatusCode::PERMANENT_REDIRECT
    };
    let mut response = Response::new(forward::full(Bytes::new()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::LOCATION, HeaderValue::from_str(&location).ok()?);
    Some(response)
}

/// Phase 2: method and path → API (sellable only on the market domain).
pub fn route<'s, 'p>(
    group: &'s CompiledGroup,
    domain: DomainKind,
    head: &RequestHead<'p>,
) -> Result<(&'s CompiledApi, Vec<&'p str>), Rejection> {
    let matched = group
        .router
        .find(head.method, head.path)
        .ok_or(Rejection::NoRoute)?;
    let api = &group.apis[matched.target];
    if domain == DomainKind::Market && !api.sellable {
        return Err(Rejection::NoRoute);
    }
    if (api.https_only && !head.tls) || (api.http_only && head.tls) {
        return Err(Rejection::NoRoute);
    }
    Ok((api, matched.params))
}

/// Phase 3, its one parse: the `Authorization` header of a request on an APP-auth API,
/// read once and handed to [`screen_signature`] (before the body) and [`authenticate`]
/// (after it). `None`: another auth type, or no such header.
pub fn read_authorization<'h>(
    api: &CompiledApi,
    head: &RequestHead<'h>,
) -> Result<Option<Authorization<'h>>, Rejection> {
    if !matches!(api.auth, AuthKind::App) {
        return Ok(None);
    }
    let Some(value) = head.headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| Rejection::AuthFailed("Authorization is not text"))?;
    Authorization::parse(value)
        .map(Some)
        .map_err(signature_rejection)
}

/// Phase 3: who is calling. `None` only for a `NONE`-auth API on the seller domain.
/// `signed` is [`read_authorization`]'s answer for this request; `head_checked`: the served
/// path's [`screen_signature`] passed [`signing::check_head`] for this very head at this
/// `now` already, so only the signature is left to check (hot path: not twice).
#[allow(clippy::too_many_arguments)]
pub fn authenticate<'s>(
    snapshot: &'s CompiledSnapshot,
    api: &CompiledApi,
    head: &RequestHead<'_>,
    signed: Option<&Authorization<'_>>,
    head_checked: bool,
    payload: Payload<'_>,
    now: OffsetDateTime,
    options: DecideOptions,
) -> Result<Option<&'s CompiledApp>, Rejection> {
    match api.auth {
        AuthKind::None => return Ok(None),
        AuthKind::Unsupported => return Err(Rejection::AuthFailed("unsupported auth type")),
        AuthKind::App => {}
    }
    if let Some(auth) = signed {
        let app = snapshot.app_by_key(auth.access);
        // An unknown key is verified against a dummy secret so it costs the same time.
        let secret: &[u8] = app.map_or(b"unknown-app-key".as_slice(), |a| a.secret());
        let parts = RequestParts {
            method: head.method.as_str(),
            path: head.path,
            query: head.query,
            headers: head.headers,
            authority: Some(head.authority),
            payload,
        };
        if head_checked {
            signing::verify_checked(auth, &parts, secret)
        } else {
            signing::verify(auth, &parts, secret, now, options.max_clock_skew_secs)
        }
        .map_err(signature_rejection)?;
        return app
            .map(Some)
            .ok_or(Rejection::AuthFailed("unknown app key"));
    }
    if let Some(code) = head.headers.get(APP_CODE_HEADER) {
        if !api.app_code_auth {
            return Err(Rejection::AuthFailed("AppCode is not enabled for this API"));
        }
        if !head.tls && !options.appcode_over_http {
            return Err(Rejection::AuthFailed("AppCode is refused over plain HTTP"));
        }
        let code = code
            .to_str()
            .map_err(|_| Rejection::AuthFailed("AppCode is not text"))?;
        return snapshot
            .app_by_code(code)
            .map(Some)
            .ok_or(Rejection::AuthFailed("unknown AppCode"));
    }
    Err(Rejection::AuthFailed("no Authorization or X-Apig-AppCode"))
}

/// The access log's `auth_rule` for a signature made with a key no app has.
const UNKNOWN_APP_KEY: &str = "unknown app key";

/// The AppKey (`Access=`) of a parseable `Authorization` header. Failure path only.
fn claimed_app_key(headers: &HeaderMap) -> Option<Box<str>> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    Authorization::parse(value)
        .ok()
        .map(|auth| auth.access.into())
}

/// Phase 3, the part that needs no body: for a signed request on an APP-auth API, the key
/// must be known and [`signing::check_head`] pass, so that a request that can never verify
/// is refused before its body is buffered. Answers as [`authenticate`] would.
fn screen_signature(
    snapshot: &CompiledSnapshot,
    head: &RequestHead<'_>,
    signed: Option<&Authorization<'_>>,
    now: OffsetDateTime,
    options: DecideOptions,
) -> Result<(), Rejection> {
    let Some(auth) = signed else {
        return Ok(());
    };
    let parts = RequestParts {
        method: head.method.as_str(),
        path: head.path,
        query: head.query,
        headers: head.headers,
        authority: Some(head.authority),
        payload: Payload::Unsigned,
    };
    signing::check_head(auth, &parts, now, options.max_clock_skew_secs)
        .map_err(signature_rejection)?;
    if snapshot.app_by_key(auth.access).is_none() {
        return Err(Rejection::AuthFailed(UNKNOWN_APP_KEY));
    }
    Ok(())
}

/// A signature error as the buyer is answered: a header signed but sent twice is a malformed
/// request (400); every other is the same 401.
fn signature_rejection(error: signing::SignatureError) -> Rejection {
    match error {
        signing::SignatureError::SignedHeaderRepeated => {
            Rejection::BadRequest("a signed header appears more than once")
        }
        error => Rejection::Signature(error),
    }
}

/// A failed read of the buyer's body: over the limit is 413, anything else (malformed
/// chunked framing, a silent or vanished sender) 400.
fn body_rejection(error: BoxError) -> Rejection {
    if error.is::<http_body_util::LengthLimitError>() {
        Rejection::BodyTooLarge
    } else {
        Rejection::BodyRead(error)
    }
}

pin_project_lite::pin_project! {
    /// The buyer's body streamed to the backend: bounded in size and in silence, and when it
    /// fails, the failure is kept (`fault`) so that the call is answered as the buyer's fault
    /// (400/413, given back) rather than as the backend's (502, charged).
    struct BuyerBody {
        #[pin]
        inner: Limited<TimedBody<Incoming>>,
        fault: Arc<std::sync::Mutex<Option<Rejection>>>,
    }
}

impl BuyerBody {
    fn new(
        body: Incoming,
        max: usize,
        timeout: Duration,
        fault: Arc<std::sync::Mutex<Option<Rejection>>>,
    ) -> BuyerBody {
        BuyerBody {
            inner: Limited::new(TimedBody::new(body, timeout), max),
            fault,
        }
    }
}

impl http_body::Body for BuyerBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match std::task::ready!(this.inner.poll_frame(cx)) {
            Some(Err(error)) => {
                let message = error.to_string();
                let mut fault = this.fault.lock().unwrap_or_else(|e| e.into_inner());
                fault.get_or_insert(body_rejection(error));
                std::task::Poll::Ready(Some(Err(message.into())))
            }
            other => std::task::Poll::Ready(other),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Phase 4: may this app call this API now?
pub fn entitle<'s>(
    group: &CompiledGroup,
    domain: DomainKind,
    api: &CompiledApi,
    app: Option<&'s CompiledApp>,
    now: OffsetDateTime,
) -> Result<Option<&'s CompiledPurchase>, Rejection> {
    let Some(app) = app else {
        return Ok(None);
    };
    match domain {
        DomainKind::Seller => {
            if api.authorized_apps.contains(&app.index) {
                Ok(None)
            } else {
                Err(Rejection::NotAuthorized)
            }
        }
        DomainKind::Market => {
            let purchase = app.purchase.as_ref().ok_or(Rejection::NotAuthorized)?;
            if purchase.group != group.index {
                return Err(Rejection::NotAuthorized);
            }
            let now = now.unix_timestamp();
            let active = purchase.state == PurchaseState::Active
                && now >= purchase.start_time
                && now < purchase.expire_time;
            if !active {
                return Err(Rejection::PurchaseInactive);
            }
            Ok(Some(purchase))
        }
    }
}

/// Phase 5: the request throttling policy bound to the API (CONTRACT §7 step 6), before the
/// purchase's call is taken: a throttled call costs no bought call. Hot path: nothing when no
/// policy is bound; otherwise one compare-and-swap per limit (`gateway::throttle`).
pub fn throttle(
    snapshot: &CompiledSnapshot,
    api: &CompiledApi,
    app: Option<&CompiledApp>,
    peer: std::net::IpAddr,
    now: OffsetDateTime,
) -> Result<Remaining, Rejection> {
    let Some(policy) = &api.throttle else {
        return Ok(Remaining::default());
    };
    // Seconds and milliseconds, not `unix_timestamp_nanos() / 1_000_000`: that is a 128-bit
    // division (`__divti3`, about 60 instructions of the ~400 the phase cost; callgrind).
    let local_ms = now.unix_timestamp() * 1000 + i64::from(now.millisecond());
    let registry = &*snapshot.throttle;
    policy
        .admit(
            app.map(|a| a.index as u32),
            peer,
            registry.now_ms(local_ms),
            registry,
        )
        .map_err(Rejection::Throttled)
}

/// Phase 5 on a leased proxy: a refusal because this proxy's allotment of the window ran
/// short of the limit asks the allotment client for more and tries again while the wait
/// lasts, so that calls the fleet may still admit are not refused for where they landed.
async fn throttle_or_refill(
    snapshot: &CompiledSnapshot,
    api: &CompiledApi,
    app: Option<&CompiledApp>,
    peer: std::net::IpAddr,
    gateway: &Inner,
) -> Result<Remaining, Rejection> {
    let mut result = throttle(snapshot, api, app, peer, OffsetDateTime::now_utc());
    let deadline = Instant::now() + REFILL_WAIT;
    while let Err(Rejection::Throttled(refusal)) = &result {
        if refusal.settle_ms > 0 {
            // Near a window's ends: the next window opens within twice the skew allowance
            // (then the call is decided, never refused for the guard itself).
            tokio::time::sleep(Duration::from_millis(refusal.settle_ms)).await;
        } else if !refusal.short.is_empty() {
            let Some(wait) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            if !gateway
                .allotments
                .wait_for_refill(&refusal.short, wait)
                .await
            {
                break;
            }
        } else {
            break;
        }
        result = throttle(snapshot, api, app, peer, OffsetDateTime::now_utc());
    }
    match &mut result {
        Ok(remaining) => {
            if let Some((counter, window)) = remaining.ahead.take() {
                gateway.allotments.want(&counter, window);
            }
        }
        Err(_) => {
            if let Some(policy) = &api.throttle {
                policy.throttled.inc();
            }
        }
    }
    result
}

/// Phase 6: take one call from the purchase (waiting, without blocking the thread, in the
/// rare case that the quota journal is behind).
pub async fn take_quota(purchase: &CompiledPurchase) -> Result<(), Rejection> {
    match purchase.cell.take().await {
        Ok(true) => Ok(()),
        Ok(false) => Err(Rejection::QuotaExhausted),
        Err(e) => Err(Rejection::Quota(e)),
    }
}

/// How long a buyer's call waits for a lease refill when this proxy's lease of a purchase
/// ran dry but the control plane still has calls to lease.
pub const REFILL_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Phase 5 with leases: when the cell is dry but the purchase has calls left beyond this
/// proxy's lease (unleased, or held by other proxies, which the control plane then asks to
/// give back their excess), ask the lease client for a refill and wait for it, so a buyer is
/// not refused calls they own. Only a purchase with no calls left anywhere is "used up".
async fn take_quota_or_refill(
    purchase: &CompiledPurchase,
    gateway: &Inner,
) -> Result<(), Rejection> {
    let mut taken = take_quota(purchase).await;
    if matches!(taken, Err(Rejection::QuotaExhausted)) && purchase.cell.may_refill() {
        // Concurrent callers may drain a refill before this one retries: keep asking until
        // the control plane says no calls are left beyond this lease or the wait is over
        // (then: retry shortly, not "used up"). With the control plane unreachable no refill
        // can come: the buyer is told at once.
        purchase.cell.note_turned_away();
        let deadline = Instant::now() + REFILL_WAIT;
        while matches!(taken, Err(Rejection::QuotaExhausted)) && purchase.cell.may_refill() {
            if gateway.quota.control_unreachable() {
                taken = Err(Rejection::LeaseUnavailable);
                break;
            }
            let Some(wait) = deadline.checked_duration_since(Instant::now()) else {
                taken = Err(Rejection::CallsLeasedElsewhere);
                break;
            };
            gateway.quota.wait_for_refill(&purchase.cell, wait).await;
            taken = take_quota(purchase).await;
        }
    }
    match &taken {
        Ok(()) => gateway.quota.note_usage(&purchase.cell),
        Err(Rejection::Quota(_)) => gateway.metrics.quota_journal_errors.inc(),
        Err(_) => {}
    }
    taken
}

/// What the access log and metrics learn as the phases run.
#[derive(Default)]
struct Trace<'s> {
    group: Option<&'s CompiledGroup>,
    api: Option<&'s CompiledApi>,
    app: Option<&'s CompiledApp>,
    /// The AppKey an `Authorization` header named, kept only when authentication failed: the
    /// access log names the key a refused caller used (an identifier, never a secret).
    claimed_key: Option<Box<str>>,
    /// The claimed key is no app's: the signature was checked against a dummy secret (so an
    /// unknown key costs the same time) and failed, but the rule an operator needs is this.
    unknown_key: bool,
    purchase: Option<&'s CompiledPurchase>,
    upstream: Option<Duration>,
    /// What the throttling policy left, for the debug headers.
    throttled: Remaining,
}

/// Request ids per shared buffer: one allocation serves this many requests.
const REQUEST_IDS_PER_BUFFER: usize = 1024;

thread_local! {
    /// Room for the next request ids of this thread: each id is split off the front and
    /// shares the buffer (a reference count, not an allocation of its own).
    static REQUEST_ID_BUFFER: std::cell::RefCell<bytes::BytesMut> =
        std::cell::RefCell::new(bytes::BytesMut::new());
}

/// A random (v4) UUID in simple form. Hot path: drawn from the thread-local CSPRNG, not
/// `Uuid::new_v4`, which makes a `getrandom` system call for every id, and written into a
/// thread-local buffer shared by the next ids, not an allocation per id.
pub(crate) fn new_request_id() -> HeaderValue {
    let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut text = [0u8; uuid::fmt::Simple::LENGTH];
    id.simple().encode_lower(&mut text);
    let bytes = REQUEST_ID_BUFFER.with_borrow_mut(|buffer| {
        if buffer.capacity() - buffer.len() < text.len() {
            *buffer = bytes::BytesMut::with_capacity(text.len() * REQUEST_IDS_PER_BUFFER);
        }
        buffer.extend_from_slice(&text);
        buffer.split().freeze()
    });
    HeaderValue::from_maybe_shared(bytes).expect("hex is a valid header value")
}

/// Where each of `params` (sub-slices of `path`) lies in `path`.
fn spans(path: &str, params: &[&str]) -> Vec<Range<usize>> {
    let base = path.as_ptr() as usize;
    params
        .iter()
        .map(|p| {
            let start = p.as_ptr() as usize - base;
            start..start + p.len()
        })
        .collect()
}

/// The service of a buyer connection: runs the phases, answers, logs, counts.
pub(crate) async fn handle(
    gateway: Arc<Inner>,
    upstream: forward::Upstream,
    conn: Arc<ConnInfo>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let request_id = new_request_id();
    let debug = request
        .headers()
        .get(MODE_HEADER)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"debug"));
    // For the access log: cheap clones (shared bytes), taken before the phases consume the
    // request. The query string is never logged.
    let method = request.method().clone();
    let uri = request.uri().clone();
    let host = request.headers().get(header::HOST).cloned();
    let bytes_in = content_length(request.headers());
    let snapshot = gateway.current.load_full();
    let mut trace = Trace::default();
    let result = match &snapshot {
        None => Err(Rejection::NotReady),
        Some(snapshot) => {
            let context = Served {
                gateway: &gateway,
                upstream: &upstream,
                conn: &conn,
                request_id: &request_id,
            };
            serve(context, snapshot, request, &mut trace).await
        }
    };
    let (mut response, outcome, error_code, rejection) = match result {
        Ok(response) => (response, Outcome::Ok, None, None),
        Err(rejection) => (
            error_response(&rejection, &request_id),
            rejection.outcome(),
            Some(rejection.code()),
            Some(rejection),
        ),
    };
    match &rejection {
        // Every refused credential counts against its peer (`crate::auth_guard`).
        Some(rejection) if rejection.status() == http::StatusCode::UNAUTHORIZED => {
            gateway
                .metrics
                .accept
                .auth_failures
                .with_label_values(&[conn.listener()])
                .inc();
            gateway
                .auth_guard
                .failed(conn.peer.ip(), crate::auth_guard::now_secs());
        }
        Some(Rejection::AuthLimited(penalised)) => {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(penalised.retry_after.as_secs().max(1)),
            );
        }
        // Every 503 is retryable (no snapshot yet, no lease to be had, a journal that cannot
        // be written): say when to come back.
        Some(rejection) if rejection.status() == http::StatusCode::SERVICE_UNAVAILABLE => {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        _ => {}
    }
    let latency = started.elapsed();
    let headers = response.headers_mut();
    headers.reserve(1);
    headers.insert(REQUEST_ID_HEADER, request_id.clone());
    if debug {
        headers.insert(
            "x-apig-latency",
            HeaderValue::from(latency.as_millis() as u64),
        );
        if let Some(upstream) = trace.upstream {
            headers.insert(
                "x-apig-upstream-latency",
                HeaderValue::from(upstream.as_millis() as u64),
            );
        }
        if let Some(left) = trace.purchase.and_then(|p| p.cell.left()) {
            headers.insert("x-apig-quota-remaining", HeaderValue::from(left));
        }
        if let Some(policy) = trace.api.and_then(|a| a.throttle.as_ref()) {
            for (dimension, remain, limit) in trace.throttled.dims.iter().flatten() {
                let value = super::throttle::header_value(*remain, *limit, &policy.rule);
                if let Ok(value) = HeaderValue::from_str(&value) {
                    headers.insert(RATE_LIMIT_HEADERS[*dimension as usize].clone(), value);
                }
            }
        }
    }
    if let Some(Rejection::Throttled(refusal)) = &rejection {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(refusal.retry_after));
    }
    let counters = trace
        .group
        .map_or(&gateway.metrics.no_group, |g| &g.counters);
    counters.count(outcome);
    counters.observe_request(latency.as_secs_f64());
    if let Some(upstream) = trace.upstream {
        counters.observe_upstream(upstream.as_secs_f64());
    }
    // The fields docs/operations.md ("Access log") promises; never a secret: the AppKey is an
    // identifier, and no header value but Host is read.
    AccessRecord {
        request_id: request_id.to_str().unwrap_or(""),
        node_id: gateway.config.proxy.node_id.as_str(),
        remote_addr: conn.peer,
        host: host
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .or(conn.sni.as_deref())
            .unwrap_or(""),
        method: method.as_str(),
        path: uri.path(),
        group_id: trace.group.map(|g| &*g.id),
        group_name: trace.group.map(|g| &*g.name),
        api_id: trace.api.map(|a| &*a.id),
        app_key: trace.app.map(|a| a.key()).or(trace.claimed_key.as_deref()),
        auth_rule: if trace.unknown_key {
            Some(&UNKNOWN_APP_KEY)
        } else {
            rejection.as_ref().and_then(Rejection::auth_rule)
        },
        purchase_id: trace.purchase.map(|p| p.id()),
        throttle_id: trace
            .api
            .and_then(|a| a.throttle.as_ref())
            .map(|t| &*t.rule.id),
        status: response.status().as_u16(),
        outcome: outcome.as_str(),
        error_code,
        duration_ms: latency.as_secs_f64() * 1000.0,
        upstream_ms: trace.upstream.map(|u| u.as_secs_f64() * 1000.0),
        bytes_in,
        bytes_out: response.body().size_hint().exact(),
        quota_left: trace.purchase.and_then(|p| p.cell.purchase_left()),
        lease_left: trace.purchase.and_then(|p| p.cell.lease_left()),
    }
    .log();
    // A request that held the snapshot across a swap may be its last holder. Freeing a
    // large one takes tens of milliseconds (BENCHMARKS.md), which must not stall every
    // connection on this runtime thread: the blocking pool frees it.
    if let Some(snapshot) = snapshot {
        if Arc::strong_count(&snapshot) == 1 {
            tokio::task::spawn_blocking(move || drop(snapshot));
        }
    }
    Ok(response)
}

/// The declared body size (`Content-Length`), when the request or response has one.
fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn error_response(rejection: &Rejection, request_id: &HeaderValue) -> Response<Body> {
    let message = rejection.to_string();
    let body = ErrorBody {
        error_code: rejection.code(),
        error_msg: &message,
        request_id: request_id.to_str().unwrap_or(""),
    }
    .to_json();
    let mut response = Response::new(forward::full(Bytes::from(body)));
    *response.status_mut() = rejection.status();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// What [`serve`] runs a request with besides the snapshot: the gateway, this loop's
/// upstream pool, the connection and the request's id.
#[derive(Clone, Copy)]
struct Served<'a> {
    gateway: &'a Inner,
    upstream: &'a forward::Upstream,
    conn: &'a ConnInfo,
    request_id: &'a HeaderValue,
}

async fn serve<'s>(
    context: Served<'_>,
    snapshot: &'s CompiledSnapshot,
    request: Request<Incoming>,
    trace: &mut Trace<'s>,
) -> Result<Response<Body>, Rejection> {
    let Served {
        gateway,
        upstream,
        conn,
        request_id,
    } = context;
    let (mut parts, body) = request.into_parts();
    check_framing(&parts.headers)?;
    let target_bytes = parts.uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    if target_bytes > MAX_URI_BYTES {
        return Err(Rejection::UriTooLong);
    }
    if head_bytes(&parts.headers, target_bytes) > gateway.config.gateway.max_header_bytes {
        return Err(Rejection::HeadersTooLarge);
    }
    let authority = match parts.headers.get(header::HOST) {
        Some(host) => host
            .to_str()
            .map_err(|_| Rejection::BadRequest("Host is not text"))?,
        None => parts
            .uri
            .authority()
            .map(|a| a.as_str())
            .ok_or(Rejection::BadRequest("no Host header"))?,
    };
    if let (Some(uri_authority), Some(_)) = (parts.uri.authority(), parts.headers.get(header::HOST))
    {
        if !uri_authority.as_str().eq_ignore_ascii_case(authority) {
            return Err(Rejection::BadRequest("Host and request target disagree"));
        }
    }
    let path = routed_path(parts.uri.path());
    let head = RequestHead {
        method: &parts.method,
        path: &path,
        query: parts.uri.query(),
        headers: &parts.headers,
        authority,
        sni: conn.sni.as_deref(),
        tls: conn.tls,
        peer: conn.peer.ip(),
    };
    let options = DecideOptions {
        appcode_over_http: gateway.config.gateway.appcode_over_http,
        max_clock_skew_secs: gateway.config.gateway.max_clock_skew.as_secs() as i64,
    };
    let (group, domain) = resolve_host(snapshot, &head)?;
    trace.group = Some(group);
    if let Some(redirect) = https_redirect(
        snapshot,
        &head,
        gateway.tls_port.load(std::sync::atomic::Ordering::Relaxed),
    ) {
        return Ok(redirect);
    }
    let (api, params) = route(group, domain, &head)?;
    trace.api = Some(api);
    // Positions rather than borrows, so that the buyer's headers can be handed on to the
    // backend call (moved, not copied) once authentication is done with them.
    let params = spans(head.path, &params);

    let max_body = gateway.config.gateway.max_body_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_body as u64) {
        return Err(Rejection::BodyTooLarge);
    }
    let now = OffsetDateTime::now_utc();
    // A peer that guessed too often this window is refused before any credential is read.
    if matches!(api.auth, AuthKind::App) {
        gateway
            .auth_guard
            .check(conn.peer.ip(), now.unix_timestamp().max(0) as u64)
            .map_err(|penalised| {
                gateway
                    .metrics
                    .accept
                    .auth_limited
                    .with_label_values(&[conn.listener()])
                    .inc();
                Rejection::AuthLimited(penalised)
            })?;
    }
    // Nothing unauthenticated costs memory: a signature that can never verify (an unknown
    // AppKey, a skewed date, a header signed twice) is refused before the body is read.
    let signed = read_authorization(api, &head).and_then(|signed| {
        screen_signature(snapshot, &head, signed.as_ref(), now, options).map(|()| signed)
    });
    let signed = signed.inspect_err(|_| {
        trace.claimed_key = claimed_app_key(head.headers);
        trace.unknown_key = trace
            .claimed_key
            .as_deref()
            .is_some_and(|key| snapshot.app_by_key(key).is_none());
    })?;
    let body_timeout = gateway.config.gateway.connections.body_read_timeout;
    let signed_body = parts.headers.contains_key(header::AUTHORIZATION)
        && signing::needs_body(&parts.headers)
        && !body.is_end_stream();
    let (buffered, streamed) = if signed_body {
        let bytes = Limited::new(TimedBody::new(body, body_timeout), max_body)
            .collect()
            .await
            .map_err(body_rejection)?
            .to_bytes();
        (Some(bytes), None)
    } else if body.is_end_stream() {
        (None, None)
    } else {
        (None, Some(body))
    };
    let payload = Payload::Body(buffered.as_deref().unwrap_or(&[]));
    let app = authenticate(
        snapshot,
        api,
        &head,
        signed.as_ref(),
        true,
        payload,
        now,
        options,
    )
    .inspect_err(|_| {
        trace.claimed_key = signed.as_ref().map(|auth| auth.access.into());
        trace.unknown_key = signed
            .as_ref()
            .is_some_and(|auth| snapshot.app_by_key(auth.access).is_none());
    })?;
    trace.app = app;
    let purchase = entitle(group, domain, api, app, now)?;
    trace.purchase = purchase;
    trace.throttled = throttle_or_refill(snapshot, api, app, head.peer, gateway).await?;
    if let Some(purchase) = purchase {
        take_quota_or_refill(purchase, gateway).await?;
    }

    match &api.backend {
        CompiledBackend::Mock { status, body } => {
            let mut response = Response::new(forward::full(body.clone()));
            *response.status_mut() = *status;
            Ok(response)
        }
        CompiledBackend::Http { .. } => {
            let buyer_fault = Arc::new(std::sync::Mutex::new(None));
            let body: Body = match (buffered, streamed) {
                (Some(bytes), _) => forward::full(bytes),
                (None, Some(body)) => {
                    BuyerBody::new(body, max_body, body_timeout, buyer_fault.clone()).boxed()
                }
                (None, None) => forward::full(Bytes::new()),
            };
            let host = match parts.headers.get(header::HOST) {
                Some(host) => host.clone(),
                None => HeaderValue::from_str(authority)
                    .map_err(|_| Rejection::BadRequest("Host is not text"))?,
            };
            let headers = std::mem::take(&mut parts.headers);
            let buyer = BuyerCall {
                method: &parts.method,
                path: &path,
                params: &params,
                query: parts.uri.query(),
                host,
            };
            let started = Instant::now();
            let result = upstream
                .forward(&api.backend, buyer, headers, body, request_id, conn)
                .await;
            trace.upstream = Some(started.elapsed());
            match result {
                Ok(response) => Ok(response),
                Err(error) => {
                    // The buyer's body broke the call (malformed, too large, silent): the
                    // buyer's fault, so it is neither charged nor the seller's error.
                    let fault = buyer_fault.lock().unwrap_or_else(|e| e.into_inner()).take();
                    if let Some(fault) = fault {
                        if let Some(purchase) = purchase {
                            purchase.cell.give_back();
                        }
                        return Err(fault);
                    }
                    // Never reached the backend: the call is given back.
                    if error.never_reached() {
                        if let Some(purchase) = purchase {
                            purchase.cell.give_back();
                        }
                    }
                    Err(match error {
                        ForwardError::Timeout => Rejection::BackendTimeout,
                        ForwardError::BadTarget => {
                            Rejection::Internal("backend target does not form a URI")
                        }
                        error @ (ForwardError::Connect(_)
                        | ForwardError::Handshake(_)
                        | ForwardError::Failed(_)) => Rejection::BackendUnavailable(error),
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::metrics::GatewayMetrics;
    use crate::gateway::quota::QuotaRegistry;
    use crate::snapshot::compile::compile;
    use crate::snapshot::wire::*;

    fn snapshot() -> Snapshot {
        Snapshot {
            version: 1,
            groups: vec![Group {
                id: "g1".into(),
                name: String::new(),
                sl_domain: "g1.sl.test".into(),
                url_domain: Some("market.test".into()),
                market_state: MarketState::OnSale,
                apis: vec![Api {
                    id: "api".into(),
                    name: String::new(),
                    api_type: 1,
                    req_protocol: "BOTH".into(),
                    req_method: "GET".into(),
                    req_uri: "/v1/{city}".into(),
                    match_mode: "NORMAL".into(),
                    auth_type: "APP".into(),
                    app_code_auth: false,
                    backend: Backend::Mock {
                        status: 200,
                        body: String::new(),
                    },
                }],
            }],
            apps: vec![App {
                id: "a1".into(),
                app_key: "key".into(),
                app_secret: "secret".into(),
                app_codes: vec![],
                creator: "MARKET".into(),
            }],
            purchases: vec![Purchase {
                id: "p1".into(),
                group_id: "g1".into(),
                app_id: "a1".into(),
                state: PurchaseState::Active,
                start_time: 0,
                expire_time: i64::MAX,
                quota_limit: Some(1),
                quota_used: 0,
            }],
            ..Snapshot::default()
        }
    }

    /// Ids cut from the shared buffer stay whole and distinct across buffer refills.
    #[test]
    fn request_ids_are_distinct_32_hex_digits_across_buffers() {
        let ids: Vec<HeaderValue> = (0..2 * REQUEST_IDS_PER_BUFFER + 1)
            .map(|_| new_request_id())
            .collect();
        let unique: std::collections::HashSet<&[u8]> = ids.iter().map(|v| v.as_bytes()).collect();
        assert_eq!(unique.len(), ids.len());
        assert!(ids
            .iter()
            .all(|v| v.len() == 32 && v.as_bytes().iter().all(u8::is_ascii_hexdigit)));
    }

    /// The decision path runs without I/O on a compiled snapshot and a request head.
    #[test]
    fn decide_admits_a_signed_head_and_refuses_a_tampered_one() {
        let dir = tempfile::tempdir().unwrap();
        let quota = QuotaRegistry::open(dir.path(), 8).unwrap();
        let compiled = compile(&snapshot(), &quota, &GatewayMetrics::new()).unwrap();
        let now = OffsetDateTime::now_utc();
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("market.test"));
        headers.insert(
            "x-sdk-date",
            HeaderValue::from_str(&signing::format_sdk_date(now)).unwrap(),
        );
        let parts = RequestParts {
            method: "GET",
            path: "/v1/paris",
            query: None,
            headers: &headers,
            authority: None,
            payload: Payload::Body(b""),
        };
        let auth = signing::sign("key", b"secret", &parts, &["host", "x-sdk-date"]).unwrap();
        headers.insert("authorization", HeaderValue::from_str(&auth).unwrap());
        let options = DecideOptions {
            appcode_over_http: false,
            max_clock_skew_secs: 900,
        };
        let mut head = RequestHead {
            method: &Method::GET,
            path: "/v1/paris",
            query: None,
            headers: &headers,
            authority: "market.test",
            sni: None,
            tls: false,
            peer: std::net::IpAddr::from([127, 0, 0, 1]),
        };
        let decision = decide(&compiled, &head, Payload::Body(b""), now, options).unwrap();
        assert_eq!((&*decision.api.id, decision.params), ("api", vec!["paris"]));
        assert_eq!(decision.purchase.map(|p| p.id()), Some("p1"));
        head.path = "/v1/rome";
        assert!(matches!(
            decide(&compiled, &head, Payload::Body(b""), now, options),
            Err(Rejection::Signature(_))
        ));
    }
}
