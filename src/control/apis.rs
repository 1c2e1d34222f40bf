//! APIs' request body (`ApiCreate`, create and update), typed. The rules that need the state
//! (the group is the caller's, name and route free in it) and those that follow one another
//! stay in `management::api_def`, which reads this struct in the order Huawei checks.
//! `backend_api` and `mock_info` are read only for their `backend_type`: a malformed one of
//! the other type is ignored, as before.

use serde::Deserialize;
use serde_json::Value;

use super::error::ControlError;
use super::rule::{self, Lenient};

/// The body of API create and update; unknown fields are ignored (and echoed back, from the
/// body as sent).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ApiBody {
    pub group_id: Option<String>,
    pub name: Option<String>,
    /// A number that is not an integer breaks the rule (`APIG.2012`); a string is a body
    /// error.
    #[serde(rename = "type")]
    pub api_type: Option<serde_json::Number>,
    pub req_protocol: Option<String>,
    pub req_method: Option<String>,
    pub req_uri: Option<String>,
    pub match_mode: Option<String>,
    pub auth_type: Option<String>,
    pub authorizer_id: Option<String>,
    pub auth_opt: Option<AuthOpt>,
    pub backend_type: Option<String>,
    pub remark: Option<String>,
    pub backend_api: Option<Lenient<BackendBody>>,
    pub mock_info: Option<Lenient<MockInfo>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct AuthOpt {
    pub app_code_auth_type: Option<String>,
}

/// `backend_api` of an HTTP API.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct BackendBody {
    pub timeout: Option<serde_json::Number>,
    /// A non-string breaks the host rule (`APIG.2012`), as an absent one.
    pub url_domain: Option<Lenient<String>>,
    pub req_protocol: Option<String>,
    pub req_method: Option<String>,
    pub req_uri: Option<String>,
}

/// `mock_info` of a MOCK API.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct MockInfo {
    pub result_content: Option<String>,
}

/// An integer field sent as a JSON number: a non-integer breaks the rule.
pub fn integer(
    field: &str,
    value: Option<&serde_json::Number>,
) -> Result<Option<i64>, ControlError> {
    value
        .map(|n| {
            n.as_i64()
                .ok_or_else(|| rule::invalid(field, format!("must be an integer (got {n})")))
        })
        .transpose()
}

/// A field kept as sent because it is not a `T`: an object whose fields have the wrong types
/// is a body error naming the field's path (`backend_api.req_uri: invalid type …`), anything
/// else is `not_object`.
pub fn sent_as<T: serde::de::DeserializeOwned>(
    field: &str,
    sent: Value,
    not_object: ControlError,
) -> ControlError {
    if !sent.is_object() {
        return not_object;
    }
    match serde_path_to_error::deserialize::<_, T>(sent) {
        Ok(_) => not_object,
        Err(e) => ControlError::BadJson(format!("{field}.{}: {}", e.path(), e.inner())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_of_wrong_types_names_the_field_and_a_non_object_breaks_the_rule() {
        let body: ApiBody = serde_json::from_str(
            r#"{"type":1.5,"backend_api":{"req_uri":7},"mock_info":"x","extra":[1]}"#,
        )
        .unwrap();
        let m = integer("type", body.api_type.as_ref())
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("parameterName:type. type must be an integer (got 1.5)"),
            "{m}"
        );
        let Some(Lenient::Invalid(sent)) = body.backend_api else {
            panic!("a backend_api of wrong types is kept as sent");
        };
        let m =
            sent_as::<BackendBody>("backend_api", sent, rule::required("backend_api")).to_string();
        assert!(
            m.starts_with("parameter error: backend_api.req_uri: invalid type"),
            "{m}"
        );
        let Some(Lenient::Invalid(sent)) = body.mock_info else {
            panic!("a mock_info that is not an object is kept as sent");
        };
        let m = sent_as::<MockInfo>("mock_info", sent, rule::required("mock_info")).to_string();
        assert!(m.contains("parameterName:mock_info."), "{m}");
        assert!(serde_json::from_str::<ApiBody>(r#"{"type":"1"}"#).is_err());
    }
}
