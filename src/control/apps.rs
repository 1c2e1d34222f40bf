//! Apps' request bodies (`AppCreate`, the secret reset, a given app code), typed and checked
//! by Huawei's rules for names, AppKeys, AppSecrets and app codes. Whether a name, key or
//! code is free is the handler's (`management`), which reads the state.

use serde::Deserialize;

use super::error::ControlError;
use super::management::checked_remark;
use super::rule::{self, Text, APP_NAME};

/// AppKeys: 8–200 of letters, digits, `_` and `-`, starting with a letter or digit.
pub const APP_KEY: Text = Text {
    min: 8,
    max: 200,
    first: |c| c.is_ascii_alphanumeric(),
    chars: |c| c.is_ascii_alphanumeric() || "_-".contains(c),
    says_chars: "letters, digits, _ and -",
    says_first: "a letter or a digit",
};

/// AppSecrets: 8–128 of letters, digits and `_-!@#$%`, starting with a letter or digit.
pub const APP_SECRET: Text = Text {
    min: 8,
    max: 128,
    first: |c| c.is_ascii_alphanumeric(),
    chars: |c| c.is_ascii_alphanumeric() || "_-!@#$%".contains(c),
    says_chars: "letters, digits and _ - ! @ # $ %",
    says_first: "a letter or a digit",
};

/// App codes: 64–180 chars of letters, digits and `+_!@#$%-/=`, starting with a letter,
/// digit, `+` or `/`.
pub const APP_CODE: Text = Text {
    min: 64,
    max: 180,
    first: |c| c.is_ascii_alphanumeric() || "+/".contains(c),
    chars: |c| c.is_ascii_alphanumeric() || "+_!@#$%-/=".contains(c),
    says_chars: "letters, digits and + _ ! @ # $ % - / =",
    says_first: "a letter, a digit, + or /",
};

/// The body of app create and update; unknown fields are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct AppBody {
    pub name: Option<String>,
    pub remark: Option<String>,
    pub app_key: Option<String>,
    pub app_secret: Option<String>,
}

/// An app body, checked. An empty key or secret is none given (one is generated, or the
/// app's kept).
#[derive(Debug, Clone, PartialEq)]
pub struct AppFields {
    pub name: String,
    pub remark: String,
    pub key: Option<String>,
    pub secret: Option<String>,
}

impl AppBody {
    pub fn validate(self) -> Result<AppFields, ControlError> {
        let name = rule::required_text("name", self.name)?;
        APP_NAME.check("name", &name)?;
        let remark = checked_remark(self.remark)?;
        let key = self.app_key.filter(|k| !k.is_empty());
        if let Some(key) = &key {
            APP_KEY.check("app_key", key)?;
        }
        let secret = checked_secret(self.app_secret)?;
        Ok(AppFields {
            name,
            remark,
            key,
            secret,
        })
    }
}

fn checked_secret(secret: Option<String>) -> Result<Option<String>, ControlError> {
    let secret = secret.filter(|s| !s.is_empty());
    if let Some(secret) = &secret {
        APP_SECRET.check("app_secret", secret)?;
    }
    Ok(secret)
}

/// The body of the secret reset: a secret to set, or none (one is generated).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct SecretBody {
    pub app_secret: Option<String>,
}

impl SecretBody {
    pub fn validate(self) -> Result<Option<String>, ControlError> {
        checked_secret(self.app_secret)
    }
}

/// The body of an app code given by the caller.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct AppCodeBody {
    pub app_code: Option<String>,
}

impl AppCodeBody {
    pub fn validate(self) -> Result<String, ControlError> {
        let code = rule::required_text("app_code", self.app_code)?;
        APP_CODE.check("app_code", &code)?;
        Ok(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_bodies_follow_huaweis_rules() {
        let body: AppBody =
            serde_json::from_str(r#"{"name":"app_01","app_key":"","other":1}"#).unwrap();
        let fields = body.validate().unwrap();
        assert_eq!((fields.key, fields.secret), (None, None));
        let body: AppBody = serde_json::from_str(r#"{"name":"app_01","app_key":"short"}"#).unwrap();
        let m = body.validate().unwrap_err().to_string();
        assert!(
            m.contains("parameterName:app_key.") && m.contains("8 to 200"),
            "{m}"
        );
        let m = AppCodeBody::default().validate().unwrap_err().to_string();
        assert!(m.contains("parameterName:app_code."), "{m}");
        assert!(APP_CODE.allows(&super::super::management::new_app_code()));
        assert!(!APP_CODE.allows("short"));
        let m = SecretBody {
            app_secret: Some("bad secret".into()),
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(m.contains("parameterName:app_secret."), "{m}");
    }
}
