//! Huawei APIG error codes and the error body both planes answer with (CONTRACT §8).
//!
//! One place for the body's shape so that the data plane, the market API and the management
//! API cannot drift apart. Which code goes with which case is decided by each plane's own
//! exhaustive error mapping; this module only names the codes and writes the JSON.

use serde::Serialize;

/// The error body: `{"error_code","error_msg","request_id"}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error_code: &'a str,
    pub error_msg: &'a str,
    pub request_id: &'a str,
}

impl ErrorBody<'_> {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an error body always serializes")
    }
}

// Data plane.
pub const NO_ROUTE: &str = "APIG.0101";
pub const BAD_REQUEST: &str = "APIG.0201";
pub const APP_AUTH_FAILED: &str = "APIG.0303";
pub const APP_NOT_AUTHORIZED: &str = "APIG.0304";
pub const GROUP_DELISTED: &str = "APIG.0306";
/// Throttled: a throttling threshold reached, or a peer over its failed-authentication limit.
pub const THROTTLED: &str = "APIG.0308";
pub const QUOTA_EXHAUSTED: &str = "APIG.0501";
pub const PURCHASE_INACTIVE: &str = "APIG.0502";
pub const INTERNAL: &str = "APIG.0601";
pub const NOT_READY: &str = "APIG.0606";

// Control plane.
pub const AUTH_FAILED: &str = "APIG.1002";
pub const NO_PERMISSION: &str = "APIG.1005";
pub const PARAMETER_ERROR: &str = "APIG.2000";
pub const INVALID_PARAMETER: &str = "APIG.2012";
pub const GROUP_NOT_FOUND: &str = "APIG.3001";
pub const API_NOT_FOUND: &str = "APIG.3002";
pub const APP_NOT_FOUND: &str = "APIG.3004";
pub const THROTTLE_NOT_FOUND: &str = "APIG.3005";
pub const AUTH_RECORD_NOT_FOUND: &str = "APIG.3009";
pub const THROTTLE_BINDING_NOT_FOUND: &str = "APIG.3010";
pub const THROTTLE_SPECIAL_NOT_FOUND: &str = "APIG.3018";
pub const LISTING_NOT_FOUND: &str = "APIG.3016";
pub const URL_DOMAIN_NOT_FOUND: &str = "APIG.3020";
pub const CERTIFICATE_NOT_FOUND: &str = "APIG.3021";
pub const INSTANCE_NOT_FOUND: &str = "APIG.3030";
pub const GROUP_NAME_EXISTS: &str = "APIG.3201";
pub const API_NAME_EXISTS: &str = "APIG.3202";
pub const APP_NAME_EXISTS: &str = "APIG.3203";
pub const THROTTLE_NAME_EXISTS: &str = "APIG.3204";
pub const API_EXISTS: &str = "APIG.3301";
pub const URL_DOMAIN_TAKEN: &str = "APIG.3305";
pub const APP_KEY_EXISTS: &str = "APIG.3310";
pub const THROTTLE_ALREADY_BOUND: &str = "APIG.3312";
pub const APP_AUTH_EXISTS: &str = "APIG.3316";
pub const THROTTLE_SPECIAL_EXISTS: &str = "APIG.3318";
pub const NO_SELLABLE_API: &str = "APIG.3403";
pub const CANNOT_BUY_OWN_GROUP: &str = "APIG.3406";
pub const GROUP_HAS_APIS: &str = "APIG.3415";
pub const API_PUBLISHED: &str = "APIG.3416";
pub const GROUP_DELISTED_ON_MARKET: &str = "APIG.3420";
pub const SYSTEM_ERROR: &str = "APIG.9999";
