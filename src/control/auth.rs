//! Who is calling the control API (CONTRACT §4.1): SDK-HMAC-SHA256 AK/SK signatures verified
//! with the shared `crate::signing`, or tokens (`X-Auth-Token` / `Authorization: Bearer`),
//! both from config. Yields a [`Principal`]; the ownership rules that use it (X-Domain-Id,
//! project scoping) live in [`Call`], the extractor every handler takes.
//!
//! Must not look at the market state: it only answers "who is this", never "may they".

use std::collections::HashMap;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::config::Role;
use crate::signing;

use super::error::ControlError;
use super::ControlPlane;

/// The largest control-API body, in bytes (Huawei's signed-body limit).
pub const MAX_CONTROL_BODY_BYTES: usize = signing::MAX_SIGNED_BODY_BYTES;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub domain_id: String,
    pub project_id: String,
    pub role: Role,
}

/// Middleware: authenticates, then hands the request on with its [`Principal`] and the body
/// already buffered (the signature covers it). Nothing unauthenticated costs memory: a token
/// is checked, and a signature's key, date and signed headers, before the body is read.
pub async fn authenticate(
    axum::extract::State(cp): axum::extract::State<ControlPlane>,
    request: Request,
    next: Next,
) -> Response {
    let (mut parts, body) = request.into_parts();
    if let Err(e) = screen(&cp, &parts) {
        return e.into_response();
    }
    let body = match axum::body::to_bytes(body, MAX_CONTROL_BODY_BYTES).await {
        Ok(body) => body,
        Err(e) => {
            return ControlError::BadJson(format!("cannot read the body: {e}")).into_response()
        }
    };
    match principal_of(&cp, &parts, &body) {
        Ok(principal) => {
            parts.extensions.insert(principal);
            let mut response = next.run(Request::from_parts(parts, Body::from(body))).await;
            if !response.headers().contains_key("x-request-id") {
                if let Ok(v) = uuid::Uuid::new_v4().simple().to_string().parse() {
                    response.headers_mut().insert("x-request-id", v);
                }
            }
            response
        }
        Err(e) => e.into_response(),
    }
}

/// What [`principal_of`] can refuse without the body: an unknown token, a missing or
/// malformed `Authorization`, an unknown access key, a skewed date or a signed header absent
/// or repeated. Answers as `principal_of` would.
fn screen(cp: &ControlPlane, parts: &axum::http::request::Parts) -> Result<(), ControlError> {
    let headers = &parts.headers;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let token = header("x-auth-token")
        .or_else(|| header("authorization").and_then(|v| v.strip_prefix("Bearer ").map(str::trim)));
    if token.is_some() {
        return principal_of(cp, parts, &Bytes::new()).map(|_| ());
    }
    let value = header("authorization")
        .ok_or_else(|| ControlError::Unauthenticated("no Authorization or X-Auth-Token".into()))?;
    let auth = signing::Authorization::parse(value)
        .map_err(|e| ControlError::Unauthenticated(e.to_string()))?;
    if !cp
        .inner
        .config
        .control
        .credentials
        .iter()
        .any(|c| c.access_key == auth.access)
    {
        return Err(ControlError::Unauthenticated(
            "signature does not match".into(),
        ));
    }
    let request = signing::RequestParts {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query(),
        headers,
        authority: parts.uri.authority().map(|a| a.as_str()),
        payload: signing::Payload::Unsigned,
    };
    signing::check_head(
        &auth,
        &request,
        time::OffsetDateTime::now_utc(),
        i64::try_from(cp.inner.config.gateway.max_clock_skew.as_secs())
            .unwrap_or(signing::DEFAULT_MAX_CLOCK_SKEW_SECS),
    )
    .map_err(|e| ControlError::Unauthenticated(e.to_string()))
}

fn principal_of(
    cp: &ControlPlane,
    parts: &axum::http::request::Parts,
    body: &Bytes,
) -> Result<Principal, ControlError> {
    let headers = &parts.headers;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let token = header("x-auth-token")
        .or_else(|| header("authorization").and_then(|v| v.strip_prefix("Bearer ").map(str::trim)));
    if let Some(token) = token {
        return cp
            .inner
            .config
            .control
            .tokens
            .iter()
            .find(|t| {
                bool::from(subtle::ConstantTimeEq::ct_eq(
                    t.token.as_bytes(),
                    token.as_bytes(),
                ))
            })
            .map(|t| Principal {
                domain_id: t.domain_id.clone(),
                project_id: t.project_id.clone(),
                role: t.role,
            })
            .ok_or_else(|| ControlError::Unauthenticated("unknown token".into()));
    }
    let value = header("authorization")
        .ok_or_else(|| ControlError::Unauthenticated("no Authorization or X-Auth-Token".into()))?;
    let auth = signing::Authorization::parse(value)
        .map_err(|e| ControlError::Unauthenticated(e.to_string()))?;
    // Unknown key and bad signature read alike to the caller.
    let credential = cp
        .inner
        .config
        .control
        .credentials
        .iter()
        .find(|c| c.access_key == auth.access)
        .ok_or_else(|| ControlError::Unauthenticated("signature does not match".into()))?;
    let request = signing::RequestParts {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query(),
        headers,
        authority: parts.uri.authority().map(|a| a.as_str()),
        payload: signing::Payload::Body(body),
    };
    signing::verify(
        &auth,
        &request,
        credential.secret_key.as_bytes(),
        time::OffsetDateTime::now_utc(),
        i64::try_from(cp.inner.config.gateway.max_clock_skew.as_secs())
            .unwrap_or(signing::DEFAULT_MAX_CLOCK_SKEW_SECS),
    )
    .map_err(|e| match e {
        signing::SignatureError::Mismatch => {
            ControlError::Unauthenticated("signature does not match".into())
        }
        other => ControlError::Unauthenticated(other.to_string()),
    })?;
    Ok(Principal {
        domain_id: credential.domain_id.clone(),
        project_id: credential.project_id.clone(),
        role: credential.role,
    })
}

/// One control-API call as a handler sees it: principal, path parameters, query, headers and
/// the buffered body.
#[derive(Debug, Clone)]
pub struct Call {
    pub principal: Principal,
    pub params: HashMap<String, String>,
    pub query: HashMap<String, String>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl FromRequest<ControlPlane> for Call {
    type Rejection = ControlError;

    async fn from_request(request: Request, state: &ControlPlane) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = request.into_parts();
        let principal = parts
            .extensions
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| ControlError::Unauthenticated("not authenticated".into()))?;
        let Path(params) = Path::<HashMap<String, String>>::from_request_parts(&mut parts, state)
            .await
            .map_err(|e| ControlError::BadJson(e.body_text()))?;
        let query = match Query::<HashMap<String, String>>::try_from_uri(&parts.uri) {
            Ok(Query(q)) => q,
            Err(e) => return Err(ControlError::BadJson(e.body_text())),
        };
        let body = axum::body::to_bytes(body, MAX_CONTROL_BODY_BYTES)
            .await
            .map_err(|e| ControlError::BadJson(e.to_string()))?;
        Ok(Call {
            principal,
            params,
            query,
            headers: parts.headers,
            body,
        })
    }
}

impl Call {
    /// A path parameter the route declares.
    pub fn param(&self, name: &str) -> &str {
        self.params
            .get(name)
            .map(String::as_str)
            .unwrap_or_default()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as a JSON object (an empty body reads as `{}`).
    pub fn json(&self) -> Result<serde_json::Map<String, serde_json::Value>, ControlError> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(serde_json::Map::new());
        }
        match serde_json::from_slice::<serde_json::Value>(&self.body) {
            Ok(serde_json::Value::Object(map)) => Ok(map),
            Ok(_) => Err(ControlError::BadJson(
                "the body must be a JSON object".into(),
            )),
            Err(e) => Err(ControlError::BadJson(format!("the body is not JSON: {e}"))),
        }
    }

    /// Checks the path's instance and (when sent) `X-Project-Id`.
    pub fn check_instance(
        &self,
        cp: &ControlPlane,
        not_found_is_400: bool,
    ) -> Result<(), ControlError> {
        let instance = self.param("instance_id");
        if instance != cp.inner.config.instance_id {
            return Err(match not_found_is_400 {
                true => ControlError::InstanceNotFoundBadRequest(instance.to_owned()),
                false => ControlError::InstanceNotFound(instance.to_owned()),
            });
        }
        if let Some(project) = self.header("x-project-id") {
            if project != self.param("project_id") {
                return Err(ControlError::Forbidden(format!(
                    "X-Project-Id {project} differs from the path's project_id"
                )));
            }
        }
        Ok(())
    }

    /// The body as a typed request (`T`, one struct per resource): absent fields take their
    /// serde defaults, an empty body reads as `{}`, and a wrong type or a missing required
    /// field is [`ControlError::BadJson`] naming the field's path
    /// (`api_call_limits: invalid type: string "x", expected i64`).
    pub fn body<T: serde::de::DeserializeOwned>(&self) -> Result<T, ControlError> {
        let bytes: &[u8] = if self.body.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &self.body
        };
        let mut json = serde_json::Deserializer::from_slice(bytes);
        serde_path_to_error::deserialize(&mut json).map_err(|e| {
            let path = e.path().to_string();
            ControlError::BadJson(format!("{path}: {}", e.inner()))
        })
    }

    /// Scope of the project-level resources that have no instance in their path
    /// (`/v2/{project_id}/apigw/certificates`): the caller acts in its own project only.
    /// Returns `(domain_id, project_id)`.
    pub fn project_scope(&self) -> Result<(String, String), ControlError> {
        let project = self.param("project_id");
        let header = self.header("x-project-id");
        if project != self.principal.project_id || header.is_some_and(|h| h != project) {
            return Err(ControlError::Forbidden(format!(
                "the caller may not act in project {project}"
            )));
        }
        Ok((
            self.principal.domain_id.clone(),
            self.principal.project_id.clone(),
        ))
    }

    /// Management API scope: the caller acts in its own project only. Returns
    /// `(domain_id, project_id)` owning what it creates.
    pub fn tenant_scope(&self, cp: &ControlPlane) -> Result<(String, String), ControlError> {
        self.check_instance(cp, false)?;
        let project = self.param("project_id");
        if project != self.principal.project_id {
            return Err(ControlError::Forbidden(format!(
                "the caller may not act in project {project}"
            )));
        }
        Ok((
            self.principal.domain_id.clone(),
            self.principal.project_id.clone(),
        ))
    }

    /// Market API: the tenant domain the call acts for (`X-Domain-Id`). Missing and
    /// `required`: 400. A tenant principal may only name its own domain (403); without the
    /// header a tenant acts for itself and a market principal for nobody in particular.
    pub fn acting_domain(&self, required: bool) -> Result<Option<String>, ControlError> {
        let given = self.header("x-domain-id").filter(|d| !d.is_empty());
        match (given, self.principal.role) {
            (Some(domain), Role::Tenant) if domain != self.principal.domain_id => Err(
                ControlError::Forbidden(format!("X-Domain-Id {domain} is not the caller's domain")),
            ),
            (Some(domain), _) => Ok(Some(domain.to_owned())),
            (None, _) if required => Err(ControlError::MissingHeader("X-Domain-Id")),
            (None, Role::Tenant) => Ok(Some(self.principal.domain_id.clone())),
            (None, Role::Market) => Ok(None),
        }
    }

    /// Market API: a tenant principal must use its own project in the path.
    pub fn market_project(&self) -> Result<String, ControlError> {
        let project = self.param("project_id");
        if self.principal.role == Role::Tenant && project != self.principal.project_id {
            return Err(ControlError::Forbidden(format!(
                "the caller may not act in project {project}"
            )));
        }
        Ok(project.to_owned())
    }
}
