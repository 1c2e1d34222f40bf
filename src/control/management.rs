//! The Huawei APIG v2 management API subset (`spec/apig-v2-management.md`): API groups, APIs,
//! publishing, environments, apps, app codes, app authorizations — Huawei's paths, fields,
//! validation, list envelopes and status codes, so that the official SDK works against it.
//!
//! Every handler: authenticate (middleware), scope to the caller's own project, validate
//! against a caught-up view of the state, commit the changes, answer. Resources of
//! another project read as absent (404), as on Huawei. Must not touch market states (that is
//! `market`) or build snapshots (that is `publish`).

use axum::extract::State as AxState;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use rand::Rng;
use serde_json::{json, Map, Value};

use crate::snapshot::{self, MarketState};

use super::apis::{self, ApiBody};
use super::app_auths::AuthsBody;
use super::apps::{AppBody, AppCodeBody, AppFields, SecretBody};
use super::auth::Call;
use super::error::ControlError;
use super::publications::{self, Action, ActionBody, Batch, BatchApis, BatchBody};
use super::rule::{self, Lenient, GROUP_NAME};
use super::state::{
    new_id, now_rfc3339, ApiDef, ApiRec, AppCodeRec, AppRec, AuthRec, BackendApiDef, Change,
    GroupRec, Publication, State, MAX_APP_CODES, RELEASE_ENV_ID, RELEASE_ENV_NAME,
};
use super::ControlPlane;

/// Default page size of list operations (spec §0.5).
pub const DEFAULT_PAGE_LIMIT: usize = 20;
/// Largest page size; larger asks are cut to it.
pub const MAX_PAGE_LIMIT: usize = 500;
/// Longest backend timeout, in milliseconds.
pub const MAX_BACKEND_TIMEOUT_MS: u64 = 600_000;
/// Most API ids in one batch publish.
pub const MAX_BATCH_APIS: usize = 1000;
/// Length of generated app codes, in characters (Huawei accepts 64–180).
pub const GENERATED_APP_CODE_CHARS: usize = 64;

type Handler = Result<Response, ControlError>;

// ---------------------------------------------------------------------------------------
// Shared field readers and validators.

pub(crate) fn reply(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

/// A string field that must be one of `allowed`.
fn one_of(value: String, allowed: &[&str], field: &str) -> Result<String, ControlError> {
    rule::one_of(field, &value, allowed)?;
    Ok(value)
}

/// Longest remark, in characters.
pub const MAX_REMARK_CHARS: usize = 255;

/// A remark (absent is empty) of at most [`MAX_REMARK_CHARS`].
pub(super) fn checked_remark(remark: Option<String>) -> Result<String, ControlError> {
    let remark = remark.unwrap_or_default();
    let count = remark.chars().count();
    if count > MAX_REMARK_CHARS {
        return Err(rule::invalid(
            "remark",
            format!("must be at most {MAX_REMARK_CHARS} characters (got {count})"),
        ));
    }
    Ok(remark)
}

/// An API's `req_uri` (or its backend's) by the one grammar ([`crate::template`]), as
/// its parameter names; a refusal states the grammar and what broke it.
fn req_uri_params(field: &str, uri: &str) -> Result<Vec<String>, ControlError> {
    let segments = crate::template::parse_template(uri).map_err(|why| {
        rule::invalid(field, format!("{} ({why})", crate::template::REQ_URI_RULE))
    })?;
    Ok(crate::template::param_names(&segments)
        .map(str::to_owned)
        .collect())
}

/// `(offset, limit)` from a Huawei list query.
fn paging(call: &Call) -> (usize, usize) {
    let num = |name: &str| call.query.get(name).and_then(|v| v.parse::<i64>().ok());
    let offset = num("offset").unwrap_or(0).max(0) as usize;
    let limit = match num("limit") {
        Some(l) if l > 0 => (l as usize).min(MAX_PAGE_LIMIT),
        _ => DEFAULT_PAGE_LIMIT,
    };
    (offset, limit)
}

/// `{total, size, <key>: [...]}` for one page of `items` (`offset`, `limit` as Huawei's lists).
pub(super) fn page(call: &Call, key: &str, items: Vec<Value>) -> Response {
    let (offset, limit) = paging(call);
    let total = items.len();
    let items: Vec<Value> = items.into_iter().skip(offset).take(limit).collect();
    let mut body = Map::new();
    body.insert("total".into(), json!(total));
    body.insert("size".into(), json!(items.len()));
    body.insert(key.into(), Value::Array(items));
    reply(StatusCode::OK, Value::Object(body))
}

/// Does `value` pass the query filter `field` (exact with `precise_search`, else contains)?
pub(super) fn matches(call: &Call, field: &str, value: &str) -> bool {
    match call.query.get(field).filter(|q| !q.is_empty()) {
        None => true,
        Some(wanted) => {
            let precise = call
                .query
                .get("precise_search")
                .is_some_and(|p| p.split(',').any(|f| f.trim() == field));
            if precise {
                value == wanted
            } else {
                value.contains(wanted.as_str())
            }
        }
    }
}

pub(super) fn exact(call: &Call, field: &str, value: &str) -> bool {
    call.query
        .get(field)
        .filter(|q| !q.is_empty())
        .is_none_or(|wanted| wanted == value)
}

pub(crate) fn own_group<'a>(
    state: &'a State,
    id: &str,
    project: &str,
) -> Result<&'a GroupRec, ControlError> {
    state
        .groups
        .get(id)
        .filter(|g| g.project_id == project)
        .ok_or_else(|| ControlError::GroupNotFound(id.to_owned()))
}

pub(super) fn own_api<'a>(
    state: &'a State,
    id: &str,
    project: &str,
) -> Result<&'a ApiRec, ControlError> {
    state
        .apis
        .get(id)
        .filter(|a| {
            state
                .groups
                .get(&a.group_id)
                .is_some_and(|g| g.project_id == project)
        })
        .ok_or_else(|| ControlError::ApiNotFound(id.to_owned()))
}

fn own_app<'a>(state: &'a State, id: &str, project: &str) -> Result<&'a AppRec, ControlError> {
    state
        .apps
        .get(id)
        .filter(|a| a.project_id == project)
        .ok_or_else(|| ControlError::AppNotFound(id.to_owned()))
}

// ---------------------------------------------------------------------------------------
// API groups.

/// Huawei's `on_sell_status`: 1 on sale, 2 not, 3 under review (locked).
fn on_sell_status(state: MarketState) -> u8 {
    match state {
        MarketState::OnSale => 1,
        MarketState::Locked => 3,
        MarketState::Unlisted | MarketState::OffSale | MarketState::Delisted => 2,
    }
}

pub(crate) fn group_json(state: &State, g: &GroupRec) -> Value {
    json!({
        "id": g.id,
        "name": g.name,
        "remark": g.remark,
        "status": 1,
        "sl_domain": g.sl_domain,
        "sl_domains": [g.sl_domain],
        "sl_domain_access_enabled": true,
        "register_time": g.register_time,
        "update_time": g.update_time,
        "on_sell_status": on_sell_status(g.market_state),
        "url_domains": super::domains::url_domains_json(state, &g.id),
        "is_default": 2,
        "version": "V1",
        "market_state": g.market_state.as_str(),
        "url_domain": g.url_domain,
    })
}

/// The system debug domain of a new group: `{32 hex}.apic.{instance_id}.marketgate.local`,
/// with the instance id lower-cased and anything but letters, digits and `-` made `-`.
fn new_sl_domain(instance_id: &str) -> String {
    let label: String = instance_id
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '-') => c,
            _ => '-',
        })
        .collect();
    let label = label.trim_matches('-');
    let label = if label.is_empty() { "default" } else { label };
    format!("{}.apic.{label}.marketgate.local", new_id())
}

/// A group's checked body, its name unique in the project (but for the group `except`).
fn group_fields(
    state: &State,
    body: super::groups::GroupBody,
    project: &str,
    except: Option<&str>,
) -> Result<(String, String), ControlError> {
    let (name, remark) = body.validate()?;
    if state
        .groups
        .values()
        .any(|g| g.project_id == project && g.name == name && Some(g.id.as_str()) != except)
    {
        return Err(ControlError::GroupNameExists(name));
    }
    Ok((name, remark))
}

pub async fn create_group(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (domain, project) = call.tenant_scope(&cp)?;
    let body = call.body()?;
    let mut state = cp.state().await?;
    let (name, remark) = group_fields(&state, body, &project, None)?;
    let now = now_rfc3339();
    let group = GroupRec {
        id: new_id(),
        name,
        remark,
        domain_id: domain,
        project_id: project,
        instance_id: cp.inner.config.instance_id.clone(),
        sl_domain: new_sl_domain(&cp.inner.config.instance_id),
        url_domain: None,
        market_state: MarketState::Unlisted,
        register_time: now.clone(),
        update_time: now,
    };
    let out = group_json(&state, &group);
    cp.commit(&mut state, vec![Change::Group(group)]).await?;
    Ok(reply(StatusCode::CREATED, out))
}

pub async fn list_groups(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let state = cp.state().await?;
    let items = state
        .groups
        .values()
        .filter(|g| g.project_id == project)
        .filter(|g| exact(&call, "id", &g.id) && matches(&call, "name", &g.name))
        .map(|g| group_json(&state, g))
        .collect();
    Ok(page(&call, "groups", items))
}

pub async fn show_group(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let state = cp.state().await?;
    let group = own_group(&state, call.param("group_id"), &project)?;
    Ok(reply(StatusCode::OK, group_json(&state, group)))
}

pub async fn update_group(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let body = call.body()?;
    let mut state = cp.state().await?;
    let mut group = own_group(&state, call.param("group_id"), &project)?.clone();
    let (name, remark) = group_fields(&state, body, &project, Some(&group.id))?;
    group.name = name;
    group.remark = remark;
    group.update_time = now_rfc3339();
    let out = group_json(&state, &group);
    cp.commit(&mut state, vec![Change::Group(group)]).await?;
    Ok(reply(StatusCode::OK, out))
}

pub async fn delete_group(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let mut state = cp.state().await?;
    let group = own_group(&state, call.param("group_id"), &project)?;
    if state.group_apis(&group.id).next().is_some() {
        return Err(ControlError::GroupHasApis(group.id.clone()));
    }
    if matches!(
        group.market_state,
        MarketState::OnSale | MarketState::OffSale | MarketState::Locked
    ) {
        return Err(ControlError::Forbidden(format!(
            "the API group {} is on the market; delist it first",
            group.id
        )));
    }
    // Its bound domains go with it (as on Huawei); their certificates stay.
    let mut changes: Vec<Change> = state
        .group_domains(&group.id)
        .map(|d| Change::DeleteDomain(d.id.clone()))
        .collect();
    changes.push(Change::DeleteGroup(group.id.clone()));
    cp.commit(&mut state, changes).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---------------------------------------------------------------------------------------
// APIs.

/// Validates an `ApiCreate` body into a definition and the group it belongs to.
fn api_def(
    state: &State,
    body: ApiBody,
    sent: &Map<String, Value>,
    project: &str,
    except: Option<&str>,
) -> Result<(String, ApiDef), ControlError> {
    let group_id = rule::required_text("group_id", body.group_id)?;
    own_group(state, &group_id, project)?;
    let name = rule::required_text("name", body.name)?;
    GROUP_NAME.check("name", &name)?;
    let api_type = rule::one_of_int(
        "type",
        apis::integer("type", body.api_type.as_ref())?,
        &[(1, "public"), (2, "private")],
    )? as u8;
    let req_protocol = one_of(
        rule::required_text("req_protocol", body.req_protocol)?,
        &["HTTP", "HTTPS", "BOTH"],
        "req_protocol",
    )?;
    const METHODS: &[&str] = &[
        "GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS", "ANY",
    ];
    let req_method = one_of(
        rule::required_text("req_method", body.req_method)?,
        METHODS,
        "req_method",
    )?;
    let req_uri = rule::required_text("req_uri", body.req_uri)?;
    let front_params = req_uri_params("req_uri", &req_uri)?;
    let match_mode = one_of(
        body.match_mode.unwrap_or_else(|| "NORMAL".into()),
        &["NORMAL", "SWA"],
        "match_mode",
    )?;
    let auth_type = one_of(
        rule::required_text("auth_type", body.auth_type)?,
        &["NONE", "APP", "IAM", "AUTHORIZER"],
        "auth_type",
    )?;
    if auth_type == "AUTHORIZER" && body.authorizer_id.is_none_or(|a| a.is_empty()) {
        return Err(rule::invalid(
            "authorizer_id",
            "is required when auth_type is AUTHORIZER",
        ));
    }
    let app_code_auth_type = one_of(
        body.auth_opt
            .and_then(|opt| opt.app_code_auth_type)
            .unwrap_or_else(|| "DISABLE".into()),
        &["DISABLE", "HEADER"],
        "auth_opt.app_code_auth_type",
    )?;
    let backend_type = one_of(
        rule::required_text("backend_type", body.backend_type)?,
        &["HTTP", "MOCK"],
        "backend_type",
    )?;
    let remark = checked_remark(body.remark)?;
    let (backend_api, mock_result) = if backend_type == "HTTP" {
        let required = || {
            rule::invalid(
                "backend_api",
                "is required (an object) when backend_type is HTTP",
            )
        };
        let b = match body.backend_api {
            Some(Lenient::Valid(b)) => b,
            Some(Lenient::Invalid(sent)) => {
                return Err(apis::sent_as::<apis::BackendBody>(
                    "backend_api",
                    sent,
                    required(),
                ))
            }
            None => return Err(required()),
        };
        let timeout = rule::int_range(
            "backend_api.timeout",
            apis::integer("backend_api.timeout", b.timeout.as_ref())?,
            1,
            MAX_BACKEND_TIMEOUT_MS as i64,
            "ms",
        )? as u64;
        const BACKEND_DOMAIN_RULE: &str =
            "must be a host or host:port of at most 255 characters, without scheme, path or user";
        let url_domain = match b.url_domain {
            Some(Lenient::Valid(domain)) if !domain.is_empty() => domain,
            _ => return Err(rule::invalid("backend_api.url_domain", BACKEND_DOMAIN_RULE)),
        };
        if url_domain.len() > 255
            || url_domain.contains(['/', '@'])
            || url_domain.parse::<http::uri::Authority>().is_err()
        {
            return Err(rule::invalid("backend_api.url_domain", BACKEND_DOMAIN_RULE));
        }
        // The data plane forwards over plain HTTP only; an HTTPS backend would make every
        // snapshot unservable, so it is refused here.
        let protocol = one_of(
            b.req_protocol.unwrap_or_else(|| "HTTP".into()),
            &["HTTP"],
            "backend_api.req_protocol",
        )?;
        let method = one_of(
            b.req_method.unwrap_or_else(|| req_method.clone()),
            METHODS,
            "backend_api.req_method",
        )?;
        let uri = b.req_uri.unwrap_or_else(|| req_uri.clone());
        let back_params = req_uri_params("backend_api.req_uri", &uri)?;
        if let Some(unknown) = back_params.iter().find(|p| !front_params.contains(p)) {
            return Err(rule::invalid(
                "backend_api.req_uri",
                format!("may only use parameters of req_uri ({{{unknown}}} is not in it)"),
            ));
        }
        (
            Some(BackendApiDef {
                req_protocol: protocol,
                req_method: method,
                req_uri: uri,
                url_domain,
                timeout,
            }),
            None,
        )
    } else {
        let content = match body.mock_info {
            Some(Lenient::Valid(m)) => m.result_content.unwrap_or_default(),
            None => String::new(),
            Some(Lenient::Invalid(sent)) => {
                return Err(apis::sent_as::<apis::MockInfo>(
                    "mock_info",
                    sent,
                    ControlError::BadJson("mock_info must be an object".into()),
                ))
            }
        };
        (None, Some(content))
    };
    for api in state.group_apis(&group_id) {
        if Some(api.id.as_str()) == except {
            continue;
        }
        if api.def.name == name {
            return Err(ControlError::ApiNameExists(name));
        }
        if api.def.req_method == req_method && api.def.req_uri == req_uri {
            return Err(ControlError::ApiExists(format!("{req_method} {req_uri}")));
        }
        if let Some(p) = &api.release {
            if p.frozen.req_method == req_method && p.frozen.req_uri == req_uri {
                return Err(ControlError::ApiExists(format!("{req_method} {req_uri}")));
            }
        }
    }
    Ok((
        group_id,
        ApiDef {
            name,
            api_type,
            req_protocol,
            req_method,
            req_uri,
            match_mode,
            auth_type,
            app_code_auth_type,
            backend_type,
            remark,
            backend_api,
            mock_result,
            extra: sent.clone(),
        },
    ))
}

/// The definition the data plane serves once published.
fn freeze(id: &str, def: &ApiDef) -> snapshot::Api {
    let backend = match (&def.backend_api, &def.mock_result) {
        (Some(b), _) => snapshot::Backend::Http {
            req_protocol: b.req_protocol.clone(),
            req_method: b.req_method.clone(),
            req_uri: b.req_uri.clone(),
            url_domain: b.url_domain.clone(),
            timeout_ms: b.timeout,
        },
        (None, body) => snapshot::Backend::Mock {
            status: 200,
            body: body.clone().unwrap_or_default(),
        },
    };
    snapshot::Api {
        id: id.to_owned(),
        name: def.name.clone(),
        api_type: def.api_type,
        req_protocol: def.req_protocol.clone(),
        req_method: def.req_method.clone(),
        req_uri: def.req_uri.clone(),
        match_mode: def.match_mode.clone(),
        auth_type: def.auth_type.clone(),
        app_code_auth: def.app_code_auth_type == "HEADER",
        backend,
    }
}

fn api_json(state: &State, api: &ApiRec) -> Value {
    let d = &api.def;
    let mut out = d.extra.clone();
    let group = state.groups.get(&api.group_id);
    let mut set = |k: &str, v: Value| {
        out.insert(k.to_owned(), v);
    };
    set("id", json!(api.id));
    set("name", json!(d.name));
    set("type", json!(d.api_type));
    set("group_id", json!(api.group_id));
    set("group_name", json!(group.map(|g| g.name.clone())));
    set("group_version", json!("V1"));
    set("status", json!(1));
    set("arrange_necessary", json!(2));
    set("req_protocol", json!(d.req_protocol));
    set("req_method", json!(d.req_method));
    set("req_uri", json!(d.req_uri));
    set("match_mode", json!(d.match_mode));
    set("auth_type", json!(d.auth_type));
    set(
        "auth_opt",
        json!({"app_code_auth_type": d.app_code_auth_type}),
    );
    set("backend_type", json!(d.backend_type));
    set("remark", json!(d.remark));
    set("register_time", json!(api.register_time));
    set("update_time", json!(api.update_time));
    if let Some(b) = &d.backend_api {
        set(
            "backend_api",
            json!({
                "id": api.id,
                "status": 1,
                "req_protocol": b.req_protocol,
                "req_method": b.req_method,
                "req_uri": b.req_uri,
                "url_domain": b.url_domain,
                "timeout": b.timeout,
                "vpc_channel_status": 2,
                "retry_count": "-1",
                "register_time": api.register_time,
                "update_time": api.update_time,
            }),
        );
    }
    if let Some(m) = &d.mock_result {
        set(
            "mock_info",
            json!({"id": api.id, "result_content": m, "status": 1}),
        );
    }
    match &api.release {
        Some(p) => {
            set("run_env_id", json!(RELEASE_ENV_ID));
            set("run_env_name", json!(RELEASE_ENV_NAME));
            set("publish_id", json!(p.publish_id));
            set("publish_time", json!(p.publish_time));
        }
        None => {
            out.remove("run_env_id");
            out.remove("publish_id");
        }
    }
    if let Some(g) = group {
        out.insert(
            "api_group_info".into(),
            json!({"id": g.id, "name": g.name, "status": 1, "sl_domain": g.sl_domain,
                   "register_time": g.register_time, "update_time": g.update_time,
                   "on_sell_status": on_sell_status(g.market_state), "url_domains": []}),
        );
    }
    Value::Object(out)
}

pub async fn create_api(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let sent = call.json()?;
    let body = call.body()?;
    let mut state = cp.state().await?;
    let (group_id, def) = api_def(&state, body, &sent, &project, None)?;
    let now = now_rfc3339();
    let api = ApiRec {
        id: new_id(),
        group_id,
        def,
        register_time: now.clone(),
        update_time: now,
        release: None,
    };
    let out = api_json(&state, &api);
    cp.commit(&mut state, vec![Change::Api(api)]).await?;
    Ok(reply(StatusCode::CREATED, out))
}

pub async fn list_apis(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let state = cp.state().await?;
    let items = state
        .apis
        .values()
        .filter(|a| {
            state
                .groups
                .get(&a.group_id)
                .is_some_and(|g| g.project_id == project)
        })
        .filter(|a| {
            exact(&call, "id", &a.id)
                && exact(&call, "group_id", &a.group_id)
                && matches(&call, "name", &a.def.name)
                && matches(&call, "req_uri", &a.def.req_uri)
                && exact(&call, "req_protocol", &a.def.req_protocol)
                && exact(&call, "req_method", &a.def.req_method)
                && exact(&call, "auth_type", &a.def.auth_type)
                && exact(&call, "type", &a.def.api_type.to_string())
                && call
                    .query
                    .get("env_id")
                    .filter(|e| !e.is_empty())
                    .is_none_or(|env| env == RELEASE_ENV_ID && a.release.is_some())
        })
        .map(|a| api_json(&state, a))
        .collect();
    Ok(page(&call, "apis", items))
}

pub async fn show_api(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let state = cp.state().await?;
    let api = own_api(&state, call.param("api_id"), &project)?;
    Ok(reply(StatusCode::OK, api_json(&state, api)))
}

/// Edits the draft; the published RELEASE copy stays frozen until the next publish.
pub async fn update_api(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let sent = call.json()?;
    let body = call.body()?;
    let mut state = cp.state().await?;
    let mut api = own_api(&state, call.param("api_id"), &project)?.clone();
    let (group_id, def) = api_def(&state, body, &sent, &project, Some(&api.id))?;
    if group_id != api.group_id {
        return Err(rule::invalid(
            "group_id",
            format!("cannot change: the API belongs to group {}", api.group_id),
        ));
    }
    api.def = def;
    api.update_time = now_rfc3339();
    let out = api_json(&state, &api);
    cp.commit(&mut state, vec![Change::Api(api)]).await?;
    Ok(reply(StatusCode::OK, out))
}

pub async fn delete_api(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let mut state = cp.state().await?;
    let api = own_api(&state, call.param("api_id"), &project)?;
    if api.release.is_some() {
        return Err(ControlError::ApiPublished(api.id.clone()));
    }
    let id = api.id.clone();
    let mut changes: Vec<Change> = state
        .auths
        .values()
        .filter(|a| a.api_id == id)
        .map(|a| Change::DeleteAuth(a.id.clone()))
        .collect();
    changes.push(Change::DeleteApi(id));
    cp.commit(&mut state, changes).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---------------------------------------------------------------------------------------
// Publishing and environments.

fn check_env(env_id: &str) -> Result<(), ControlError> {
    if env_id == RELEASE_ENV_ID {
        Ok(())
    } else {
        Err(ControlError::EnvNotFound(env_id.to_owned()))
    }
}

/// Would publishing `api`'s draft give its group two RELEASE APIs with one method and URI
/// (possible when drafts were edited after publishing)? The data plane refuses such
/// snapshots, so publishing refuses first.
fn release_collision(state: &State, api: &ApiRec, also: &[ApiRec]) -> Result<(), ControlError> {
    let clash = |other: &ApiRec| {
        other.id != api.id
            && other.group_id == api.group_id
            && other.release.as_ref().is_some_and(|p| {
                p.frozen.req_method == api.def.req_method && p.frozen.req_uri == api.def.req_uri
            })
    };
    let in_state = state
        .apis
        .values()
        .filter(|o| !also.iter().any(|a| a.id == o.id))
        .any(clash);
    if in_state || also.iter().any(clash) {
        return Err(ControlError::ApiExists(format!(
            "{} {} is already published in the group",
            api.def.req_method, api.def.req_uri
        )));
    }
    Ok(())
}

/// Publishes (freezes the current draft) or takes offline; returns the changed record and
/// the publish record to answer with.
fn publish_one(api: &ApiRec, online: bool, remark: &str) -> (ApiRec, Value) {
    let mut api = api.clone();
    let now = now_rfc3339();
    if online {
        api.release = Some(Publication {
            publish_id: new_id(),
            version_id: new_id(),
            publish_time: now.clone(),
            remark: remark.to_owned(),
            frozen: freeze(&api.id, &api.def),
        });
    } else {
        api.release = None;
    }
    let record = json!({
        "publish_id": api.release.as_ref().map(|p| p.publish_id.clone()).unwrap_or_default(),
        "api_id": api.id,
        "api_name": api.def.name,
        "env_id": RELEASE_ENV_ID,
        "remark": remark,
        "publish_time": now,
        "version_id": api.release.as_ref().map(|p| p.version_id.clone()).unwrap_or_default(),
    });
    (api, record)
}

pub async fn publish_action(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let Action {
        online,
        env_id,
        api_id,
        remark,
    } = call.body::<ActionBody>()?.validate()?;
    check_env(&env_id)?;
    let mut state = cp.state().await?;
    let api = own_api(&state, &api_id, &project)?;
    if online {
        release_collision(&state, api, &[])?;
    }
    let (api, record) = publish_one(api, online, &remark);
    cp.commit(&mut state, vec![Change::Api(api)]).await?;
    Ok(reply(StatusCode::CREATED, record))
}

pub async fn publish_batch(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let online = publications::online(call.query.get("action").map(String::as_str).unwrap_or(""))?;
    let Batch {
        env_id,
        remark,
        apis,
    } = call.body::<BatchBody>()?.validate()?;
    check_env(&env_id)?;
    let mut state = cp.state().await?;
    let ids: Vec<String> = match apis {
        BatchApis::Ids(ids) => ids,
        BatchApis::Group(group_id) => {
            own_group(&state, &group_id, &project)?;
            state.group_apis(&group_id).map(|a| a.id.clone()).collect()
        }
    };
    if ids.len() > MAX_BATCH_APIS {
        return Err(rule::invalid(
            "apis",
            format!(
                "must hold at most {MAX_BATCH_APIS} API ids (got {})",
                ids.len()
            ),
        ));
    }
    let (mut success, mut failure, mut changes) = (Vec::new(), Vec::new(), Vec::new());
    let mut published: Vec<ApiRec> = Vec::new();
    for id in ids {
        let checked = own_api(&state, &id, &project).and_then(|api| {
            if online {
                release_collision(&state, api, &published)?;
            }
            Ok(api)
        });
        match checked {
            Ok(api) => {
                let (api, record) = publish_one(api, online, &remark);
                published.push(api.clone());
                changes.push(Change::Api(api));
                success.push(record);
            }
            Err(e) => {
                let (_, code) = e.status_and_code();
                failure.push(json!({"api_id": id, "api_name": "", "error_code": code, "error_msg": e.to_string()}));
            }
        }
    }
    if !changes.is_empty() {
        cp.commit(&mut state, changes).await?;
    }
    Ok(reply(
        StatusCode::OK,
        json!({"success": success, "failure": failure}),
    ))
}

pub async fn list_envs(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    call.tenant_scope(&cp)?;
    let items = if matches(&call, "name", RELEASE_ENV_NAME) {
        vec![
            json!({"id": RELEASE_ENV_ID, "name": RELEASE_ENV_NAME, "remark": "生产环境", "create_time": "2017-01-01T00:00:00Z"}),
        ]
    } else {
        Vec::new()
    };
    Ok(page(&call, "envs", items))
}

// ---------------------------------------------------------------------------------------
// Apps and app codes.

pub(crate) fn app_json(state: &State, app: &AppRec) -> Value {
    json!({
        "id": app.id,
        "name": app.name,
        "remark": app.remark,
        "app_key": app.app_key,
        "app_secret": app.app_secret,
        "creator": app.creator,
        "status": 1,
        "app_type": "apig",
        "register_time": app.register_time,
        "update_time": app.update_time,
        "bind_num": state.auths.values().filter(|a| a.app_id == app.id).count(),
    })
}

fn random_chars(n: usize, alphabet: &[u8]) -> String {
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| alphabet[rng.gen_range(0..alphabet.len())] as char)
        .collect()
}

const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// A new AppKey / AppSecret: 32 hex digits, like Huawei's.
pub(crate) fn new_credential() -> String {
    new_id()
}

/// A new app code of [`GENERATED_APP_CODE_CHARS`] letters and digits.
pub(crate) fn new_app_code() -> String {
    random_chars(GENERATED_APP_CODE_CHARS, ALNUM)
}

fn app_key_taken(state: &State, key: &str, except: Option<&str>) -> bool {
    state
        .apps
        .values()
        .any(|a| a.app_key == key && Some(a.id.as_str()) != except)
}

/// An `AppCreate` body checked, its key and name unique (but for the app `except`).
fn app_fields(
    state: &State,
    body: AppBody,
    project: &str,
    except: Option<&str>,
) -> Result<AppFields, ControlError> {
    let AppFields {
        name,
        remark,
        key,
        secret,
    } = body.validate()?;
    if let Some(key) = &key {
        if app_key_taken(state, key, except) {
            return Err(ControlError::AppKeyExists(key.clone()));
        }
    }
    if state
        .apps
        .values()
        .any(|a| a.project_id == project && a.name == name && Some(a.id.as_str()) != except)
    {
        return Err(ControlError::AppNameExists(name));
    }
    Ok(AppFields {
        name,
        remark,
        key,
        secret,
    })
}

pub async fn create_app(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (domain, project) = call.tenant_scope(&cp)?;
    let body = call.body()?;
    let mut state = cp.state().await?;
    let AppFields {
        name,
        remark,
        key,
        secret,
    } = app_fields(&state, body, &project, None)?;
    let mut key = key.unwrap_or_else(new_credential);
    while app_key_taken(&state, &key, None) {
        key = new_credential();
    }
    let now = now_rfc3339();
    let app = AppRec {
        id: new_id(),
        name,
        remark,
        app_key: key,
        app_secret: secret.unwrap_or_else(new_credential),
        domain_id: domain,
        project_id: project,
        creator: "USER".into(),
        codes: Vec::new(),
        register_time: now.clone(),
        update_time: now,
    };
    let out = app_json(&state, &app);
    cp.commit(&mut state, vec![Change::App(app)]).await?;
    Ok(reply(StatusCode::CREATED, out))
}

pub async fn list_apps(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let state = cp.state().await?;
    let items = state
        .apps
        .values()
        .filter(|a| a.project_id == project)
        .filter(|a| {
            exact(&call, "id", &a.id)
                && matches(&call, "name", &a.name)
                && exact(&call, "app_key", &a.app_key)
                && exact(&call, "creator", &a.creator)
                && exact(&call, "status", "1")
        })
        .map(|a| app_json(&state, a))
        .collect();
    Ok(page(&call, "apps", items))
}

pub async fn show_app(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let state = cp.state().await?;
    let app = own_app(&state, call.param("app_id"), &project)?;
    Ok(reply(StatusCode::OK, app_json(&state, app)))
}

pub async fn check_app(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    call.tenant_scope(&cp)?;
    let state = cp.state().await?;
    let id = call.param("app_id");
    let app = state
        .apps
        .get(id)
        .ok_or_else(|| ControlError::AppNotFound(id.to_owned()))?;
    Ok(reply(
        StatusCode::OK,
        json!({"id": app.id, "name": app.name, "remark": app.remark}),
    ))
}

pub async fn update_app(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let body = call.body()?;
    let mut state = cp.state().await?;
    let mut app = own_app(&state, call.param("app_id"), &project)?.clone();
    let AppFields {
        name,
        remark,
        key,
        secret,
    } = app_fields(&state, body, &project, Some(&app.id))?;
    app.name = name;
    app.remark = remark;
    if let Some(key) = key {
        app.app_key = key;
    }
    if let Some(secret) = secret {
        app.app_secret = secret;
    }
    app.update_time = now_rfc3339();
    let out = app_json(&state, &app);
    cp.commit(&mut state, vec![Change::App(app)]).await?;
    Ok(reply(StatusCode::OK, out))
}

pub async fn delete_app(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let mut state = cp.state().await?;
    let app = own_app(&state, call.param("app_id"), &project)?;
    if app.creator == "MARKET" {
        return Err(ControlError::Forbidden(format!(
            "the app {} belongs to a purchase; unsubscribe it instead",
            app.id
        )));
    }
    let id = app.id.clone();
    let mut changes: Vec<Change> = state
        .auths
        .values()
        .filter(|a| a.app_id == id)
        .map(|a| Change::DeleteAuth(a.id.clone()))
        .collect();
    changes.push(Change::DeleteApp(id));
    cp.commit(&mut state, changes).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub async fn reset_secret(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let secret = call.body::<SecretBody>()?.validate()?;
    let mut state = cp.state().await?;
    let mut app = own_app(&state, call.param("app_id"), &project)?.clone();
    app.app_secret = secret.unwrap_or_else(new_credential);
    app.update_time = now_rfc3339();
    let out = app_json(&state, &app);
    cp.commit(&mut state, vec![Change::App(app)]).await?;
    Ok(reply(StatusCode::OK, out))
}

fn app_code_json(app: &AppRec, code: &AppCodeRec) -> Value {
    json!({"id": code.id, "app_id": app.id, "app_code": code.app_code, "create_time": code.create_time})
}

fn code_taken(state: &State, code: &str) -> bool {
    state
        .apps
        .values()
        .any(|a| a.codes.iter().any(|c| c.app_code == code))
}

async fn add_app_code(cp: &ControlPlane, call: &Call, given: Option<String>) -> Handler {
    let (_, project) = call.tenant_scope(cp)?;
    let mut state = cp.state().await?;
    let mut app = own_app(&state, call.param("app_id"), &project)?.clone();
    if app.codes.len() >= MAX_APP_CODES {
        return Err(ControlError::TooManyAppCodes(app.id));
    }
    let code = match given {
        Some(code) => {
            if code_taken(&state, &code) {
                return Err(ControlError::AppCodeExists);
            }
            code
        }
        None => {
            let mut code = new_app_code();
            while code_taken(&state, &code) {
                code = new_app_code();
            }
            code
        }
    };
    let rec = AppCodeRec {
        id: new_id(),
        app_code: code,
        create_time: now_rfc3339(),
    };
    let out = app_code_json(&app, &rec);
    app.codes.push(rec);
    cp.commit(&mut state, vec![Change::App(app)]).await?;
    Ok(reply(StatusCode::CREATED, out))
}

pub async fn create_app_code(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let code = call.body::<AppCodeBody>()?.validate()?;
    add_app_code(&cp, &call, Some(code)).await
}

pub async fn generate_app_code(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    add_app_code(&cp, &call, None).await
}

pub async fn list_app_codes(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let state = cp.state().await?;
    let app = own_app(&state, call.param("app_id"), &project)?;
    let items = app.codes.iter().map(|c| app_code_json(app, c)).collect();
    Ok(page(&call, "app_codes", items))
}

pub async fn show_app_code(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let state = cp.state().await?;
    let app = own_app(&state, call.param("app_id"), &project)?;
    let id = call.param("app_code_id");
    let code = app
        .codes
        .iter()
        .find(|c| c.id == id)
        .ok_or_else(|| ControlError::AppCodeNotFound(id.to_owned()))?;
    Ok(reply(StatusCode::OK, app_code_json(app, code)))
}

pub async fn delete_app_code(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let mut state = cp.state().await?;
    let mut app = own_app(&state, call.param("app_id"), &project)?.clone();
    let id = call.param("app_code_id");
    let before = app.codes.len();
    app.codes.retain(|c| c.id != id);
    if app.codes.len() == before {
        return Err(ControlError::AppCodeNotFound(id.to_owned()));
    }
    cp.commit(&mut state, vec![Change::App(app)]).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---------------------------------------------------------------------------------------
// App authorizations.

fn auth_relation_json(state: &State, auth: &AuthRec) -> Value {
    json!({
        "id": auth.id,
        "api_id": auth.api_id,
        "app_id": auth.app_id,
        "auth_result": {
            "status": "SUCCESS",
            "api_name": state.apis.get(&auth.api_id).map(|a| a.def.name.clone()),
            "app_name": state.apps.get(&auth.app_id).map(|a| a.name.clone()),
        },
        "auth_time": auth.auth_time,
        "auth_role": "PROVIDER",
        "auth_tunnel": "NORMAL",
    })
}

pub async fn create_auths(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let AuthsBody {
        env_id,
        app_ids,
        api_ids,
    } = call.body::<super::app_auths::AuthsRequest>()?.validate()?;
    check_env(&env_id)?;
    let mut state = cp.state().await?;
    for app in &app_ids {
        own_app(&state, app, &project)?;
    }
    for api in &api_ids {
        own_api(&state, api, &project)?;
    }
    let mut created = Vec::new();
    for app in &app_ids {
        for api in &api_ids {
            let exists = state
                .auths
                .values()
                .any(|a| &a.app_id == app && &a.api_id == api)
                || created
                    .iter()
                    .any(|a: &AuthRec| &a.app_id == app && &a.api_id == api);
            if exists {
                return Err(ControlError::AuthExists {
                    app: app.clone(),
                    api: api.clone(),
                });
            }
            created.push(AuthRec {
                id: new_id(),
                app_id: app.clone(),
                api_id: api.clone(),
                env_id: env_id.clone(),
                auth_time: now_rfc3339(),
            });
        }
    }
    let changes = created.iter().cloned().map(Change::Auth).collect();
    cp.commit(&mut state, changes).await?;
    let auths: Vec<Value> = created
        .iter()
        .map(|a| auth_relation_json(&state, a))
        .collect();
    Ok(reply(StatusCode::CREATED, json!({"auths": auths})))
}

pub async fn list_auths(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let state = cp.state().await?;
    let items = state
        .auths
        .values()
        .filter_map(|auth| {
            let app = state.apps.get(&auth.app_id)?;
            let api = state.apis.get(&auth.api_id)?;
            let group = state.groups.get(&api.group_id)?;
            (group.project_id == project).then_some((auth, app, api, group))
        })
        .filter(|(auth, app, api, _)| {
            exact(&call, "api_id", &api.id)
                && exact(&call, "app_id", &app.id)
                && exact(&call, "env_id", &auth.env_id)
                && matches(&call, "app_name", &app.name)
        })
        .map(|(auth, app, api, group)| {
            json!({
                "id": auth.id,
                "api_id": api.id, "api_name": api.def.name, "api_type": api.def.api_type,
                "api_remark": api.def.remark, "group_id": group.id, "group_name": group.name,
                "publish_id": api.release.as_ref().map(|p| p.publish_id.clone()),
                "env_id": auth.env_id, "env_name": RELEASE_ENV_NAME,
                "app_id": app.id, "app_name": app.name, "app_remark": app.remark,
                "app_type": "apig", "app_creator": app.creator,
                "auth_role": "PROVIDER", "auth_time": auth.auth_time, "auth_tunnel": "NORMAL",
            })
        })
        .collect();
    Ok(page(&call, "auths", items))
}

pub async fn delete_auth(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let mut state = cp.state().await?;
    let id = call.param("app_auth_id");
    let owned = state.auths.get(id).is_some_and(|a| {
        state
            .apps
            .get(&a.app_id)
            .is_some_and(|app| app.project_id == project)
    });
    if !owned {
        return Err(ControlError::AuthNotFound(id.to_owned()));
    }
    cp.commit(&mut state, vec![Change::DeleteAuth(id.to_owned())])
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn req_uri_refusals_state_the_grammar_and_what_broke_it() {
        assert_eq!(
            req_uri_params("req_uri", "/users/{id}/files/{path+}").unwrap(),
            vec!["id".to_owned(), "path".to_owned()]
        );
        let m = req_uri_params("req_uri", "/a/{1x}")
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("parameterName:req_uri")
                && m.contains(crate::template::REQ_URI_RULE)
                && m.contains("starting with a letter)"),
            "{m}"
        );
        assert!(new_sl_domain("Inst_1").ends_with(".apic.inst-1.marketgate.local"));
    }

    #[test]
    fn names_and_codes() {
        assert!(GROUP_NAME.allows("market_group01"));
        assert!(GROUP_NAME.allows("市场分组"));
        assert!(!GROUP_NAME.allows("ab"));
        assert!(!GROUP_NAME.allows("_abc"));
        assert!(rule::APP_NAME.allows("app_01"));
        assert!(!rule::APP_NAME.allows("1app"));
    }
}
