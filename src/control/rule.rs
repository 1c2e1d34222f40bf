//! The rules a management or market field must follow, stated where the caller reads them.
//!
//! Every refusal of a value names the field *and the rule it broke* inside Huawei's error body
//! (`APIG.2012`, `Invalid parameter value,parameterName:F. <rule>. Please refer to the support
//! documentation`): a name gives its length bounds and allowed characters, an enumeration its
//! allowed values, a time its unit and order. Resources (groups, APIs, apps, purchases, and
//! the ones added later) build their refusals here and never word a rule themselves, so one
//! rule reads the same wherever it applies. Must not know any resource or touch state.

use serde::de::{Deserialize, DeserializeOwned, Deserializer};
use serde_json::Value;

use super::error::ControlError;

/// A field of a typed request whose wrong JSON type breaks its rule (400 `APIG.2012` stating
/// the rule) rather than the body (`APIG.2000`): kept as sent when it is not a `T`, for the
/// rule to refuse with what was sent. A `null` field is absent (`Option<Lenient<T>>`).
#[derive(Debug, Clone, PartialEq)]
pub enum Lenient<T> {
    Valid(T),
    Invalid(Value),
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let sent = Value::deserialize(deserializer)?;
        Ok(match serde_json::from_value::<T>(sent.clone()) {
            Ok(value) => Lenient::Valid(value),
            Err(_) => Lenient::Invalid(sent),
        })
    }
}

/// An integer as Huawei's SDKs send it: a JSON number or a string (of digits; an empty
/// string is no value).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(untagged)]
pub enum IntText {
    Int(i64),
    Text(String),
}

/// An integer field sent as [`IntText`].
pub type LooseInt = Option<Lenient<IntText>>;

/// The integer of `value` (`None` when absent, `null` or an empty string); anything but an
/// integer or a string of digits is refused with the rule.
pub fn loose_int(field: &str, value: &LooseInt) -> Result<Option<i64>, ControlError> {
    let bad = || {
        invalid(
            field,
            "must be an integer (a JSON number or a string of digits)",
        )
    };
    match value {
        None => Ok(None),
        Some(Lenient::Valid(IntText::Int(n))) => Ok(Some(*n)),
        Some(Lenient::Valid(IntText::Text(s))) if s.is_empty() => Ok(None),
        Some(Lenient::Valid(IntText::Text(s))) => s.trim().parse().map(Some).map_err(|_| bad()),
        Some(Lenient::Invalid(_)) => Err(bad()),
    }
}

/// A value refused by `rule`, a sentence without its final full stop (`must be …`).
pub fn invalid(field: &str, rule: impl Into<String>) -> ControlError {
    ControlError::InvalidParameter {
        field: field.to_owned(),
        rule: rule.into(),
    }
}

/// A required field that is absent, `null` or empty.
pub fn required(field: &str) -> ControlError {
    invalid(field, "the field is required and must not be empty")
}

/// A required text field of a typed request: absent, `null` and empty are refused alike.
pub fn required_text(field: &str, value: Option<String>) -> Result<String, ControlError> {
    value
        .filter(|v| !v.is_empty())
        .ok_or_else(|| required(field))
}

/// `value` must be one of `allowed`; the refusal lists them.
pub fn one_of<'a>(field: &str, value: &str, allowed: &[&'a str]) -> Result<&'a str, ControlError> {
    allowed
        .iter()
        .find(|a| **a == value)
        .copied()
        .ok_or_else(|| {
            invalid(
                field,
                format!("must be one of {} (got \"{value}\")", allowed.join(", ")),
            )
        })
}

/// An integer enumeration: `value` must be a key of `allowed`, whose meanings the refusal
/// lists (`must be 1 (on sale) or 3 (frozen)`).
pub fn one_of_int(
    field: &str,
    value: Option<i64>,
    allowed: &[(i64, &str)],
) -> Result<i64, ControlError> {
    match value {
        Some(v) if allowed.iter().any(|(a, _)| *a == v) => Ok(v),
        _ => {
            let choices: Vec<String> = allowed
                .iter()
                .map(|(v, meaning)| format!("{v} ({meaning})"))
                .collect();
            let got = value.map_or_else(|| "nothing".to_owned(), |v| v.to_string());
            Err(invalid(
                field,
                format!("must be one of {} (got {got})", choices.join(", ")),
            ))
        }
    }
}

/// An integer within `min..=max`, `unit` naming what it counts (`"ms"`, `"calls"`).
pub fn int_range(
    field: &str,
    value: Option<i64>,
    min: i64,
    max: i64,
    unit: &str,
) -> Result<i64, ControlError> {
    match value {
        Some(v) if (min..=max).contains(&v) => Ok(v),
        _ => {
            let got = value.map_or_else(|| "nothing".to_owned(), |v| v.to_string());
            Err(invalid(
                field,
                format!("must be an integer from {min} to {max} {unit} (got {got})"),
            ))
        }
    }
}

/// What a time field must be: the market API takes epoch seconds, although it answers in
/// ISO 8601 (as Huawei's).
pub const EPOCH_SECONDS: &str =
    "must be a time in epoch seconds (an integer such as 1767225600, as a number or a string), not an ISO 8601 date";

/// A time in epoch seconds, sent as a JSON number or a string of digits (Huawei's SDK sends
/// either); `None` when absent, `null` or empty. An ISO date is refused with the unit named.
pub fn epoch_seconds(field: &str, value: &LooseInt) -> Result<Option<i64>, ControlError> {
    let refuse = |got: &str| invalid(field, format!("{EPOCH_SECONDS} (got {got})"));
    match value {
        None => Ok(None),
        Some(Lenient::Valid(IntText::Text(s))) if s.is_empty() => Ok(None),
        Some(Lenient::Valid(IntText::Int(t))) if *t >= 0 => Ok(Some(*t)),
        Some(Lenient::Valid(IntText::Int(t))) => Err(refuse(&t.to_string())),
        Some(Lenient::Valid(IntText::Text(s))) => s
            .trim()
            .parse::<i64>()
            .ok()
            .filter(|t| *t >= 0)
            .map(Some)
            .ok_or_else(|| refuse(&format!("\"{s}\""))),
        Some(Lenient::Invalid(other)) => Err(refuse(&other.to_string())),
    }
}

/// `expire_time` must come after `start_time`.
pub fn time_order(
    start_field: &str,
    start: i64,
    end_field: &str,
    end: i64,
) -> Result<(), ControlError> {
    if end > start {
        Ok(())
    } else {
        Err(invalid(
            end_field,
            format!("must be after {start_field} (got {end_field} {end} <= {start_field} {start}, epoch seconds)"),
        ))
    }
}

/// A text field's rule: length bounds in characters and the characters allowed, with the
/// words that describe them to a caller.
#[derive(Debug, Clone, Copy)]
pub struct Text {
    pub min: usize,
    pub max: usize,
    /// Allowed first characters.
    pub first: fn(char) -> bool,
    /// Allowed characters anywhere.
    pub chars: fn(char) -> bool,
    /// The allowed characters, for a person (`letters, digits and _`).
    pub says_chars: &'static str,
    /// The allowed first characters, for a person (`a letter`); empty when any allowed
    /// character may start the value.
    pub says_first: &'static str,
}

impl Text {
    /// The rule as one sentence.
    pub fn rule(&self) -> String {
        let mut rule = format!(
            "must be {} to {} characters of {}",
            self.min, self.max, self.says_chars
        );
        if !self.says_first.is_empty() {
            rule.push_str(", starting with ");
            rule.push_str(self.says_first);
        }
        rule
    }

    /// Is `value` within the rule?
    pub fn allows(&self, value: &str) -> bool {
        self.broken_by(value).is_none()
    }

    /// Checks `value`, refusing with the rule and what broke it.
    pub fn check(&self, field: &str, value: &str) -> Result<(), ControlError> {
        match self.broken_by(value) {
            None => Ok(()),
            Some(why) => Err(invalid(field, format!("{} ({why})", self.rule()))),
        }
    }

    fn broken_by(&self, value: &str) -> Option<String> {
        let count = value.chars().count();
        if !(self.min..=self.max).contains(&count) {
            return Some(format!("got {count}"));
        }
        if let Some(c) = value.chars().find(|c| !(self.chars)(*c)) {
            return Some(format!("'{c}' is not allowed"));
        }
        match value.chars().next() {
            Some(c) if !(self.first)(c) => Some(format!("it starts with '{c}'")),
            _ => None,
        }
    }
}

/// Group and API names (Huawei's rule; for other resources named like them too): 3–255 chars of CJK, letters, digits, `-_./():、`, starting with a
/// letter, digit or CJK character.
pub const GROUP_NAME: Text = Text {
    min: 3,
    max: 255,
    first: |c| c.is_ascii_alphanumeric() || is_cjk(c),
    chars: |c| c.is_ascii_alphanumeric() || is_cjk(c) || "-_./():、（）：".contains(c),
    says_chars: "letters, digits, Chinese characters and - _ . / ( ) : 、",
    says_first: "a letter, a digit or a Chinese character",
};

/// App names (Huawei's rule; throttles and other short names follow it too): 3–64 chars of letters, digits, `_` and CJK, starting with a letter or CJK.
pub const APP_NAME: Text = Text {
    min: 3,
    max: 64,
    first: |c| c.is_ascii_alphabetic() || is_cjk(c),
    chars: |c| c.is_ascii_alphanumeric() || c == '_' || is_cjk(c),
    says_chars: "letters, digits, _ and Chinese characters",
    says_first: "a letter or a Chinese character",
};

/// A letter outside ASCII: Chinese characters and other scripts, as Huawei's names allow.
pub fn is_cjk(c: char) -> bool {
    !c.is_ascii() && c.is_alphabetic()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(e: ControlError) -> String {
        e.to_string()
    }

    #[test]
    fn a_text_refusal_states_the_rule_and_what_broke_it() {
        let m = message(APP_NAME.check("name", "ab").unwrap_err());
        assert_eq!(
            m,
            "Invalid parameter value,parameterName:name. name must be 3 to 64 characters of letters, \
             digits, _ and Chinese characters, starting with a letter or a Chinese character \
             (got 2). Please refer to the support documentation"
        );
        assert!(message(APP_NAME.check("name", "abc#").unwrap_err()).contains("'#' is not allowed"));
        assert!(message(APP_NAME.check("name", "1abc").unwrap_err()).contains("it starts with '1'"));
        assert!(APP_NAME.check("name", "应用_1").is_ok());
    }

    #[test]
    fn enumerations_list_their_values_and_times_their_unit() {
        let m = message(one_of("req_method", "FETCH", &["GET", "POST"]).unwrap_err());
        assert!(
            m.contains("must be one of GET, POST (got \"FETCH\")"),
            "{m}"
        );
        let m =
            message(one_of_int("status", Some(7), &[(1, "on sale"), (3, "frozen")]).unwrap_err());
        assert!(
            m.contains("must be one of 1 (on sale), 3 (frozen) (got 7)"),
            "{m}"
        );
        #[derive(serde::Deserialize)]
        struct Times {
            t: LooseInt,
            n: LooseInt,
            e: LooseInt,
            b: LooseInt,
            #[serde(default)]
            absent: LooseInt,
        }
        let times: Times = serde_json::from_str(
            r#"{"t":"2026-01-01T00:00:00Z","n":"1767225600","e":"","b":true}"#,
        )
        .unwrap();
        let m = message(epoch_seconds("t", &times.t).unwrap_err());
        assert!(
            m.contains("epoch seconds") && m.contains("2026-01-01T00:00:00Z"),
            "{m}"
        );
        assert_eq!(epoch_seconds("n", &times.n).unwrap(), Some(1_767_225_600));
        assert_eq!(epoch_seconds("e", &times.e).unwrap(), None);
        assert_eq!(epoch_seconds("absent", &times.absent).unwrap(), None);
        let m = message(epoch_seconds("b", &times.b).unwrap_err());
        assert!(m.contains("(got true)"), "{m}");
        assert_eq!(loose_int("n", &times.n).unwrap(), Some(1_767_225_600));
        assert!(loose_int("b", &times.b).is_err());
        assert!(loose_int("t", &times.t).is_err());
        let m = message(time_order("start_time", 10, "expire_time", 5).unwrap_err());
        assert!(
            m.contains("parameterName:expire_time. expire_time must be after start_time"),
            "{m}"
        );
        let m = message(int_range("timeout", Some(0), 1, 600_000, "ms").unwrap_err());
        assert!(m.contains("from 1 to 600000 ms (got 0)"), "{m}");
    }
}
