//! A seller's TLS certificates, as Huawei's v2 API has them (`/v2/{project_id}/apigw/certificates`):
//! create (`cert_content` + `private_key`), list, show, replace (rotation), delete, attach to
//! and detach from the seller's bound domains, list the domains attached.
//!
//! A certificate is checked before it is accepted ([`checked`]): it parses, its key matches,
//! it is not expired, and it covers every domain it is (or is being) attached to
//! ([`require_covers`]); a refusal is 400 APIG.2012 naming the field and the rule. The
//! private key is a secret: no answer carries it ([`cert_json`] has no such field), no error
//! or log line either (`CertRec`'s `Debug` leaves it out, [`CertificateForm`] has no
//! `Debug`). The key is stored in the record as an AppSecret is (docs/domains.md: keeping
//! it encrypted at rest). Must not build snapshots (that is `publish`).

use axum::extract::State as AxState;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Call;
use super::domains::domain_ref_json;
use super::error::ControlError;
use super::management::{page, reply};
use super::rule::{invalid, is_cjk, one_of, Text};
use super::state::{new_id, now_rfc3339, rfc3339, CertRec, Change, DomainRec, State};
use super::ControlPlane;
use crate::certificate;

type Handler = Result<Response, ControlError>;

/// Longest PEM accepted for `cert_content` or `private_key`, in bytes (a chain of a few
/// 4096-bit RSA certificates is under 10 KiB).
pub const MAX_PEM_BYTES: usize = 64 * 1024;
/// Huawei's `type` default.
const DEFAULT_TYPE: &str = "global";
/// The `instance_id` of a global certificate, as Huawei answers it.
const GLOBAL_INSTANCE: &str = "common";

/// `CertificateForm` (create, replace) and `CertForm` (bind inline to a domain). No `Debug`:
/// it holds the private key.
#[derive(Deserialize)]
pub struct CertificateForm {
    pub name: String,
    pub cert_content: String,
    pub private_key: String,
    #[serde(default, rename = "type")]
    pub cert_type: Option<String>,
    #[serde(default)]
    pub instance_id: Option<String>,
    #[serde(default)]
    pub trusted_root_ca: Option<String>,
    #[serde(default)]
    pub algorithm_type: Option<String>,
    #[serde(default)]
    pub cert_content_sign: Option<String>,
    #[serde(default)]
    pub private_key_sign: Option<String>,
}

/// `AttachOrDetachDomainsReqBody`.
#[derive(Debug, Deserialize)]
pub struct DomainsBody {
    pub domains: Vec<DomainRef>,
}

/// `AttachOrDetachDomainInfo`: a bound domain by name.
#[derive(Debug, Deserialize)]
pub struct DomainRef {
    pub domain: String,
    #[serde(default)]
    pub instance_ids: Option<Vec<String>>,
    #[serde(default)]
    pub verified_client_certificate_enabled: Option<bool>,
}

/// Certificate names, as Huawei's.
const CERTIFICATE_NAME: Text = Text {
    min: 4,
    max: 50,
    first: |c| c.is_ascii_alphabetic() || is_cjk(c),
    chars: |c| c.is_ascii_alphanumeric() || c == '_' || is_cjk(c),
    says_chars: "letters, digits, _ and Chinese characters",
    says_first: "a letter or a Chinese character",
};

/// Why a value marketgate does not offer is refused.
const NOT_OFFERED: &str = "must be empty: client certificates and SM2 are not offered";

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// A certificate as the API answers it: never the key.
pub(crate) fn cert_json(c: &CertRec) -> Value {
    json!({
        "id": c.id,
        "name": c.name,
        "type": if c.instance_id == GLOBAL_INSTANCE { "global" } else { "instance" },
        "instance_id": c.instance_id,
        "project_id": c.project_id,
        "common_name": c.common_name,
        "san": c.san,
        "version": 3,
        "organization": c.organization,
        "organizational_unit": c.organizational_unit,
        "locality": c.locality,
        "state": c.state,
        "country": c.country,
        "not_before": rfc3339(c.not_before),
        "not_after": rfc3339(c.not_after),
        "serial_number": c.serial_number,
        "issuer": c.issuer,
        "signature_algorithm": c.signature_algorithm,
        "algorithm_type": c.algorithm_type,
        "is_has_trusted_root_ca": false,
        "create_time": c.create_time,
        "update_time": c.update_time,
    })
}

/// Checks a form into the certificate it makes (`existing`: the one it replaces, keeping
/// its id and creation time): the name, the options marketgate does not offer, and the
/// certificate itself ([`certificate::inspect`]: parses, key matches, not expired).
pub(crate) fn checked(
    state: &State,
    form: CertificateForm,
    tenant: &str,
    project: &str,
    existing: Option<&CertRec>,
) -> Result<CertRec, ControlError> {
    CERTIFICATE_NAME.check("name", &form.name)?;
    let except = existing.map(|c| c.id.as_str());
    if state
        .certificates
        .values()
        .any(|c| c.project_id == project && c.name == form.name && Some(c.id.as_str()) != except)
    {
        return Err(ControlError::CertificateNameExists(form.name));
    }
    if form
        .trusted_root_ca
        .as_deref()
        .is_some_and(|ca| !ca.is_empty())
    {
        // Client certificates (mutual TLS) are not offered: refused, not ignored.
        return Err(invalid("trusted_root_ca", NOT_OFFERED));
    }
    if let Some(algorithm) = &form.algorithm_type {
        one_of("algorithm_type", algorithm, &["RSA", "ECC"])?;
    }
    for (field, value) in [
        ("cert_content_sign", &form.cert_content_sign),
        ("private_key_sign", &form.private_key_sign),
    ] {
        if value.as_deref().is_some_and(|v| !v.is_empty()) {
            return Err(invalid(field, NOT_OFFERED));
        }
    }
    let cert_type = form.cert_type.as_deref().unwrap_or(DEFAULT_TYPE);
    let instance_id = match one_of("type", cert_type, &["global", "instance"])? {
        "global" => GLOBAL_INSTANCE.to_owned(),
        _ => form
            .instance_id
            .filter(|i| !i.is_empty())
            .ok_or_else(|| super::rule::required("instance_id"))?,
    };
    for (field, pem) in [
        ("cert_content", &form.cert_content),
        ("private_key", &form.private_key),
    ] {
        if pem.len() > MAX_PEM_BYTES {
            return Err(invalid(
                field,
                format!("must be at most {MAX_PEM_BYTES} bytes of PEM"),
            ));
        }
    }
    let seen = certificate::inspect(
        form.cert_content.as_bytes(),
        form.private_key.as_bytes(),
        now(),
    )
    .map_err(|error| {
        let (field, rule) = error.rule();
        match error {
            certificate::CertificateError::Expired { not_after } => {
                invalid(field, format!("{rule} (notAfter {})", rfc3339(not_after)))
            }
            _ => invalid(field, rule),
        }
    })?;
    let now = now_rfc3339();
    Ok(CertRec {
        id: existing.map_or_else(new_id, |c| c.id.clone()),
        name: form.name,
        domain_id: tenant.to_owned(),
        project_id: project.to_owned(),
        instance_id,
        cert_content: form.cert_content,
        private_key: form.private_key,
        common_name: seen.common_name,
        san: seen.san,
        issuer: seen.issuer,
        organization: seen.organization,
        organizational_unit: seen.organizational_unit,
        locality: seen.locality,
        state: seen.state,
        country: seen.country,
        serial_number: seen.serial_number,
        signature_algorithm: seen.signature_algorithm,
        algorithm_type: seen.algorithm_type,
        not_before: seen.not_before,
        not_after: seen.not_after,
        create_time: existing.map_or_else(|| now.clone(), |c| c.create_time.clone()),
        update_time: now,
    })
}

/// The certificate must be valid for `domain` (its SANs; one wildcard label).
pub(crate) fn require_covers(c: &CertRec, domain: &str) -> Result<(), ControlError> {
    if certificate::covers(c.cert_content.as_bytes(), domain) {
        return Ok(());
    }
    Err(invalid(
        "cert_content",
        format!(
            "must cover the domain {domain} (its names are [{}])",
            c.san.join(", ")
        ),
    ))
}

fn own_certificate<'a>(
    state: &'a State,
    id: &str,
    project: &str,
) -> Result<&'a CertRec, ControlError> {
    state
        .certificates
        .get(id)
        .filter(|c| c.project_id == project)
        .ok_or_else(|| ControlError::CertificateNotFound(id.to_owned()))
}

/// The caller's bound domain named `name`.
fn own_domain_named<'a>(
    state: &'a State,
    name: &str,
    project: &str,
) -> Result<&'a DomainRec, ControlError> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    state
        .domains
        .values()
        .find(|d| {
            d.url_domain == name
                && state
                    .groups
                    .get(&d.group_id)
                    .is_some_and(|g| g.project_id == project)
        })
        .ok_or(ControlError::DomainNotFound(name))
}

fn attached<'a>(state: &'a State, certificate_id: &'a str) -> impl Iterator<Item = &'a DomainRec> {
    state
        .domains
        .values()
        .filter(move |d| d.certificate_id.as_deref() == Some(certificate_id))
}

/// `POST /v2/{project_id}/apigw/certificates`.
pub async fn create(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (tenant, project) = call.project_scope()?;
    let form: CertificateForm = call.body()?;
    let mut state = cp.state().await?;
    let certificate = checked(&state, form, &tenant, &project, None)?;
    let out = cert_json(&certificate);
    cp.commit(&mut state, vec![Change::Certificate(certificate)])
        .await?;
    Ok(reply(StatusCode::CREATED, out))
}

/// `GET /v2/{project_id}/apigw/certificates`: `{total, size, certs}`.
pub async fn list(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.project_scope()?;
    let state = cp.state().await?;
    let wanted = |field: &str, value: &str| {
        call.query
            .get(field)
            .filter(|q| !q.is_empty())
            .is_none_or(|q| value.contains(q.as_str()))
    };
    let items = state
        .certificates
        .values()
        .filter(|c| c.project_id == project)
        .map(cert_json)
        .filter(|c| {
            [
                "name",
                "common_name",
                "signature_algorithm",
                "type",
                "instance_id",
                "algorithm_type",
            ]
            .iter()
            .all(|field| wanted(field, c[field].as_str().unwrap_or_default()))
        })
        .collect();
    Ok(page(&call, "certs", items))
}

/// `GET /v2/{project_id}/apigw/certificates/{certificate_id}`: without the key.
pub async fn show(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.project_scope()?;
    let state = cp.state().await?;
    let certificate = own_certificate(&state, call.param("certificate_id"), &project)?;
    Ok(reply(StatusCode::OK, cert_json(certificate)))
}

/// `PUT /v2/{project_id}/apigw/certificates/{certificate_id}`: replaces the certificate and
/// key in place (rotation: every domain attached serves the new one from the next snapshot;
/// open connections keep theirs). It must still cover every domain attached.
pub async fn update(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (tenant, project) = call.project_scope()?;
    let form: CertificateForm = call.body()?;
    let mut state = cp.state().await?;
    let existing = own_certificate(&state, call.param("certificate_id"), &project)?;
    let certificate = checked(&state, form, &tenant, &project, Some(existing))?;
    for domain in attached(&state, &certificate.id) {
        require_covers(&certificate, &domain.url_domain)?;
    }
    let out = cert_json(&certificate);
    cp.commit(&mut state, vec![Change::Certificate(certificate)])
        .await?;
    Ok(reply(StatusCode::OK, out))
}

/// `DELETE /v2/{project_id}/apigw/certificates/{certificate_id}`: refused (409) while a
/// domain serves it.
pub async fn delete(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.project_scope()?;
    let mut state = cp.state().await?;
    let certificate = own_certificate(&state, call.param("certificate_id"), &project)?;
    let domains: Vec<&str> = attached(&state, &certificate.id)
        .map(|d| d.url_domain.as_str())
        .collect();
    if !domains.is_empty() {
        return Err(ControlError::Conflict(format!(
            "the certificate {} is attached to [{}]; detach it first",
            certificate.id,
            domains.join(", ")
        )));
    }
    let id = certificate.id.clone();
    // An attach rewrites the certificate's record too, so that one committed meanwhile on
    // another replica moves its revision and fails this delete's compare-and-swap.
    cp.commit(&mut state, vec![Change::DeleteCertificate(id)])
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST …/certificates/{certificate_id}/domains/attach`: each named domain serves this
/// certificate (it must cover it and not be expired).
pub async fn attach(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.project_scope()?;
    let body: DomainsBody = call.body()?;
    let mut state = cp.state().await?;
    let certificate = own_certificate(&state, call.param("certificate_id"), &project)?;
    if certificate.not_after <= now() {
        return Err(invalid(
            "cert_content",
            format!(
                "must not be expired (notAfter {})",
                rfc3339(certificate.not_after)
            ),
        ));
    }
    // Written unchanged (its revision moves): a delete decided before this attach fails.
    let mut changes = vec![Change::Certificate(certificate.clone())];
    for named in &body.domains {
        if named.verified_client_certificate_enabled == Some(true) {
            return Err(invalid(
                "verified_client_certificate_enabled",
                "must be false: client certificates are not offered",
            ));
        }
        let mut domain = own_domain_named(&state, &named.domain, &project)?.clone();
        require_covers(certificate, &domain.url_domain)?;
        domain.certificate_id = Some(certificate.id.clone());
        changes.push(Change::Domain(domain));
    }
    if changes.len() == 1 {
        return Err(invalid("domains", "must name at least one domain"));
    }
    cp.commit(&mut state, changes).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST …/certificates/{certificate_id}/domains/detach`: the named domains stop serving
/// it (SNI falls back to the default certificate).
pub async fn detach(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.project_scope()?;
    let body: DomainsBody = call.body()?;
    let mut state = cp.state().await?;
    let certificate = own_certificate(&state, call.param("certificate_id"), &project)?;
    let mut changes = Vec::new();
    for named in &body.domains {
        let mut domain = own_domain_named(&state, &named.domain, &project)?.clone();
        if domain.certificate_id.as_deref() != Some(certificate.id.as_str()) {
            return Err(ControlError::DomainNotFound(domain.url_domain));
        }
        domain.certificate_id = None;
        changes.push(Change::Domain(domain));
    }
    if changes.is_empty() {
        return Err(invalid("domains", "must name at least one domain"));
    }
    cp.commit(&mut state, changes).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET …/certificates/{certificate_id}/attached-domains`: `{total, size, bound_domains}`.
pub async fn attached_domains(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.project_scope()?;
    let state = cp.state().await?;
    let certificate = own_certificate(&state, call.param("certificate_id"), &project)?;
    let filter = call.query.get("url_domain").filter(|q| !q.is_empty());
    let items = attached(&state, &certificate.id)
        .filter(|d| filter.is_none_or(|q| d.url_domain.contains(q.as_str())))
        .map(|d| domain_ref_json(&state, d))
        .collect();
    Ok(page(&call, "bound_domains", items))
}
