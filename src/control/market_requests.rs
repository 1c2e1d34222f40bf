//! The market API's request bodies (CONTRACT §3), typed: one struct per row that takes a
//! body, read with [`Call::body`](super::auth::Call::body) and checked by its own `validate`
//! into the values the row acts on. A wrong JSON type is 400 `APIG.2000` naming the field's
//! path; a value that breaks a rule is `APIG.2012` stating it (`control::rule`). As Huawei's
//! market sends them, integers and times may come as strings of digits and unknown fields are
//! ignored.
//!
//! Must not look at the state: whether the group, purchase or order exists is the row's.

use serde::Deserialize;

use super::error::ControlError;
use super::market::check_url_domain;
use super::rule::{self, epoch_seconds, loose_int, Lenient, LooseInt};

/// `order_type`'s values (CONTRACT §2).
const ORDER_TYPES: [(i64, &str); 3] = [
    (1, "prepaid package"),
    (2, "postpaid period"),
    (3, "postpaid on-demand"),
];

/// An optional id: empty is absent.
fn optional(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

/// Row 1 (onsell).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Onsell {
    pub url_domain: Option<String>,
}

impl Onsell {
    /// The market domain, lower-cased and within its rule.
    pub fn validate(self) -> Result<String, ControlError> {
        let url_domain = rule::required_text("url_domain", self.url_domain)?.to_ascii_lowercase();
        check_url_domain(&url_domain)?;
        Ok(url_domain)
    }
}

/// Row 4 (reserve).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Reserve {
    pub group_id: Option<String>,
}

impl Reserve {
    /// The group to reserve.
    pub fn validate(self) -> Result<String, ControlError> {
        rule::required_text("group_id", self.group_id)
    }
}

/// Row 5 (purchase).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Purchase {
    pub order_id: Option<String>,
    pub group_id: Option<String>,
    pub start_time: LooseInt,
    pub expire_time: LooseInt,
    pub order_type: LooseInt,
    pub req_quota: LooseInt,
    /// The reservation (row 4) this purchase completes, if any.
    pub purchase_id: Option<String>,
}

/// A purchase request, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct PurchaseOrder {
    pub order_id: String,
    pub group_id: String,
    pub start_time: i64,
    pub expire_time: i64,
    pub order_type: u8,
    /// `None`: unlimited.
    pub req_quota: Option<u64>,
    pub reservation: Option<String>,
}

impl Purchase {
    /// Order and group required; times in epoch seconds, expiring after they start; a known
    /// order type; a positive quota, required for a prepaid package.
    pub fn validate(self) -> Result<PurchaseOrder, ControlError> {
        let order_id = rule::required_text("order_id", self.order_id)?;
        let group_id = rule::required_text("group_id", self.group_id)?;
        let start_time = epoch_seconds("start_time", &self.start_time)?
            .ok_or_else(|| rule::invalid("start_time", rule::EPOCH_SECONDS))?;
        let expire_time = epoch_seconds("expire_time", &self.expire_time)?
            .ok_or_else(|| rule::invalid("expire_time", rule::EPOCH_SECONDS))?;
        rule::time_order("start_time", start_time, "expire_time", expire_time)?;
        let order_type = rule::one_of_int(
            "order_type",
            loose_int("order_type", &self.order_type)?,
            &ORDER_TYPES,
        )? as u8;
        let req_quota =
            match loose_int("req_quota", &self.req_quota)? {
                Some(q) if q > 0 => Some(q as u64),
                Some(q) => {
                    return Err(rule::invalid(
                        "req_quota",
                        format!("must be a positive number of calls (got {q})"),
                    ))
                }
                None if order_type == 1 => return Err(rule::invalid(
                    "req_quota",
                    "is required for order_type 1 (prepaid package): the number of calls bought",
                )),
                None => None,
            };
        Ok(PurchaseOrder {
            order_id,
            group_id,
            start_time,
            expire_time,
            order_type,
            req_quota,
            reservation: optional(self.purchase_id),
        })
    }
}

/// Row 6 (calls left, freeze or unfreeze one purchase).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct SetUnused {
    pub unused: LooseInt,
    pub purchase_id: Option<String>,
    pub group_id: Option<String>,
    pub project_id: Option<String>,
}

/// Which purchase row 6 names.
#[derive(Debug, Clone, PartialEq)]
pub enum PurchaseNamed {
    ById(String),
    /// The latest active or frozen purchase of the group in the project (`None`: the
    /// path's project).
    ByGroup {
        group_id: String,
        project_id: Option<String>,
    },
}

impl SetUnused {
    /// `(unused, purchase)`: `unused` required; the purchase by id, else by group.
    pub fn validate(self) -> Result<(i64, PurchaseNamed), ControlError> {
        let unused = loose_int("unused", &self.unused)?.ok_or_else(|| {
            rule::invalid(
                "unused",
                "is required: the calls left to set (> 0 unfreezes), or <= 0 to freeze",
            )
        })?;
        let named = match optional(self.purchase_id) {
            Some(id) => PurchaseNamed::ById(id),
            None => PurchaseNamed::ByGroup {
                group_id: rule::required_text("group_id", self.group_id)?,
                project_id: optional(self.project_id),
            },
        };
        Ok((unused, named))
    }
}

/// Rows 7 (lock 3 / unlock 2) and 10 (freeze 3 / unfreeze 1): `status`, and for row 10 the
/// purchases.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Status {
    pub status: LooseInt,
    pub purchase_ids: Option<Lenient<Vec<String>>>,
}

impl Status {
    /// Row 7: lock (`true`) or unlock.
    pub fn lock(self) -> Result<bool, ControlError> {
        let status = loose_int("status", &self.status)?;
        Ok(rule::one_of_int("status", status, &[(3, "lock"), (2, "unlock")])? == 3)
    }

    /// Row 10: freeze (`true`) or unfreeze, and the purchases.
    pub fn freeze(self) -> Result<(bool, Vec<String>), ControlError> {
        let status = loose_int("status", &self.status)?;
        let freeze = rule::one_of_int("status", status, &[(3, "freeze"), (1, "unfreeze")])? == 3;
        match self.purchase_ids {
            Some(Lenient::Valid(ids)) => Ok((freeze, ids)),
            None | Some(Lenient::Invalid(_)) => Err(rule::invalid(
                "purchase_ids",
                "must be a list of purchase ids (strings)",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read<T: serde::de::DeserializeOwned>(json: &str) -> T {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn huawei_sends_integers_as_strings_and_unknown_fields_are_ignored() {
        let order: Purchase = read(
            r#"{"order_id":"o1","group_id":"g1","start_time":"1700000000","expire_time":4102444800,
                "order_type":"1","req_quota":"100","purchase_id":"","extra":{"x":1}}"#,
        );
        assert_eq!(
            order.validate().unwrap(),
            PurchaseOrder {
                order_id: "o1".into(),
                group_id: "g1".into(),
                start_time: 1_700_000_000,
                expire_time: 4_102_444_800,
                order_type: 1,
                req_quota: Some(100),
                reservation: None,
            }
        );
    }

    #[test]
    fn each_refusal_names_its_field_and_rule() {
        let cases: [(&str, &str); 5] = [
            (r#"{"group_id":"g"}"#, "parameterName:order_id."),
            (
                r#"{"order_id":"o","group_id":"g","start_time":1,"expire_time":2,"order_type":1}"#,
                "req_quota is required for order_type 1",
            ),
            (
                r#"{"order_id":"o","group_id":"g","start_time":1,"expire_time":2,"order_type":2,"req_quota":0}"#,
                "req_quota must be a positive number of calls (got 0)",
            ),
            (
                r#"{"order_id":"o","group_id":"g","start_time":1,"expire_time":2,"order_type":[1]}"#,
                "order_type must be an integer",
            ),
            (
                r#"{"order_id":"o","group_id":"g","start_time":3,"expire_time":2,"order_type":2}"#,
                "expire_time must be after start_time",
            ),
        ];
        for (body, says) in cases {
            let m = read::<Purchase>(body).validate().unwrap_err().to_string();
            assert!(m.contains(says), "{body}: {m}");
        }
        let m = read::<Status>(r#"{"status":"3","purchase_ids":"p1"}"#)
            .freeze()
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("purchase_ids must be a list of purchase ids"),
            "{m}"
        );
        assert!(read::<Status>(r#"{"status":"2"}"#)
            .lock()
            .is_ok_and(|lock| !lock));
        let m = read::<SetUnused>(r#"{"unused":5}"#)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(m.contains("parameterName:group_id."), "{m}");
        let m = read::<Onsell>(r#"{"url_domain":"Not A Domain"}"#)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(m.contains("parameterName:url_domain."), "{m}");
    }
}
