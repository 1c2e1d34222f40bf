//! Request throttling policies (Huawei APIG v2 `…/throttles`, 流控策略): create, list, show,
//! update, delete, with Huawei's fields, validation and envelopes, so that the SDK's
//! `*_request_throttling_policy_v2` operations work. Also what the data plane's snapshot
//! carries of throttling ([`snapshot_section`]).
//!
//! Bindings to APIs are `throttle_bindings`, per-APP and per-tenant exceptions
//! `throttle_specials`. Must not enforce anything: the data plane counts calls
//! (`gateway::throttle`) and the control plane grants allotments (`throttle_allotments`).

use std::collections::BTreeSet;

use axum::extract::State as AxState;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::snapshot::{self, SpecialKind, TimeUnit};

use super::auth::Call;
use super::error::ControlError;
use super::management::{exact, matches, page, reply, MAX_REMARK_CHARS};
use super::rule::{int_range, invalid, one_of, one_of_int, required, APP_NAME};
use super::state::{new_id, now_rfc3339, Change, State, ThrottleRec};
use super::ControlPlane;

/// Huawei's largest limit and interval.
pub const MAX_THROTTLE_VALUE: i64 = 2_147_483_647;

type Handler = Result<Response, ControlError>;

/// A request body as the typed struct `T` ([`Call::body`]).
pub(super) fn body<T: DeserializeOwned>(call: &Call) -> Result<T, ControlError> {
    call.body()
}

/// A limit or interval present: 1 to 2,147,483,647 (`unit` says what it counts).
pub(super) fn positive(field: &str, value: i64, unit: &str) -> Result<u64, ControlError> {
    int_range(field, Some(value), 1, MAX_THROTTLE_VALUE, unit).map(|v| v as u64)
}

/// The body of create and update (`ThrottleBaseInfo`).
#[derive(Debug, Deserialize)]
pub struct ThrottleBody {
    pub name: Option<String>,
    pub api_call_limits: Option<i64>,
    pub user_call_limits: Option<i64>,
    pub app_call_limits: Option<i64>,
    pub ip_call_limits: Option<i64>,
    pub time_interval: Option<i64>,
    pub time_unit: Option<String>,
    pub remark: Option<String>,
    #[serde(rename = "type")]
    pub throttle_type: Option<i64>,
    pub enable_adaptive_control: Option<String>,
}

/// The policy's validated fields.
struct Fields {
    name: String,
    remark: String,
    api: u64,
    user: Option<u64>,
    app: Option<u64>,
    ip: Option<u64>,
    interval: u64,
    unit: TimeUnit,
    throttle_type: u8,
    adaptive: String,
}

impl ThrottleBody {
    /// Huawei's rules: a name of 3–64 letters, digits, `_` (or CJK) starting with a letter;
    /// api and interval required; user ≤ api, app ≤ user (or api when no user limit),
    /// ip ≤ api; a known unit; type 1 or 2.
    fn validate(self) -> Result<Fields, ControlError> {
        let name = self
            .name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| required("name"))?;
        APP_NAME.check("name", &name)?;
        let remark = self.remark.unwrap_or_default();
        let count = remark.chars().count();
        if count > MAX_REMARK_CHARS {
            return Err(invalid(
                "remark",
                format!("must be at most {MAX_REMARK_CHARS} characters (got {count})"),
            ));
        }
        let api = positive(
            "api_call_limits",
            self.api_call_limits
                .ok_or_else(|| required("api_call_limits"))?,
            "calls",
        )?;
        let optional =
            |field, value: Option<i64>| value.map(|v| positive(field, v, "calls")).transpose();
        let user = optional("user_call_limits", self.user_call_limits)?;
        let app = optional("app_call_limits", self.app_call_limits)?;
        let ip = optional("ip_call_limits", self.ip_call_limits)?;
        let at_most = |field: &str, value: Option<u64>, other: &str, most: u64| match value {
            Some(v) if v > most => Err(invalid(
                field,
                format!("must not exceed {other} ({most}; got {v})"),
            )),
            _ => Ok(()),
        };
        at_most("user_call_limits", user, "api_call_limits", api)?;
        match user {
            Some(u) => at_most("app_call_limits", app, "user_call_limits", u)?,
            None => at_most("app_call_limits", app, "api_call_limits", api)?,
        }
        at_most("ip_call_limits", ip, "api_call_limits", api)?;
        let interval = positive(
            "time_interval",
            self.time_interval
                .ok_or_else(|| required("time_interval"))?,
            "time units",
        )?;
        let unit = match one_of(
            "time_unit",
            self.time_unit.as_deref().unwrap_or_default(),
            &["SECOND", "MINUTE", "HOUR", "DAY"],
        )? {
            "SECOND" => TimeUnit::Second,
            "MINUTE" => TimeUnit::Minute,
            "HOUR" => TimeUnit::Hour,
            _ => TimeUnit::Day,
        };
        let throttle_type = one_of_int(
            "type",
            Some(self.throttle_type.unwrap_or(1)),
            &[(1, "exclusive"), (2, "shared")],
        )? as u8;
        let adaptive = one_of(
            "enable_adaptive_control",
            self.enable_adaptive_control.as_deref().unwrap_or("FALSE"),
            &["TRUE", "FALSE"],
        )?;
        Ok(Fields {
            name,
            remark,
            api,
            user,
            app,
            ip,
            interval,
            unit,
            throttle_type,
            adaptive: adaptive.to_owned(),
        })
    }
}

/// The caller's own policy `id` (another project's reads as absent).
pub(super) fn own_throttle<'a>(
    state: &'a State,
    id: &str,
    project: &str,
) -> Result<&'a ThrottleRec, ControlError> {
    state
        .throttles
        .get(id)
        .filter(|t| t.project_id == project)
        .ok_or_else(|| ControlError::ThrottleNotFound(id.to_owned()))
}

/// The policy fields every answer shares (`ThrottleBaseInfo` with id and create time).
pub(super) fn base_json(t: &ThrottleRec) -> serde_json::Map<String, Value> {
    let value = json!({
        "id": t.id,
        "name": t.name,
        "remark": t.remark,
        "api_call_limits": t.api_call_limits,
        "user_call_limits": t.user_call_limits,
        "app_call_limits": t.app_call_limits,
        "ip_call_limits": t.ip_call_limits,
        "time_interval": t.time_interval,
        "time_unit": t.time_unit.as_str(),
        "type": t.throttle_type,
        "enable_adaptive_control": t.enable_adaptive_control,
        "create_time": t.create_time,
    });
    match value {
        Value::Object(map) => map,
        _ => unreachable!("a JSON object literal"),
    }
}

/// `ThrottlesInfo`: the policy with its binding count and whether it has exceptions.
fn throttle_json(state: &State, t: &ThrottleRec) -> Value {
    let mut map = base_json(t);
    let bound = state
        .throttle_bindings
        .values()
        .filter(|b| b.throttle_id == t.id)
        .count();
    let special = state
        .throttle_specials
        .values()
        .any(|s| s.throttle_id == t.id);
    map.insert("bind_num".into(), json!(bound));
    map.insert(
        "is_inclu_special_throttle".into(),
        json!(if special { 1 } else { 2 }),
    );
    Value::Object(map)
}

fn name_taken(state: &State, project: &str, name: &str, except: Option<&str>) -> bool {
    state
        .throttles
        .values()
        .any(|t| t.project_id == project && t.name == name && Some(t.id.as_str()) != except)
}

pub async fn create(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (domain, project) = call.tenant_scope(&cp)?;
    let fields = body::<ThrottleBody>(&call)?.validate()?;
    let mut state = cp.state().await?;
    if name_taken(&state, &project, &fields.name, None) {
        return Err(ControlError::ThrottleNameExists(fields.name));
    }
    let throttle = ThrottleRec {
        id: new_id(),
        name: fields.name,
        remark: fields.remark,
        domain_id: domain,
        project_id: project,
        api_call_limits: fields.api,
        user_call_limits: fields.user,
        app_call_limits: fields.app,
        ip_call_limits: fields.ip,
        time_interval: fields.interval,
        time_unit: fields.unit,
        throttle_type: fields.throttle_type,
        enable_adaptive_control: fields.adaptive,
        create_time: now_rfc3339(),
    };
    let out = throttle_json(&state, &throttle);
    cp.commit(&mut state, vec![Change::Throttle(throttle)])
        .await?;
    Ok(reply(StatusCode::CREATED, out))
}

pub async fn list(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let state = cp.state().await?;
    let items = state
        .throttles
        .values()
        .filter(|t| t.project_id == project)
        .filter(|t| exact(&call, "id", &t.id) && matches(&call, "name", &t.name))
        .map(|t| throttle_json(&state, t))
        .collect();
    Ok(page(&call, "throttles", items))
}

pub async fn show(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let state = cp.state().await?;
    let throttle = own_throttle(&state, call.param("throttle_id"), &project)?;
    Ok(reply(StatusCode::OK, throttle_json(&state, throttle)))
}

pub async fn update(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let fields = body::<ThrottleBody>(&call)?.validate()?;
    let mut state = cp.state().await?;
    let mut throttle = own_throttle(&state, call.param("throttle_id"), &project)?.clone();
    if name_taken(&state, &project, &fields.name, Some(&throttle.id)) {
        return Err(ControlError::ThrottleNameExists(fields.name));
    }
    throttle.name = fields.name;
    throttle.remark = fields.remark;
    throttle.api_call_limits = fields.api;
    throttle.user_call_limits = fields.user;
    throttle.app_call_limits = fields.app;
    throttle.ip_call_limits = fields.ip;
    throttle.time_interval = fields.interval;
    throttle.time_unit = fields.unit;
    throttle.throttle_type = fields.throttle_type;
    throttle.enable_adaptive_control = fields.adaptive;
    let out = throttle_json(&state, &throttle);
    cp.commit(&mut state, vec![Change::Throttle(throttle)])
        .await?;
    Ok(reply(StatusCode::OK, out))
}

/// Deletes the policy with its bindings and exceptions, in one commit (Huawei unbinds a
/// deleted policy from its APIs).
pub async fn delete(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    let (_, project) = call.tenant_scope(&cp)?;
    let mut state = cp.state().await?;
    let id = own_throttle(&state, call.param("throttle_id"), &project)?
        .id
        .clone();
    let mut changes: Vec<Change> = state
        .throttle_bindings
        .values()
        .filter(|b| b.throttle_id == id)
        .map(|b| Change::DeleteThrottleBinding(b.id.clone()))
        .collect();
    changes.extend(
        state
            .throttle_specials
            .values()
            .filter(|s| s.throttle_id == id)
            .map(|s| Change::DeleteThrottleSpecial(s.id.clone())),
    );
    changes.push(Change::DeleteThrottle(id));
    cp.commit(&mut state, changes).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// What a snapshot carries of throttling: each policy with the published APIs it is bound
/// to and its exceptions for apps the snapshot holds, and the tenant of each app in `apps`
/// (a MARKET app's buyer domain, a USER app's owner domain), only when some policy exists.
pub fn snapshot_section(state: &State, apps: &[snapshot::App]) -> snapshot::Throttling {
    if state.throttles.is_empty() {
        return snapshot::Throttling::default();
    }
    let in_snapshot: BTreeSet<&str> = apps.iter().map(|a| a.id.as_str()).collect();
    let published = |api_id: &str| {
        state
            .apis
            .get(api_id)
            .is_some_and(|a| a.release.is_some() && state.groups.contains_key(&a.group_id))
    };
    let policies = state
        .throttles
        .values()
        .map(|t| snapshot::ThrottlePolicy {
            id: t.id.clone(),
            name: t.name.clone(),
            api_call_limits: t.api_call_limits,
            user_call_limits: t.user_call_limits,
            app_call_limits: t.app_call_limits,
            ip_call_limits: t.ip_call_limits,
            time_interval: t.time_interval,
            time_unit: t.time_unit,
            shared: t.throttle_type == 2,
            api_ids: state
                .throttle_bindings
                .values()
                .filter(|b| b.throttle_id == t.id && published(&b.api_id))
                .map(|b| b.api_id.clone())
                .collect(),
            specials: state
                .throttle_specials
                .values()
                .filter(|s| s.throttle_id == t.id)
                .filter(|s| {
                    s.object_type == SpecialKind::User || in_snapshot.contains(s.object_id.as_str())
                })
                .map(|s| snapshot::ThrottleSpecial {
                    object_type: s.object_type,
                    object_id: s.object_id.clone(),
                    call_limits: s.call_limits,
                })
                .collect(),
        })
        .collect();
    let buyers: std::collections::BTreeMap<&str, &str> = state
        .purchases
        .values()
        .filter_map(|p| Some((p.app_id.as_deref()?, p.domain_id.as_str())))
        .collect();
    let app_users = apps
        .iter()
        .filter_map(|a| {
            let user = buyers
                .get(a.id.as_str())
                .copied()
                .or_else(|| state.apps.get(&a.id).map(|rec| rec.domain_id.as_str()))?;
            Some(snapshot::AppUser {
                app_id: a.id.clone(),
                user: user.to_owned(),
            })
        })
        .collect();
    snapshot::Throttling {
        policies,
        app_users,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(api: i64, user: Option<i64>, app: Option<i64>, ip: Option<i64>) -> ThrottleBody {
        ThrottleBody {
            name: Some("policy_1".into()),
            api_call_limits: Some(api),
            user_call_limits: user,
            app_call_limits: app,
            ip_call_limits: ip,
            time_interval: Some(1),
            time_unit: Some("SECOND".into()),
            remark: None,
            throttle_type: None,
            enable_adaptive_control: None,
        }
    }

    fn refused_field(body: ThrottleBody) -> String {
        match body.validate() {
            Err(ControlError::InvalidParameter { field, .. }) => field,
            other => panic!("expected a refusal, got {:?}", other.map(|f| f.api)),
        }
    }

    #[test]
    fn huawei_orders_the_limits_user_under_api_app_under_user_ip_under_api() {
        assert!(limits(10, Some(10), Some(10), Some(10)).validate().is_ok());
        assert!(limits(10, None, Some(10), None).validate().is_ok());
        assert_eq!(
            refused_field(limits(10, Some(11), None, None)),
            "user_call_limits"
        );
        assert_eq!(
            refused_field(limits(10, Some(5), Some(6), None)),
            "app_call_limits"
        );
        assert_eq!(
            refused_field(limits(10, None, Some(11), None)),
            "app_call_limits"
        );
        assert_eq!(
            refused_field(limits(10, None, None, Some(11))),
            "ip_call_limits"
        );
        assert_eq!(
            refused_field(limits(0, None, None, None)),
            "api_call_limits"
        );
        assert_eq!(
            refused_field(limits(MAX_THROTTLE_VALUE + 1, None, None, None)),
            "api_call_limits"
        );
        let mut bad_unit = limits(10, None, None, None);
        bad_unit.time_unit = Some("WEEK".into());
        assert_eq!(refused_field(bad_unit), "time_unit");
        let mut bad_type = limits(10, None, None, None);
        bad_type.throttle_type = Some(3);
        assert_eq!(refused_field(bad_type), "type");
        let mut bad_name = limits(10, None, None, None);
        bad_name.name = Some("1x".into());
        assert_eq!(refused_field(bad_name), "name");
    }
}
