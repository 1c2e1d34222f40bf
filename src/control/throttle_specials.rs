//! Exceptions to a request throttling policy (Huawei APIG v2
//! `…/throttles/{throttle_id}/throttle-specials`, 特殊流控): an APP's or a tenant's (USER)
//! own `call_limits`, created, listed, updated and deleted with Huawei's fields and
//! envelopes. An APP exception replaces the policy's app limit for that app, a USER one its
//! user limit for that tenant; the API limit still holds.
//!
//! Must not change the policy itself (`throttles`).

use axum::extract::State as AxState;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::snapshot::SpecialKind;

use super::auth::Call;
use super::error::ControlError;
use super::management::{exact, matches, page, reply};
use super::rule::{invalid, one_of, required};
use super::state::{new_id, now_rfc3339, Change, State, ThrottleSpecialRec};
use super::throttles::{body, own_throttle, positive};
use super::ControlPlane;

/// Longest tenant id an exception names.
pub const MAX_OBJECT_ID_CHARS: usize = 64;

type Handler = Result<Response, ControlError>;

/// `ThrottleSpecialCreate`.
#[derive(Debug, Deserialize)]
pub struct SpecialBody {
    pub call_limits: Option<i64>,
    pub object_id: Option<String>,
    pub object_type: Option<String>,
}

/// `ThrottleSpecialUpdate`.
#[derive(Debug, Deserialize)]
pub struct SpecialUpdateBody {
    pub call_limits: Option<i64>,
}

fn call_limits(value: Option<i64>) -> Result<u64, ControlError> {
    positive(
        "call_limits",
        value.ok_or_else(|| required("call_limits"))?,
        "calls",
    )
}

/// `ThrottleSpecialInfo`.
fn special_json(state: &State, s: &ThrottleSpecialRec) -> Value {
    let (object_type, app) = match s.object_type {
        SpecialKind::App => ("APP", state.apps.get(&s.object_id)),
        SpecialKind::User => ("USER", None),
    };
    json!({
        "id": s.id,
        "throttle_id": s.throttle_id,
        "call_limits": s.call_limits,
        "apply_time": s.apply_time,
        "object_id": s.object_id,
        "object_type": object_type,
        "object_name": app.map_or_else(|| s.object_id.clone(), |a| a.name.clone()),
        "app_id": app.map(|a| a.id.clone()),
        "app_name": app.map(|a| a.name.clone()),
    })
}

fn own_special<'a>(
    state: &'a State,
    throttle_id: &str,
    id: &str,
) -> Result<&'a ThrottleSpecialRec, ControlError> {
    state
        .throttle_specials
        .get(id)
        .filter(|s| s.throttle_id == throttle_id)
        .ok_or_else(|| ControlError::ThrottleSpecialNotFound(id.to_owned()))
}

pub async fn create(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let request = body::<SpecialBody>(&call)?;
    let limits = call_limits(request.call_limits)?;
    let object_type = match one_of(
        "object_type",
        request.object_type.as_deref().unwrap_or_default(),
        &["APP", "USER"],
    )? {
        "APP" => SpecialKind::App,
        _ => SpecialKind::User,
    };
    let object_id = request
        .object_id
        .filter(|id| !id.is_empty())
        .ok_or_else(|| required("object_id"))?;
    let count = object_id.chars().count();
    if count > MAX_OBJECT_ID_CHARS {
        return Err(invalid(
            "object_id",
            format!("must be at most {MAX_OBJECT_ID_CHARS} characters (got {count})"),
        ));
    }
    let mut state = cp.state().await?;
    let throttle = own_throttle(&state, call.param("throttle_id"), &project)?
        .id
        .clone();
    // An APP exception names an existing app: the seller's own, or a buyer's MARKET app.
    if object_type == SpecialKind::App && !state.apps.contains_key(&object_id) {
        return Err(ControlError::AppNotFound(object_id));
    }
    if state
        .throttle_specials
        .values()
        .any(|s| s.throttle_id == throttle && s.object_id == object_id)
    {
        return Err(ControlError::ThrottleSpecialExists(object_id));
    }
    let special = ThrottleSpecialRec {
        id: new_id(),
        throttle_id: throttle,
        object_type,
        object_id,
        call_limits: limits,
        apply_time: now_rfc3339(),
    };
    let out = special_json(&state, &special);
    cp.commit(&mut state, vec![Change::ThrottleSpecial(special)])
        .await?;
    Ok(reply(StatusCode::CREATED, out))
}

pub async fn list(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let state = cp.state().await?;
    let throttle = own_throttle(&state, call.param("throttle_id"), &project)?;
    let items = state
        .throttle_specials
        .values()
        .filter(|s| s.throttle_id == throttle.id)
        .filter(|s| {
            let json = special_json(&state, s);
            exact(
                &call,
                "object_type",
                json["object_type"].as_str().unwrap_or(""),
            ) && matches(&call, "app_name", json["app_name"].as_str().unwrap_or(""))
                && (s.object_type == SpecialKind::App || matches(&call, "user", &s.object_id))
        })
        .map(|s| special_json(&state, s))
        .collect();
    Ok(page(&call, "throttle_specials", items))
}

pub async fn update(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let limits = call_limits(body::<SpecialUpdateBody>(&call)?.call_limits)?;
    let mut state = cp.state().await?;
    let throttle = own_throttle(&state, call.param("throttle_id"), &project)?
        .id
        .clone();
    let mut special = own_special(&state, &throttle, call.param("strategy_id"))?.clone();
    special.call_limits = limits;
    let out = special_json(&state, &special);
    cp.commit(&mut state, vec![Change::ThrottleSpecial(special)])
        .await?;
    Ok(reply(StatusCode::OK, out))
}

pub async fn delete(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let mut state = cp.state().await?;
    let throttle = own_throttle(&state, call.param("throttle_id"), &project)?
        .id
        .clone();
    let id = own_special(&state, &throttle, call.param("strategy_id"))?
        .id
        .clone();
    cp.commit(&mut state, vec![Change::DeleteThrottleSpecial(id)])
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
