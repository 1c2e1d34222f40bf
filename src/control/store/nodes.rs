//! The node registry in the store: which incarnation holds each proxy node id, and when it
//! was last seen (`proxy_nodes`, migration 3). It is what makes "two live proxies never share
//! one node_id" hold across control replicas: every replica asks the store, and the claim is
//! one atomic upsert decided by the row (the first live incarnation keeps it; another takes it
//! only once the holder has been silent past the expiry).
//!
//! Only the SQL and its result type live here; the backends run it (`sqlite.rs`,
//! `postgres.rs`), and `control::subscriptions` decides when to ask (it caches a confirmed
//! claim for a while, so a busy proxy does not cost a store write per exchange).

/// Takes or renews the claim: `$1` node id, `$2` incarnation, `$3` now (epoch ms), `$4` the
/// expiry (ms). The row changes only for the holder itself or after the holder's silence.
pub const CLAIM_SQL: &str = "INSERT INTO proxy_nodes (node_id, incarnation, seen_at_ms) VALUES ($1, $2, $3)
     ON CONFLICT (node_id) DO UPDATE SET incarnation = excluded.incarnation, seen_at_ms = excluded.seen_at_ms
     WHERE proxy_nodes.incarnation = excluded.incarnation OR proxy_nodes.seen_at_ms < excluded.seen_at_ms - $4";
/// Who holds the node id after the claim: `$1` node id.
pub const HOLDER_SQL: &str = "SELECT incarnation FROM proxy_nodes WHERE node_id = $1";
/// A clean stop gives the node id up: `$1` node id, `$2` incarnation.
pub const RELEASE_SQL: &str = "DELETE FROM proxy_nodes WHERE node_id = $1 AND incarnation = $2";

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeClaim {
    /// The claiming incarnation holds the node id now.
    Held,
    /// Another incarnation, seen within the expiry, holds it.
    HeldBy(String),
}

/// Turns the holder read back after [`CLAIM_SQL`] into the claim's outcome.
pub fn outcome(incarnation: &str, holder: Option<String>) -> NodeClaim {
    match holder {
        Some(holder) if holder != incarnation => NodeClaim::HeldBy(holder),
        _ => NodeClaim::Held,
    }
}
