//! App authorizations' request body (`AppAuthCreate`), typed and checked: an environment and
//! two non-empty lists of ids. Whether the apps and APIs are the caller's, and the pairs not
//! yet authorized, is the handler's (`management`), which reads the state.

use serde::Deserialize;

use super::error::ControlError;
use super::rule::{self, Lenient};

/// The body of app authorization create; unknown fields are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct AuthsRequest {
    pub env_id: Option<String>,
    /// A list of anything but strings breaks the rule (400 `APIG.2012`), as an absent one.
    pub app_ids: Option<Lenient<Vec<String>>>,
    pub api_ids: Option<Lenient<Vec<String>>>,
}

/// An authorization request, checked: every app of `app_ids` for every API of `api_ids`.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthsBody {
    pub env_id: String,
    pub app_ids: Vec<String>,
    pub api_ids: Vec<String>,
}

fn ids(field: &str, value: Option<Lenient<Vec<String>>>) -> Result<Vec<String>, ControlError> {
    match value {
        Some(Lenient::Valid(ids)) if !ids.is_empty() => Ok(ids),
        _ => Err(rule::invalid(
            field,
            "must be a non-empty list of ids (strings)",
        )),
    }
}

impl AuthsRequest {
    pub fn validate(self) -> Result<AuthsBody, ControlError> {
        let env_id = rule::required_text("env_id", self.env_id)?;
        Ok(AuthsBody {
            env_id,
            app_ids: ids("app_ids", self.app_ids)?,
            api_ids: ids("api_ids", self.api_ids)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_lists_must_be_non_empty_lists_of_strings() {
        let read = |json: &str| {
            serde_json::from_str::<AuthsRequest>(json)
                .unwrap()
                .validate()
        };
        let ok = read(r#"{"env_id":"e","app_ids":["a"],"api_ids":["b","c"]}"#).unwrap();
        assert_eq!(ok.api_ids, vec!["b".to_owned(), "c".to_owned()]);
        for bad in [
            r#"{"env_id":"e","app_ids":[],"api_ids":["b"]}"#,
            r#"{"env_id":"e","app_ids":[1],"api_ids":["b"]}"#,
            r#"{"env_id":"e","app_ids":"a","api_ids":["b"]}"#,
            r#"{"env_id":"e","api_ids":["b"]}"#,
        ] {
            let m = read(bad).unwrap_err().to_string();
            assert!(
                m.contains("parameterName:app_ids. app_ids must be a non-empty list of ids"),
                "{bad}: {m}"
            );
        }
    }
}
