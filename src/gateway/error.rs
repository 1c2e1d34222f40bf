//! The one error type of a buyer's request and its mapping to status, APIG code and outcome.
//!
//! Every phase returns `Result<_, Rejection>`; only the outer handler turns a rejection into a
//! response (with [`Rejection::status`], [`Rejection::code`]), an access-log line and a
//! metric ([`Rejection::outcome`]). The mappings are single exhaustive matches pinned by the
//! table test below (CONTRACT §8). Messages never echo secrets.

use http::StatusCode;

use super::metrics::Outcome;
use crate::apig;
use crate::signing::SignatureError;

#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    #[error("no snapshot has been applied yet")]
    NotReady,
    #[error("no API group answers on this domain")]
    UnknownHost,
    #[error("no API matches this method and path")]
    NoRoute,
    #[error("the API group has been delisted from the market")]
    Delisted,
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    #[error("the Host header and the TLS server name disagree")]
    HostSniMismatch,
    #[error("request URI too long")]
    UriTooLong,
    #[error("request headers too large")]
    HeadersTooLarge,
    #[error("request body too large")]
    BodyTooLarge,
    /// Malformed chunked framing, a body that stopped (the buyer's connection) or sent
    /// nothing for `body_read_timeout_ms`: the buyer's fault, never charged.
    #[error("reading the request body failed: {0}")]
    BodyRead(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("Incorrect app authentication information: {0}")]
    AuthFailed(&'static str),
    #[error("Incorrect app authentication information: signature not accepted")]
    Signature(#[source] SignatureError),
    /// The peer made `gateway.auth_failure_limit` failed authentications in the current
    /// window (`crate::auth_guard`): refused before any credential is checked.
    #[error("{0}")]
    AuthLimited(#[source] crate::auth_guard::Penalised),
    #[error("the app is not authorized for this API group")]
    NotAuthorized,
    #[error("the purchase is frozen, unsubscribed, not started or expired")]
    PurchaseInactive,
    /// Over a request throttling policy's limit (429 with `Retry-After`).
    #[error("{0}")]
    Throttled(super::throttle::Refusal),
    #[error("the calls bought are used up")]
    QuotaExhausted,
    /// This proxy's lease of the purchase ran dry while no control plane answers (or, in
    /// `serve`, the store does not): calls may be left, but none can be leased now.
    #[error(
        "no calls leased to this proxy are left and none can be leased now: the control \
         plane or its store is unavailable; retry later"
    )]
    LeaseUnavailable,
    /// This proxy's lease of the purchase ran dry and no refill came within the wait, while
    /// the purchase still has calls left, leased to other proxies (being asked back): not
    /// "used up", which would tell the buyer their calls are gone.
    #[error(
        "no calls leased to this proxy are left; the purchase's calls left are leased to \
         other proxies and being moved here: retry shortly"
    )]
    CallsLeasedElsewhere,
    /// The quota journal cannot be written (a full disk, above all): a call that cannot be
    /// recorded is not served. Retryable, as the store's failure is.
    #[error("the quota journal cannot be written (its store is unavailable): retry later")]
    Quota(#[source] super::quota::QuotaError),
    #[error("backend unavailable")]
    BackendUnavailable(#[source] super::forward::ForwardError),
    #[error("backend timed out")]
    BackendTimeout,
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl Rejection {
    /// Which authentication rule refused the caller (`unknown app key`, `the signature does
    /// not match`, …), for the access log's `auth_rule`; `None` for any other rejection.
    pub fn auth_rule(&self) -> Option<&dyn std::fmt::Display> {
        match self {
            Rejection::AuthFailed(rule) => Some(rule),
            Rejection::Signature(cause) => Some(cause),
            _ => None,
        }
    }
}

impl Rejection {
    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::NotReady
            | Rejection::LeaseUnavailable
            | Rejection::CallsLeasedElsewhere
            | Rejection::Quota(_) => StatusCode::SERVICE_UNAVAILABLE,
            Rejection::UnknownHost | Rejection::NoRoute => StatusCode::NOT_FOUND,
            Rejection::Delisted | Rejection::NotAuthorized => StatusCode::FORBIDDEN,
            Rejection::BadRequest(_) | Rejection::HostSniMismatch | Rejection::BodyRead(_) => {
                StatusCode::BAD_REQUEST
            }
            Rejection::UriTooLong => StatusCode::URI_TOO_LONG,
            Rejection::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Rejection::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Rejection::AuthFailed(_) | Rejection::Signature(_) => StatusCode::UNAUTHORIZED,
            Rejection::AuthLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Rejection::PurchaseInactive | Rejection::QuotaExhausted => {
                StatusCode::METHOD_NOT_ALLOWED
            }
            Rejection::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
            Rejection::BackendUnavailable(_) => StatusCode::BAD_GATEWAY,
            Rejection::BackendTimeout => StatusCode::GATEWAY_TIMEOUT,
            Rejection::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Rejection::NotReady
            | Rejection::LeaseUnavailable
            | Rejection::CallsLeasedElsewhere
            | Rejection::Quota(_) => apig::NOT_READY,
            Rejection::UnknownHost | Rejection::NoRoute => apig::NO_ROUTE,
            Rejection::Delisted => apig::GROUP_DELISTED,
            Rejection::BadRequest(_)
            | Rejection::HostSniMismatch
            | Rejection::BodyRead(_)
            | Rejection::UriTooLong
            | Rejection::HeadersTooLarge
            | Rejection::BodyTooLarge
            | Rejection::BackendUnavailable(_)
            | Rejection::BackendTimeout => apig::BAD_REQUEST,
            Rejection::AuthFailed(_) | Rejection::Signature(_) => apig::APP_AUTH_FAILED,
            Rejection::AuthLimited(_) => apig::THROTTLED,
            Rejection::NotAuthorized => apig::APP_NOT_AUTHORIZED,
            Rejection::PurchaseInactive => apig::PURCHASE_INACTIVE,
            Rejection::Throttled(_) => apig::THROTTLED,
            Rejection::QuotaExhausted => apig::QUOTA_EXHAUSTED,
            Rejection::Internal(_) => apig::INTERNAL,
        }
    }

    pub fn outcome(&self) -> Outcome {
        match self {
            Rejection::NotReady
            | Rejection::LeaseUnavailable
            | Rejection::CallsLeasedElsewhere
            | Rejection::Quota(_) => Outcome::NotReady,
            Rejection::UnknownHost | Rejection::NoRoute => Outcome::NoRoute,
            Rejection::Delisted => Outcome::Delisted,
            Rejection::BadRequest(_)
            | Rejection::HostSniMismatch
            | Rejection::BodyRead(_)
            | Rejection::UriTooLong
            | Rejection::HeadersTooLarge
            | Rejection::BodyTooLarge => Outcome::BadRequest,
            Rejection::AuthFailed(_) | Rejection::Signature(_) | Rejection::AuthLimited(_) => {
                Outcome::AuthFailed
            }
            Rejection::NotAuthorized => Outcome::NotAuthorized,
            Rejection::PurchaseInactive => Outcome::Frozen,
            Rejection::Throttled(_) => Outcome::Throttled,
            Rejection::QuotaExhausted => Outcome::QuotaExhausted,
            Rejection::BackendUnavailable(_) => Outcome::BackendError,
            Rejection::BackendTimeout => Outcome::BackendTimeout,
            Rejection::Internal(_) => Outcome::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CONTRACT §8, row by row.
    #[test]
    fn every_row_of_the_contract_table() {
        let table: Vec<(Rejection, u16, &str)> = vec![
            (Rejection::UnknownHost, 404, "APIG.0101"),
            (Rejection::NoRoute, 404, "APIG.0101"),
            (Rejection::BadRequest("x"), 400, "APIG.0201"),
            (Rejection::HostSniMismatch, 400, "APIG.0201"),
            (Rejection::UriTooLong, 414, "APIG.0201"),
            (Rejection::HeadersTooLarge, 431, "APIG.0201"),
            (Rejection::BodyTooLarge, 413, "APIG.0201"),
            (Rejection::AuthFailed("x"), 401, "APIG.0303"),
            (
                Rejection::Signature(SignatureError::Mismatch),
                401,
                "APIG.0303",
            ),
            (
                Rejection::AuthLimited(crate::auth_guard::Penalised {
                    retry_after: std::time::Duration::from_secs(3),
                }),
                429,
                "APIG.0308",
            ),
            (Rejection::NotAuthorized, 403, "APIG.0304"),
            (Rejection::Delisted, 403, "APIG.0306"),
            (
                Rejection::Throttled(crate::gateway::throttle::Refusal {
                    dimension: crate::gateway::throttle::Dimension::App,
                    limit: 10,
                    interval: 1,
                    unit: crate::snapshot::TimeUnit::Minute,
                    retry_after: 1,
                    short: Vec::new(),
                    settle_ms: 0,
                }),
                429,
                "APIG.0308",
            ),
            (Rejection::QuotaExhausted, 405, "APIG.0501"),
            (Rejection::PurchaseInactive, 405, "APIG.0502"),
            (Rejection::BackendTimeout, 504, "APIG.0201"),
            (Rejection::NotReady, 503, "APIG.0606"),
            (Rejection::LeaseUnavailable, 503, "APIG.0606"),
            (Rejection::CallsLeasedElsewhere, 503, "APIG.0606"),
            (
                Rejection::Quota(crate::gateway::quota::QuotaError::JournalFailed),
                503,
                "APIG.0606",
            ),
            (Rejection::Internal("x"), 500, "APIG.0601"),
        ];
        for (rejection, status, code) in table {
            assert_eq!(rejection.status().as_u16(), status, "{rejection:?}");
            assert_eq!(rejection.code(), code, "{rejection:?}");
        }
    }
}
