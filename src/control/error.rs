//! Every way a control-plane request can fail, and the one place that turns a failure into an
//! HTTP status and an APIG error code (CONTRACT §8, spec §0.3).
//!
//! Handlers return [`ControlError`]; they never write error responses themselves. The mapping
//! in [`ControlError::status_and_code`] is exhaustive (no catch-all) and pinned by a table test.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::apig;

use super::store::{Conflict, StoreError};

/// Seconds a client is told to wait (`Retry-After`) when the store is unavailable.
pub const STORE_RETRY_AFTER_SECS: u64 = 1;

impl From<StoreError> for ControlError {
    fn from(e: StoreError) -> ControlError {
        match e {
            StoreError::Unavailable(_) => ControlError::StoreUnavailable(e),
            StoreError::Conflict(conflict) => ControlError::Contended(conflict),
            other => ControlError::Store(other),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No credentials, unknown key or token, bad signature.
    #[error("authentication failed: {0}")]
    Unauthenticated(String),
    /// Authenticated, but the principal may not act here (other domain/project).
    #[error("no permission: {0}")]
    Forbidden(String),
    /// The body is not JSON, or a field has the wrong type.
    #[error("parameter error: {0}")]
    BadJson(String),
    /// A field's value breaks its rule; the message names the field and states the rule
    /// (Huawei's wording around it). Built by `control::rule`, never by hand.
    #[error(
        "Invalid parameter value,parameterName:{field}. {field} {rule}. Please refer to the \
         support documentation"
    )]
    InvalidParameter { field: String, rule: String },
    /// A required header is missing (`X-Domain-Id`).
    #[error("missing header: {0}")]
    MissingHeader(&'static str),
    #[error("the instance {0} does not exist")]
    InstanceNotFound(String),
    /// Unknown instance on a market route whose seed lists no 404.
    #[error("the instance {0} does not exist")]
    InstanceNotFoundBadRequest(String),
    #[error("the API group {0} does not exist")]
    GroupNotFound(String),
    /// A market route whose seed lists no 404 (delist, reserve).
    #[error("the API group {0} does not exist")]
    GroupNotFoundBadRequest(String),
    #[error("the API {0} does not exist")]
    ApiNotFound(String),
    #[error("the app {0} does not exist")]
    AppNotFound(String),
    #[error("the app code {0} does not exist")]
    AppCodeNotFound(String),
    #[error("the authorization record {0} does not exist")]
    AuthNotFound(String),
    #[error("the environment {0} does not exist")]
    EnvNotFound(String),
    #[error("the URL domain {0} does not exist")]
    DomainNotFound(String),
    #[error("the SSL certificate {0} does not exist")]
    CertificateNotFound(String),
    #[error("the API group {0} already has the maximum number of independent domains (5)")]
    TooManyDomains(String),
    #[error("the certificate name {0} already exists")]
    CertificateNameExists(String),
    #[error("the purchase {0} does not exist")]
    PurchaseNotFound(String),
    #[error("Request throttling policy {0} does not exist")]
    ThrottleNotFound(String),
    #[error("the request throttling policy binding record {0} does not exist")]
    ThrottleBindingNotFound(String),
    #[error("the excluded request throttling configuration {0} does not exist")]
    ThrottleSpecialNotFound(String),
    #[error("no API published in RELEASE has the publish_id {0}")]
    PublicationNotFound(String),
    #[error("the request throttling policy name {0} already exists")]
    ThrottleNameExists(String),
    #[error("the API {0} is already bound to a request throttling policy in this environment")]
    ThrottleAlreadyBound(String),
    #[error("the request throttling policy already has an exception for {0}")]
    ThrottleSpecialExists(String),
    #[error("the API group {0} is not on sale")]
    NotOnSale(String),
    /// Off-sell of a group that is not on sale (CONTRACT §3.2: 404).
    #[error("the API group {0} is not listed on the market")]
    ListingNotFound(String),
    #[error("the API group {0} was never listed on the market")]
    NeverListed(String),
    #[error("the API group name {0} already exists")]
    GroupNameExists(String),
    #[error("the API name {0} already exists in the group")]
    ApiNameExists(String),
    #[error("an API with method and URI {0} already exists in the group")]
    ApiExists(String),
    #[error("the app name {0} already exists")]
    AppNameExists(String),
    #[error("the AppKey {0} already exists")]
    AppKeyExists(String),
    #[error("the app {0} already has the maximum number of app codes")]
    TooManyAppCodes(String),
    #[error("the app code already exists")]
    AppCodeExists,
    #[error("the app {app} is already authorized for the API {api}")]
    AuthExists { app: String, api: String },
    #[error("url_domain {0} is already used by another API group")]
    UrlDomainTaken(String),
    #[error("the API group {0} has no sellable API (public, APP auth, published to RELEASE)")]
    NoSellableApi(String),
    #[error("a buyer cannot buy its own API group {0}")]
    CannotBuyOwnGroup(String),
    #[error("the API group {0} is delisted from the market")]
    Delisted(String),
    #[error("the API group {0} still contains APIs")]
    GroupHasApis(String),
    #[error("the API {0} is published; take it offline first")]
    ApiPublished(String),
    /// A market transition the state machine does not allow (e.g. lock while on sale).
    #[error("conflict: {0}")]
    Conflict(String),
    /// A proxy claims a node id that another live incarnation holds (CONTRACT §5: two live
    /// proxies never share one node id). Its polls and lease exchanges are refused.
    #[error(
        "node_id '{node_id}' is held by the live proxy of incarnation {held_by}; this proxy \
         (incarnation {claimed_by}) is refused until that one is silent for \
         control.proxy_expiry_secs: give each proxy its own [proxy] node_id"
    )]
    NodeIdInUse {
        node_id: String,
        held_by: String,
        claimed_by: String,
    },
    /// The write would publish a record the proxies' snapshot validator refuses
    /// (`publish::neighbourhood`): nothing was stored.
    #[error("the proxies would refuse what this write publishes: {0}")]
    Unpublishable(#[source] crate::snapshot::validate::ValidationError),
    #[error("no such route")]
    RouteNotFound,
    /// The store refused the commit for a conflict that a run on the caught-up state may
    /// resolve (`ControlPlane::commit_with`); answered only once the attempts are spent.
    #[error("the write conflicted with a concurrent one: {0}")]
    Contended(#[source] Conflict),
    /// The store is down, stalled or timed out: retryable, nothing was half-written.
    #[error("the store is unavailable; retry later: {0}")]
    StoreUnavailable(#[source] StoreError),
    #[error("store: {0}")]
    Store(#[source] StoreError),
    #[error("a stored record is unreadable: {0}")]
    Corrupt(#[source] serde_json::Error),
}

impl ControlError {
    /// The one mapping from error to (HTTP status, APIG code).
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        use ControlError::*;
        match self {
            Unauthenticated(_) => (StatusCode::UNAUTHORIZED, apig::AUTH_FAILED),
            Forbidden(_) => (StatusCode::FORBIDDEN, apig::NO_PERMISSION),
            BadJson(_) => (StatusCode::BAD_REQUEST, apig::PARAMETER_ERROR),
            InvalidParameter { .. } => (StatusCode::BAD_REQUEST, apig::INVALID_PARAMETER),
            MissingHeader(_) => (StatusCode::BAD_REQUEST, apig::PARAMETER_ERROR),
            InstanceNotFound(_) => (StatusCode::NOT_FOUND, apig::INSTANCE_NOT_FOUND),
            InstanceNotFoundBadRequest(_) => (StatusCode::BAD_REQUEST, apig::INSTANCE_NOT_FOUND),
            GroupNotFound(_) => (StatusCode::NOT_FOUND, apig::GROUP_NOT_FOUND),
            GroupNotFoundBadRequest(_) => (StatusCode::BAD_REQUEST, apig::GROUP_NOT_FOUND),
            ApiNotFound(_) => (StatusCode::NOT_FOUND, apig::API_NOT_FOUND),
            AppNotFound(_) => (StatusCode::NOT_FOUND, apig::APP_NOT_FOUND),
            AppCodeNotFound(_) => (StatusCode::NOT_FOUND, apig::APP_NOT_FOUND),
            AuthNotFound(_) => (StatusCode::NOT_FOUND, apig::AUTH_RECORD_NOT_FOUND),
            EnvNotFound(_) => (StatusCode::NOT_FOUND, apig::INVALID_PARAMETER),
            DomainNotFound(_) => (StatusCode::NOT_FOUND, apig::URL_DOMAIN_NOT_FOUND),
            CertificateNotFound(_) => (StatusCode::NOT_FOUND, apig::CERTIFICATE_NOT_FOUND),
            TooManyDomains(_) => (StatusCode::BAD_REQUEST, apig::INVALID_PARAMETER),
            CertificateNameExists(_) => (StatusCode::BAD_REQUEST, apig::INVALID_PARAMETER),
            PurchaseNotFound(_) => (StatusCode::NOT_FOUND, apig::LISTING_NOT_FOUND),
            ThrottleNotFound(_) => (StatusCode::NOT_FOUND, apig::THROTTLE_NOT_FOUND),
            ThrottleBindingNotFound(_) => (StatusCode::NOT_FOUND, apig::THROTTLE_BINDING_NOT_FOUND),
            ThrottleSpecialNotFound(_) => (StatusCode::NOT_FOUND, apig::THROTTLE_SPECIAL_NOT_FOUND),
            PublicationNotFound(_) => (StatusCode::NOT_FOUND, apig::API_NOT_FOUND),
            ThrottleNameExists(_) => (StatusCode::BAD_REQUEST, apig::THROTTLE_NAME_EXISTS),
            ThrottleAlreadyBound(_) => (StatusCode::BAD_REQUEST, apig::THROTTLE_ALREADY_BOUND),
            ThrottleSpecialExists(_) => (StatusCode::BAD_REQUEST, apig::THROTTLE_SPECIAL_EXISTS),
            NotOnSale(_) => (StatusCode::CONFLICT, apig::LISTING_NOT_FOUND),
            ListingNotFound(_) => (StatusCode::NOT_FOUND, apig::LISTING_NOT_FOUND),
            NeverListed(_) => (StatusCode::BAD_REQUEST, apig::LISTING_NOT_FOUND),
            GroupNameExists(_) => (StatusCode::BAD_REQUEST, apig::GROUP_NAME_EXISTS),
            ApiNameExists(_) => (StatusCode::BAD_REQUEST, apig::API_NAME_EXISTS),
            ApiExists(_) => (StatusCode::BAD_REQUEST, apig::API_EXISTS),
            AppNameExists(_) => (StatusCode::BAD_REQUEST, apig::APP_NAME_EXISTS),
            AppKeyExists(_) => (StatusCode::BAD_REQUEST, apig::APP_KEY_EXISTS),
            TooManyAppCodes(_) => (StatusCode::BAD_REQUEST, apig::INVALID_PARAMETER),
            AppCodeExists => (StatusCode::BAD_REQUEST, apig::INVALID_PARAMETER),
            AuthExists { .. } => (StatusCode::BAD_REQUEST, apig::APP_AUTH_EXISTS),
            UrlDomainTaken(_) => (StatusCode::BAD_REQUEST, apig::URL_DOMAIN_TAKEN),
            NoSellableApi(_) => (StatusCode::BAD_REQUEST, apig::NO_SELLABLE_API),
            CannotBuyOwnGroup(_) => (StatusCode::FORBIDDEN, apig::CANNOT_BUY_OWN_GROUP),
            Delisted(_) => (StatusCode::BAD_REQUEST, apig::GROUP_DELISTED_ON_MARKET),
            GroupHasApis(_) => (StatusCode::FORBIDDEN, apig::GROUP_HAS_APIS),
            ApiPublished(_) => (StatusCode::FORBIDDEN, apig::API_PUBLISHED),
            Conflict(_) => (StatusCode::CONFLICT, apig::PARAMETER_ERROR),
            NodeIdInUse { .. } => (StatusCode::CONFLICT, apig::PARAMETER_ERROR),
            Unpublishable(_) => (StatusCode::BAD_REQUEST, apig::INVALID_PARAMETER),
            RouteNotFound => (StatusCode::NOT_FOUND, apig::NO_ROUTE),
            // A claim still held after every attempt: someone else holds the key.
            Contended(super::store::Conflict::Claimed { .. }) => {
                (StatusCode::CONFLICT, apig::PARAMETER_ERROR)
            }
            Contended(super::store::Conflict::Stale { .. } | super::store::Conflict::Aborted) => {
                (StatusCode::SERVICE_UNAVAILABLE, apig::SYSTEM_ERROR)
            }
            StoreUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, apig::SYSTEM_ERROR),
            Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, apig::SYSTEM_ERROR),
            Corrupt(_) => (StatusCode::INTERNAL_SERVER_ERROR, apig::SYSTEM_ERROR),
        }
    }
}

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::error!(error = %self, "control request failed");
        }
        let request_id = uuid::Uuid::new_v4().simple().to_string();
        let retryable = status == StatusCode::SERVICE_UNAVAILABLE;
        let msg = match (status.is_server_error(), retryable) {
            // Retryable: say so (the cause stays in the log).
            (_, true) => format!(
                "the service is temporarily unavailable (store); retry after {STORE_RETRY_AFTER_SECS} s"
            ),
            // Internal details stay in the log.
            (true, false) => "internal error".to_owned(),
            (false, _) => self.to_string(),
        };
        let body = apig::ErrorBody {
            error_code: code,
            error_msg: &msg,
            request_id: &request_id,
        }
        .to_json();
        let mut response = (
            status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
        if let Ok(value) = HeaderValue::from_str(&request_id) {
            response.headers_mut().insert("x-request-id", value);
        }
        if retryable {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                HeaderValue::from(STORE_RETRY_AFTER_SECS),
            );
        }
        response
            .extensions_mut()
            .insert(super::metrics::AnsweredError { code, message: msg });
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_its_status_and_code() {
        let s = String::new;
        let table: Vec<(ControlError, u16, &str)> = vec![
            (ControlError::Unauthenticated(s()), 401, "APIG.1002"),
            (ControlError::Forbidden(s()), 403, "APIG.1005"),
            (ControlError::BadJson(s()), 400, "APIG.2000"),
            (
                ControlError::InvalidParameter {
                    field: s(),
                    rule: s(),
                },
                400,
                "APIG.2012",
            ),
            (ControlError::MissingHeader("X-Domain-Id"), 400, "APIG.2000"),
            (ControlError::InstanceNotFound(s()), 404, "APIG.3030"),
            (
                ControlError::InstanceNotFoundBadRequest(s()),
                400,
                "APIG.3030",
            ),
            (ControlError::GroupNotFound(s()), 404, "APIG.3001"),
            (ControlError::GroupNotFoundBadRequest(s()), 400, "APIG.3001"),
            (ControlError::ApiNotFound(s()), 404, "APIG.3002"),
            (ControlError::AppNotFound(s()), 404, "APIG.3004"),
            (ControlError::AppCodeNotFound(s()), 404, "APIG.3004"),
            (ControlError::AuthNotFound(s()), 404, "APIG.3009"),
            (ControlError::EnvNotFound(s()), 404, "APIG.2012"),
            (ControlError::DomainNotFound(s()), 404, "APIG.3020"),
            (ControlError::CertificateNotFound(s()), 404, "APIG.3021"),
            (ControlError::TooManyDomains(s()), 400, "APIG.2012"),
            (ControlError::CertificateNameExists(s()), 400, "APIG.2012"),
            (ControlError::PurchaseNotFound(s()), 404, "APIG.3016"),
            (ControlError::ThrottleNotFound(s()), 404, "APIG.3005"),
            (ControlError::ThrottleBindingNotFound(s()), 404, "APIG.3010"),
            (ControlError::ThrottleSpecialNotFound(s()), 404, "APIG.3018"),
            (ControlError::PublicationNotFound(s()), 404, "APIG.3002"),
            (ControlError::ThrottleNameExists(s()), 400, "APIG.3204"),
            (ControlError::ThrottleAlreadyBound(s()), 400, "APIG.3312"),
            (ControlError::ThrottleSpecialExists(s()), 400, "APIG.3318"),
            (ControlError::NotOnSale(s()), 409, "APIG.3016"),
            (ControlError::ListingNotFound(s()), 404, "APIG.3016"),
            (ControlError::NeverListed(s()), 400, "APIG.3016"),
            (ControlError::GroupNameExists(s()), 400, "APIG.3201"),
            (ControlError::ApiNameExists(s()), 400, "APIG.3202"),
            (ControlError::ApiExists(s()), 400, "APIG.3301"),
            (ControlError::AppNameExists(s()), 400, "APIG.3203"),
            (ControlError::AppKeyExists(s()), 400, "APIG.3310"),
            (ControlError::TooManyAppCodes(s()), 400, "APIG.2012"),
            (ControlError::AppCodeExists, 400, "APIG.2012"),
            (
                ControlError::AuthExists { app: s(), api: s() },
                400,
                "APIG.3316",
            ),
            (ControlError::UrlDomainTaken(s()), 400, "APIG.3305"),
            (ControlError::NoSellableApi(s()), 400, "APIG.3403"),
            (ControlError::CannotBuyOwnGroup(s()), 403, "APIG.3406"),
            (ControlError::Delisted(s()), 400, "APIG.3420"),
            (ControlError::GroupHasApis(s()), 403, "APIG.3415"),
            (ControlError::ApiPublished(s()), 403, "APIG.3416"),
            (ControlError::Conflict(s()), 409, "APIG.2000"),
            (
                ControlError::NodeIdInUse {
                    node_id: s(),
                    held_by: s(),
                    claimed_by: s(),
                },
                409,
                "APIG.2000",
            ),
            (
                ControlError::Unpublishable(crate::snapshot::validate::ValidationError {
                    path: s(),
                    reason: s(),
                }),
                400,
                "APIG.2012",
            ),
            (ControlError::RouteNotFound, 404, "APIG.0101"),
            (
                ControlError::Store(StoreError::UnknownScheme(s())),
                500,
                "APIG.9999",
            ),
            (
                ControlError::StoreUnavailable(StoreError::Unavailable(s())),
                503,
                "APIG.9999",
            ),
            (
                ControlError::Contended(Conflict::Claimed {
                    scope: "domain",
                    key: s(),
                    owner: s(),
                }),
                409,
                "APIG.2000",
            ),
            (ControlError::Contended(Conflict::Aborted), 503, "APIG.9999"),
            (
                ControlError::Corrupt(serde_json::from_str::<u8>("x").unwrap_err()),
                500,
                "APIG.9999",
            ),
        ];
        for (error, status, code) in table {
            let (got_status, got_code) = error.status_and_code();
            assert_eq!((got_status.as_u16(), got_code), (status, code), "{error:?}");
        }
    }
}
