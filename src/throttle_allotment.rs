//! Throttling allotments: how proxies that share a control plane share a throttling limit
//! exactly (docs/throttling.md). The wire form of the exchange (`POST
//! /v1/throttle/allotments` on the control plane's admin listener) and the ledger arithmetic
//! both planes agree on.
//!
//! Invariant: for every counter and window, the calls granted to all proxies together never
//! exceed the limit ([`grant`]), and a proxy admits only what it was granted for the window
//! it is in, so the fleet's admitted calls per window never exceed the limit. Windows are
//! numbered on the control plane's clock; a proxy learns the offset of its own clock at each
//! exchange and admits nothing within [`SKEW_ALLOWANCE_MS`] of a window's ends.
//!
//! Must not do I/O: the control plane's side is `control::throttle_allotments`, the proxy's
//! `gateway::allotments`.

use serde::{Deserialize, Serialize};

/// The exchange's path on the control plane's admin listener.
pub const PATH: &str = "/v1/throttle/allotments";
/// How far a proxy's estimate of the control plane's clock may be off (half the exchange's
/// round trip, plus drift between exchanges, plus the control replicas' own disagreement)
/// while the fleet's sum per window stays within the limit: a proxy admits a window's calls
/// only from this long after the window starts until this long before it ends.
pub const SKEW_ALLOWANCE_MS: u64 = 50;
/// A proxy asks for this share of a limit at a time (at least one call): small enough that
/// proxies share a window's limit, large enough that a busy counter costs few exchanges.
pub const CHUNK_DIVISOR: u64 = 10;
/// Ledger rows are kept this long after their window ends.
pub const KEEP_AFTER_WINDOW_MS: i64 = 10 * 60 * 1000;

/// A proxy's request: more calls for some counters in their current windows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllotmentRequest {
    pub node_id: String,
    pub wants: Vec<Want>,
}

/// More calls of one counter in one window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Want {
    /// The counter's name (`{policy}[/{api}]/{kind}[/{subject}]`).
    pub counter: String,
    /// The window's number: ⌊t_ms / window_ms⌋ on the control plane's clock.
    pub window: u64,
    pub window_ms: u64,
    /// The counter's limit per window, as the proxy's snapshot has it.
    pub limit: u64,
    pub calls: u64,
}

/// The control plane's answer: its clock, and what each want was granted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllotmentReply {
    /// The control plane's clock when it took the request (the clock its grants were
    /// decided by), ms since the epoch.
    pub now_ms: u64,
    /// Its clock when it answered, after the ledger's commit (0 from a control plane that
    /// does not say): the proxy leaves the time in between out of its clock offset's error
    /// ([`clock_offset`]).
    #[serde(default)]
    pub answered_ms: u64,
    /// In the order of the wants.
    pub grants: Vec<Grant>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    pub counter: String,
    pub window: u64,
    pub granted: u64,
}

/// What a want is granted when `already` of the window's `limit` were granted: never more
/// than is left, so the sum granted never passes the limit.
pub fn grant(already: u64, calls: u64, limit: u64) -> u64 {
    calls.min(limit.saturating_sub(already))
}

/// Is `window` (of `window_ms`) the one the control plane's clock `now_ms` is in, or the
/// next one within the skew allowance? Other windows are granted nothing.
pub fn grantable(window: u64, window_ms: u64, now_ms: u64) -> bool {
    let window_ms = window_ms.max(1);
    let current = now_ms / window_ms;
    window == current
        || (window == current + 1 && (current + 1) * window_ms - now_ms <= SKEW_ALLOWANCE_MS)
}

/// The control plane's clock minus the proxy's, from one exchange, and the most it can be
/// off, both in ms (NTP's arithmetic): the proxy sent at `sent_ms` and had the answer at
/// `received_ms` on its clock; the control plane took the request at `reply.now_ms` and
/// answered at `reply.answered_ms` on its own. Only the time the exchange spent between the
/// planes is uncertain, not the time the control plane spent on the ledger's commit (an
/// fsync, on a busy machine the most of a round trip).
pub fn clock_offset(sent_ms: i64, received_ms: i64, reply: &AllotmentReply) -> (i64, i64) {
    let took = reply.now_ms as i64;
    let answered = (reply.answered_ms as i64).max(took);
    let offset = ((took - sent_ms) + (answered - received_ms)).div_euclid(2);
    let error = (((received_ms - sent_ms) - (answered - took)).max(0) + 1) / 2;
    (offset, error)
}

/// How much a clock offset's error grows per second since it was taken (clock drift between
/// the hosts: 1,000 ppm, far above what NTP-disciplined clocks drift): a proxy keeps the
/// offset of its most certain recent exchange, not of its latest.
pub const DRIFT_MS_PER_SEC: i64 = 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_never_pass_the_limit_whatever_the_order() {
        let mut granted = 0;
        for calls in [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7] {
            granted += grant(granted, calls, 100);
            assert!(granted <= 100);
        }
        assert_eq!(granted, 100);
        assert_eq!(grant(100, 5, 100), 0);
        assert_eq!(grant(120, 5, 100), 0);
    }

    #[test]
    fn the_clock_offset_leaves_the_control_planes_own_time_out_of_its_error() {
        // The control plane's clock is 1,000 ms ahead; 10 ms each way, 300 ms of commit.
        let reply = |now_ms, answered_ms| AllotmentReply {
            now_ms,
            answered_ms,
            grants: Vec::new(),
        };
        assert_eq!(
            clock_offset(5_000, 5_320, &reply(6_010, 6_310)),
            (1_000, 10)
        );
        // A control plane that does not say when it answered: the whole round trip is
        // uncertain.
        assert_eq!(clock_offset(5_000, 5_320, &reply(6_010, 0)), (850, 160));
    }

    #[test]
    fn only_the_current_window_or_the_next_one_at_its_edge_is_grantable() {
        assert!(grantable(5, 1000, 5_000));
        assert!(grantable(5, 1000, 5_999));
        assert!(!grantable(4, 1000, 5_000));
        assert!(!grantable(6, 1000, 5_500));
        assert!(grantable(6, 1000, 5_990));
        assert!(!grantable(7, 1000, 5_990));
    }
}
