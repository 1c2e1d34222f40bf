//! Bindings of request throttling policies to published APIs (Huawei APIG v2
//! `…/throttle-bindings`): bind by `publish_ids`, unbind one or a batch, and list the APIs
//! bound to a policy, those not bound to it, and the policies bound to an API — Huawei's
//! fields and envelopes, so that the SDK's binding operations work.
//!
//! An API is bound to at most one policy per environment (the store's claim
//! `throttle_binding`). Must not touch the policies themselves (`throttles`).

use axum::extract::State as AxState;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Call;
use super::error::ControlError;
use super::management::{exact, matches, own_api, page, reply};
use super::rule::{invalid, required};
use super::state::{
    new_id, now_rfc3339, ApiRec, Change, State, ThrottleBindingRec, ThrottleRec, RELEASE_ENV_ID,
    RELEASE_ENV_NAME,
};
use super::throttles::{base_json, body, own_throttle};
use super::ControlPlane;

type Handler = Result<Response, ControlError>;

/// `ThrottleApiBindingCreate`.
#[derive(Debug, Deserialize)]
pub struct BindBody {
    pub strategy_id: Option<String>,
    pub publish_ids: Option<Vec<String>>,
}

/// `ThrottleBindingBatchDelete`.
#[derive(Debug, Deserialize)]
pub struct BatchUnbindBody {
    pub throttle_bindings: Option<Vec<String>>,
}

/// The caller's own binding `id`: its policy is the caller's.
fn own_binding<'a>(
    state: &'a State,
    id: &str,
    project: &str,
) -> Result<&'a ThrottleBindingRec, ControlError> {
    state
        .throttle_bindings
        .get(id)
        .filter(|b| own_throttle(state, &b.throttle_id, project).is_ok())
        .ok_or_else(|| ControlError::ThrottleBindingNotFound(id.to_owned()))
}

/// `ThrottleApiBinding`.
fn binding_json(b: &ThrottleBindingRec) -> Value {
    json!({
        "id": b.id,
        "publish_id": b.publish_id,
        "scope": 1,
        "strategy_id": b.throttle_id,
        "apply_time": b.apply_time,
    })
}

/// `ApiForThrottle`: a published API, with the binding's fields when it has one.
fn api_json(
    state: &State,
    api: &ApiRec,
    binding: Option<(&ThrottleBindingRec, &ThrottleRec)>,
) -> Value {
    let group = state.groups.get(&api.group_id);
    json!({
        "id": api.id,
        "name": api.def.name,
        "type": api.def.api_type,
        "remark": api.def.remark,
        "auth_type": api.def.auth_type,
        "req_method": api.def.req_method,
        "req_uri": api.def.req_uri,
        "group_id": api.group_id,
        "group_name": group.map(|g| g.name.clone()),
        "publish_id": api.release.as_ref().map(|p| p.publish_id.clone()),
        "run_env_id": RELEASE_ENV_ID,
        "run_env_name": RELEASE_ENV_NAME,
        "throttle_apply_id": binding.map(|(b, _)| b.id.clone()),
        "apply_time": binding.map(|(b, _)| b.apply_time.clone()),
        "throttle_name": binding.map(|(_, t)| t.name.clone()),
        "tags": [],
    })
}

/// The caller's published APIs, filtered by the list query (`env_id`, `group_id`,
/// `api_id`, `api_name`).
fn published_apis<'a>(
    state: &'a State,
    call: &'a Call,
    project: &'a str,
) -> impl Iterator<Item = &'a ApiRec> + 'a {
    state
        .apis
        .values()
        .filter(move |a| a.release.is_some() && own_api(state, &a.id, project).is_ok())
        .filter(move |a| {
            exact(call, "env_id", RELEASE_ENV_ID)
                && exact(call, "group_id", &a.group_id)
                && exact(call, "api_id", &a.id)
                && matches(call, "api_name", &a.def.name)
        })
}

/// `throttle_id` from the query: required.
fn queried_throttle<'a>(
    state: &'a State,
    call: &Call,
    project: &str,
) -> Result<&'a ThrottleRec, ControlError> {
    let id = call
        .query
        .get("throttle_id")
        .filter(|id| !id.is_empty())
        .ok_or_else(|| required("throttle_id"))?;
    own_throttle(state, id, project)
}

pub async fn bind(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let request = body::<BindBody>(&call)?;
    let strategy = request
        .strategy_id
        .filter(|s| !s.is_empty())
        .ok_or_else(|| required("strategy_id"))?;
    let publish_ids = request
        .publish_ids
        .filter(|ids| !ids.is_empty())
        .ok_or_else(|| invalid("publish_ids", "must name at least one publication"))?;
    let mut state = cp.state().await?;
    let throttle = own_throttle(&state, &strategy, &project)?.id.clone();
    let mut created: Vec<ThrottleBindingRec> = Vec::with_capacity(publish_ids.len());
    for publish_id in &publish_ids {
        let api = state
            .apis
            .values()
            .find(|a| {
                a.release
                    .as_ref()
                    .is_some_and(|p| &p.publish_id == publish_id)
                    && own_api(&state, &a.id, &project).is_ok()
            })
            .ok_or_else(|| ControlError::PublicationNotFound(publish_id.clone()))?;
        let taken = state
            .throttle_bindings
            .values()
            .chain(created.iter())
            .any(|b| b.api_id == api.id && b.env_id == RELEASE_ENV_ID);
        if taken {
            return Err(ControlError::ThrottleAlreadyBound(api.id.clone()));
        }
        created.push(ThrottleBindingRec {
            id: new_id(),
            throttle_id: throttle.clone(),
            api_id: api.id.clone(),
            publish_id: publish_id.clone(),
            env_id: RELEASE_ENV_ID.to_owned(),
            apply_time: now_rfc3339(),
        });
    }
    let applys: Vec<Value> = created.iter().map(binding_json).collect();
    let changes = created.into_iter().map(Change::ThrottleBinding).collect();
    cp.commit(&mut state, changes).await?;
    Ok(reply(
        StatusCode::CREATED,
        json!({ "throttle_applys": applys }),
    ))
}

pub async fn unbind(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let mut state = cp.state().await?;
    let id = own_binding(&state, call.param("throttle_binding_id"), &project)?
        .id
        .clone();
    cp.commit(&mut state, vec![Change::DeleteThrottleBinding(id)])
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `PUT …/throttle-bindings?action=delete`: unbinds each record named; those that cannot be
/// are listed in `failure` with their error, the rest unbound in one commit.
pub async fn unbind_batch(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    if call.query.get("action").map(String::as_str) != Some("delete") {
        return Err(invalid("action", "must be delete"));
    }
    let ids = body::<BatchUnbindBody>(&call)?
        .throttle_bindings
        .unwrap_or_default();
    let mut state = cp.state().await?;
    let mut failure = Vec::new();
    let mut changes = Vec::new();
    for id in &ids {
        match own_binding(&state, id, &project) {
            Ok(binding) => changes.push(Change::DeleteThrottleBinding(binding.id.clone())),
            Err(error) => {
                let (_, code) = error.status_and_code();
                failure.push(json!({
                    "bind_id": id, "error_code": code, "error_msg": error.to_string(),
                }));
            }
        }
    }
    changes.sort_by(|a, b| a.key().1.cmp(b.key().1));
    changes.dedup_by(|a, b| a.key() == b.key());
    let success_count = changes.len();
    if !changes.is_empty() {
        cp.commit(&mut state, changes).await?;
    }
    Ok(reply(
        StatusCode::OK,
        json!({ "success_count": success_count, "failure": failure }),
    ))
}

/// `GET …/throttle-bindings/binded-apis?throttle_id=…`.
pub async fn bound_apis(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let state = cp.state().await?;
    let throttle = queried_throttle(&state, &call, &project)?;
    let items = published_apis(&state, &call, &project)
        .filter_map(|api| {
            let binding = state
                .throttle_bindings
                .values()
                .find(|b| b.api_id == api.id && b.throttle_id == throttle.id)?;
            Some(api_json(&state, api, Some((binding, throttle))))
        })
        .collect();
    Ok(page(&call, "apis", items))
}

/// `GET …/throttle-bindings/unbinded-apis?throttle_id=…`: published APIs not bound to it.
pub async fn unbound_apis(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let state = cp.state().await?;
    let throttle = queried_throttle(&state, &call, &project)?;
    let items = published_apis(&state, &call, &project)
        .filter(|api| {
            !state
                .throttle_bindings
                .values()
                .any(|b| b.api_id == api.id && b.throttle_id == throttle.id)
        })
        .map(|api| api_json(&state, api, None))
        .collect();
    Ok(page(&call, "apis", items))
}

/// `GET …/throttle-bindings/binded-throttles?api_id=…`: `ThrottleForApi`.
pub async fn bound_throttles(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let state = cp.state().await?;
    let api_id = call
        .query
        .get("api_id")
        .filter(|id| !id.is_empty())
        .ok_or_else(|| required("api_id"))?;
    let api = own_api(&state, api_id, &project)?;
    let items = state
        .throttle_bindings
        .values()
        .filter(|b| b.api_id == api.id)
        .filter_map(|b| Some((b, state.throttles.get(&b.throttle_id)?)))
        .filter(|(b, t)| {
            exact(&call, "throttle_id", &t.id)
                && exact(&call, "env_id", &b.env_id)
                && matches(&call, "throttle_name", &t.name)
        })
        .map(|(b, t)| {
            let mut map = base_json(t);
            map.insert("env_name".into(), json!(RELEASE_ENV_NAME));
            map.insert("bind_id".into(), json!(b.id));
            map.insert("bind_time".into(), json!(b.apply_time));
            Value::Object(map)
        })
        .collect();
    Ok(page(&call, "throttles", items))
}
