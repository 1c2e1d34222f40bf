//! Independent domains of an API group, as Huawei's v2 API has them
//! (`/v2/{project_id}/apigw/instances/{instance_id}/api-groups/{group_id}/domains`): bind a
//! domain to a group, change its `min_ssl_version` and `is_http_redirect_to_https`, unbind
//! it; bind a certificate given inline to a domain, show it, unbind it. A group lists its
//! domains in its `url_domains` ([`url_domains_json`], in `management`'s group answers).
//!
//! A bound domain is one more name of the group's market domain: buyers reach the group's
//! sellable APIs on it with their purchases, exactly as on the `url_domain` (docs/domains.md).
//! A host name belongs to one group (the store's `domain` claim, shared with `sl_domain` and
//! `url_domain`); a group holds at most [`MAX_GROUP_DOMAINS`] (the `domain_slot` claims).
//! Certificates themselves, and every check of one, are `certificates`'. Must not build
//! snapshots (that is `publish`).

use axum::extract::State as AxState;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Call;
use super::certificates::{self, cert_json, CertificateForm};
use super::error::ControlError;
use super::management::{own_group, reply};
use super::market::check_url_domain;
use super::rule::{invalid, one_of};
use super::state::{new_id, now_rfc3339, Change, DomainRec, GroupRec, State, MAX_GROUP_DOMAINS};
use super::ControlPlane;

type Handler = Result<Response, ControlError>;

/// Huawei's `min_ssl_version` values, and `TLSv1.3` (ours: rustls speaks TLS 1.2 and 1.3
/// only, so `TLSv1.1` and `TLSv1.2` both serve TLS 1.2 and up; docs/domains.md).
pub const SSL_VERSIONS: &[&str] = &["TLSv1.1", "TLSv1.2", "TLSv1.3"];
/// Huawei's default `min_ssl_version`.
pub const DEFAULT_MIN_SSL_VERSION: &str = "TLSv1.1";
/// `cname_status` 3 (resolved): marketgate does not look at DNS; the operator points the
/// name at the proxies.
const CNAME_RESOLVED: u8 = 3;

/// `UrlDomainCreate`: bind an independent domain, with its settings.
#[derive(Debug, Deserialize)]
pub struct DomainCreate {
    pub url_domain: String,
    #[serde(flatten)]
    pub settings: DomainModify,
}

/// `UrlDomainModify`: change a bound domain's TLS settings.
#[derive(Debug, Deserialize)]
pub struct DomainModify {
    #[serde(default)]
    pub min_ssl_version: Option<String>,
    #[serde(default)]
    pub is_http_redirect_to_https: Option<bool>,
    #[serde(default)]
    pub verified_client_certificate_enabled: Option<bool>,
    #[serde(default)]
    pub ingress_http_port: Option<i64>,
    #[serde(default)]
    pub ingress_https_port: Option<i64>,
}

/// The settings marketgate does not offer are refused rather than ignored: client
/// certificates (mutual TLS) and per-domain ingress ports (a proxy's listeners serve every
/// domain).
fn refuse_unsupported(settings: &DomainModify) -> Result<(), ControlError> {
    if settings.verified_client_certificate_enabled == Some(true) {
        return Err(invalid(
            "verified_client_certificate_enabled",
            "must be false: client certificates are not offered",
        ));
    }
    for (field, port) in [
        ("ingress_http_port", settings.ingress_http_port),
        ("ingress_https_port", settings.ingress_https_port),
    ] {
        if port.is_some_and(|p| p != -1) {
            return Err(invalid(
                field,
                "must be -1 or absent: a proxy's listeners serve every domain",
            ));
        }
    }
    Ok(())
}

fn ssl_version(value: Option<String>, current: &str) -> Result<String, ControlError> {
    match value {
        None => Ok(current.to_owned()),
        Some(v) => Ok(one_of("min_ssl_version", &v, SSL_VERSIONS)?.to_owned()),
    }
}

fn own_domain<'a>(
    state: &'a State,
    group: &GroupRec,
    domain_id: &str,
) -> Result<&'a DomainRec, ControlError> {
    state
        .domains
        .get(domain_id)
        .filter(|d| d.group_id == group.id)
        .ok_or_else(|| ControlError::DomainNotFound(domain_id.to_owned()))
}

/// A bound domain as Huawei answers a bind or change (`UrlDomainRefInfo` less the
/// certificate).
fn domain_json(domain: &DomainRec) -> Value {
    json!({
        "id": domain.id,
        "url_domain": domain.url_domain,
        "status": CNAME_RESOLVED,
        "min_ssl_version": domain.min_ssl_version,
        "is_http_redirect_to_https": domain.is_http_redirect_to_https,
        "verified_client_certificate_enabled": false,
    })
}

/// A bound domain with its group and certificate (`UrlDomainRefInfo`).
pub(crate) fn domain_ref_json(state: &State, domain: &DomainRec) -> Value {
    let mut out = domain_json(domain);
    let certificate = domain
        .certificate_id
        .as_ref()
        .and_then(|id| state.certificates.get(id));
    out["ssl_id"] = json!(certificate.map(|c| &c.id));
    out["ssl_name"] = json!(certificate.map(|c| &c.name));
    out["api_group_id"] = json!(domain.group_id);
    out["api_group_name"] = json!(state.groups.get(&domain.group_id).map(|g| &g.name));
    out["instance_id"] = json!(state.groups.get(&domain.group_id).map(|g| &g.instance_id));
    out
}

/// A group's `url_domains` (Huawei's `UrlDomain` list).
pub(crate) fn url_domains_json(state: &State, group_id: &str) -> Value {
    let domains: Vec<Value> = state
        .group_domains(group_id)
        .map(|d| {
            let certificate = d
                .certificate_id
                .as_ref()
                .and_then(|id| state.certificates.get(id));
            json!({
                "id": d.id,
                "domain": d.url_domain,
                "cname_status": CNAME_RESOLVED,
                "ssl_id": certificate.map(|c| &c.id),
                "ssl_name": certificate.map(|c| &c.name),
                "min_ssl_version": d.min_ssl_version,
                "is_http_redirect_to_https": d.is_http_redirect_to_https,
                "verified_client_certificate_enabled": false,
                "is_has_trusted_root_ca": false,
                "ssl_infos": certificate.map(|c| vec![json!({
                    "ssl_id": c.id,
                    "ssl_name": c.name,
                    "algorithm_type": c.algorithm_type,
                    "is_has_trusted_root_ca": false,
                })]).unwrap_or_default(),
            })
        })
        .collect();
    Value::Array(domains)
}

/// `POST …/api-groups/{group_id}/domains`: bind an independent domain.
pub async fn bind(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let DomainCreate {
        url_domain,
        settings,
    } = call.body()?;
    refuse_unsupported(&settings)?;
    let url_domain = url_domain.trim_end_matches('.').to_ascii_lowercase();
    check_url_domain(&url_domain)?;
    let min_ssl_version = ssl_version(settings.min_ssl_version, DEFAULT_MIN_SSL_VERSION)?;
    let mut state = cp.state().await?;
    let group = own_group(&state, call.param("group_id"), &project)?;
    if state.domain_owner(&url_domain).is_some() {
        return Err(ControlError::UrlDomainTaken(url_domain));
    }
    let taken: Vec<u8> = state.group_domains(&group.id).map(|d| d.slot).collect();
    let slot = (0..MAX_GROUP_DOMAINS)
        .find(|s| !taken.contains(s))
        .ok_or_else(|| ControlError::TooManyDomains(group.id.clone()))?;
    let domain = DomainRec {
        id: new_id(),
        group_id: group.id.clone(),
        url_domain,
        slot,
        min_ssl_version,
        is_http_redirect_to_https: settings.is_http_redirect_to_https.unwrap_or(false),
        certificate_id: None,
        create_time: now_rfc3339(),
    };
    let out = domain_json(&domain);
    cp.commit(&mut state, vec![Change::Domain(domain)]).await?;
    Ok(reply(StatusCode::CREATED, out))
}

/// `PUT …/api-groups/{group_id}/domains/{domain_id}`: change its TLS settings.
pub async fn update(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let body: DomainModify = call.body()?;
    refuse_unsupported(&body)?;
    let mut state = cp.state().await?;
    let group = own_group(&state, call.param("group_id"), &project)?;
    let mut domain = own_domain(&state, group, call.param("domain_id"))?.clone();
    domain.min_ssl_version = ssl_version(body.min_ssl_version, &domain.min_ssl_version)?;
    if let Some(redirect) = body.is_http_redirect_to_https {
        domain.is_http_redirect_to_https = redirect;
    }
    let out = domain_json(&domain);
    cp.commit(&mut state, vec![Change::Domain(domain)]).await?;
    Ok(reply(StatusCode::OK, out))
}

/// `DELETE …/api-groups/{group_id}/domains/{domain_id}`: unbind it (its certificate stays
/// a resource of its own).
pub async fn unbind(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let mut state = cp.state().await?;
    let group = own_group(&state, call.param("group_id"), &project)?;
    let id = own_domain(&state, group, call.param("domain_id"))?
        .id
        .clone();
    cp.commit(&mut state, vec![Change::DeleteDomain(id)])
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST …/domains/{domain_id}/certificate`: a certificate given inline (`CertForm`),
/// checked, kept as a certificate resource and bound to the domain (replacing the one bound
/// before: how a certificate is rotated on one domain).
pub async fn bind_certificate(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (tenant, project) = call.tenant_scope(&cp)?;
    let form: CertificateForm = call.body()?;
    let mut state = cp.state().await?;
    let group = own_group(&state, call.param("group_id"), &project)?;
    let mut domain = own_domain(&state, group, call.param("domain_id"))?.clone();
    let certificate = certificates::checked(&state, form, &tenant, &project, None)?;
    certificates::require_covers(&certificate, &domain.url_domain)?;
    domain.certificate_id = Some(certificate.id.clone());
    let mut out = domain_ref_json(&state, &domain);
    out["ssl_id"] = json!(certificate.id);
    out["ssl_name"] = json!(certificate.name);
    cp.commit(
        &mut state,
        vec![Change::Certificate(certificate), Change::Domain(domain)],
    )
    .await?;
    Ok(reply(StatusCode::CREATED, out))
}

/// `GET …/domains/{domain_id}/certificate/{certificate_id}`: the bound certificate, without
/// its key.
pub async fn show_certificate(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let state = cp.state().await?;
    let group = own_group(&state, call.param("group_id"), &project)?;
    let domain = own_domain(&state, group, call.param("domain_id"))?;
    let wanted = call.param("certificate_id");
    let certificate = domain
        .certificate_id
        .as_deref()
        .filter(|id| *id == wanted)
        .and_then(|id| state.certificates.get(id))
        .ok_or_else(|| ControlError::CertificateNotFound(wanted.to_owned()))?;
    Ok(reply(StatusCode::OK, cert_json(certificate)))
}

/// `DELETE …/domains/{domain_id}/certificate/{certificate_id}`: the domain stops serving its
/// certificate (SNI falls back to the default one); the certificate stays.
pub async fn unbind_certificate(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let mut state = cp.state().await?;
    let group = own_group(&state, call.param("group_id"), &project)?;
    let mut domain = own_domain(&state, group, call.param("domain_id"))?.clone();
    let wanted = call.param("certificate_id");
    if domain.certificate_id.as_deref() != Some(wanted) {
        return Err(ControlError::CertificateNotFound(wanted.to_owned()));
    }
    domain.certificate_id = None;
    cp.commit(&mut state, vec![Change::Domain(domain)]).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
