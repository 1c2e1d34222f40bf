//! Publishing's request bodies (`ApiActionInfo` for one API, `ApisPublishReq` for a batch),
//! typed and checked: the action, the RELEASE environment's id, a remark, and the APIs (one,
//! a list, or a group's). Whether the APIs are the caller's and their routes free is the
//! handler's (`management`), which reads the state.

use serde::Deserialize;

use super::error::ControlError;
use super::management::checked_remark;
use super::rule::{self, Lenient};

/// `online` publishes (`true`), `offline` takes offline.
pub fn online(action: &str) -> Result<bool, ControlError> {
    match rule::one_of("action", action, &["online", "offline"])? {
        "online" => Ok(true),
        _ => Ok(false),
    }
}

/// The body of one API's publish or take-offline; unknown fields are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ActionBody {
    pub action: Option<String>,
    pub env_id: Option<String>,
    pub api_id: Option<String>,
    pub remark: Option<String>,
}

/// One API's publish or take-offline, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    pub online: bool,
    pub env_id: String,
    pub api_id: String,
    pub remark: String,
}

impl ActionBody {
    pub fn validate(self) -> Result<Action, ControlError> {
        let online = online(&rule::required_text("action", self.action)?)?;
        let env_id = rule::required_text("env_id", self.env_id)?;
        let api_id = rule::required_text("api_id", self.api_id)?;
        Ok(Action {
            online,
            env_id,
            api_id,
            remark: checked_remark(self.remark)?,
        })
    }
}

/// The body of a batch publish (the action is the query's); unknown fields are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct BatchBody {
    pub env_id: Option<String>,
    pub remark: Option<String>,
    pub apis: Option<Lenient<Vec<String>>>,
    pub group_id: Option<String>,
}

/// Which APIs a batch names.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchApis {
    Ids(Vec<String>),
    /// Every API of the group.
    Group(String),
}

/// A batch publish, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub env_id: String,
    pub remark: String,
    pub apis: BatchApis,
}

impl BatchBody {
    /// A non-empty `apis` list of ids, else `group_id`.
    pub fn validate(self) -> Result<Batch, ControlError> {
        let env_id = rule::required_text("env_id", self.env_id)?;
        let remark = checked_remark(self.remark)?;
        let apis = match (self.apis, self.group_id) {
            (Some(Lenient::Valid(ids)), _) if !ids.is_empty() => BatchApis::Ids(ids),
            (Some(Lenient::Invalid(serde_json::Value::Array(ids))), _) if !ids.is_empty() => {
                return Err(rule::invalid("apis", "must be a list of API ids (strings)"))
            }
            (_, Some(group_id)) => BatchApis::Group(group_id),
            _ => {
                return Err(rule::invalid(
                    "apis",
                    "must be a non-empty list of API ids, or group_id given instead",
                ))
            }
        };
        Ok(Batch {
            env_id,
            remark,
            apis,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(json: &str) -> Result<Batch, ControlError> {
        serde_json::from_str::<BatchBody>(json).unwrap().validate()
    }

    #[test]
    fn a_batch_names_a_list_of_ids_or_a_group() {
        assert_eq!(
            batch(r#"{"env_id":"e","apis":["a"],"group_id":"g"}"#)
                .unwrap()
                .apis,
            BatchApis::Ids(vec!["a".into()])
        );
        assert_eq!(
            batch(r#"{"env_id":"e","apis":[],"group_id":"g"}"#)
                .unwrap()
                .apis,
            BatchApis::Group("g".into())
        );
        let m = batch(r#"{"env_id":"e","apis":["a",1]}"#)
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("apis must be a list of API ids (strings)"),
            "{m}"
        );
        let m = batch(r#"{"env_id":"e"}"#).unwrap_err().to_string();
        assert!(m.contains("or group_id given instead"), "{m}");
        let m = online("publish").unwrap_err().to_string();
        assert!(m.contains("must be one of online, offline"), "{m}");
    }
}
