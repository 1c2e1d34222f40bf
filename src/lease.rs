//! Quota leases: how many proxies share one purchase's calls without ever over-admitting.
//!
//! The control plane owns each purchase's ledger ([`Ledger`]): the calls granted in total
//! (`limit`), the calls proxies reported as served (`used`), and per proxy the calls leased
//! to it and not yet reported (`held`). A proxy serves only from what it holds.
//!
//! Invariant, kept by every method here: `used + Σ held ≤ limit`. Since a proxy serves at
//! most what it holds, no mix of proxies can serve more than `limit`.
//!
//! This module is the protocol's wire types and the ledger arithmetic, nothing else: it does
//! no I/O and keeps no clock of its own (callers pass `now`, epoch seconds). The control plane
//! persists ledgers; the data plane turns grants into calls in its quota cells. See
//! `docs/quota-leases.md` for the protocol and its bounds.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One exchange between a proxy and the control plane (`POST /v1/leases` on the control
/// plane's admin listener): the proxy reports what it served and asks for more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseExchange {
    pub node_id: String,
    /// Calls served since the last acknowledged report, per purchase.
    #[serde(default)]
    pub reports: Vec<UsageReport>,
    /// Calls wanted on top of what is held, per purchase.
    #[serde(default)]
    pub wants: Vec<LeaseWant>,
    /// Give back everything held after applying the reports (clean shutdown).
    #[serde(default)]
    pub release_all: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageReport {
    pub purchase_id: String,
    pub used: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseWant {
    pub purchase_id: String,
    pub calls: u64,
}

/// The control plane's answer: per purchase asked about or reported on, what the proxy now
/// holds and until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseReply {
    pub grants: Vec<LeaseGrant>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseGrant {
    pub purchase_id: String,
    /// Calls added by this exchange.
    pub granted: u64,
    /// Calls this proxy now holds in total (after reports and grants).
    pub held: u64,
    /// Calls left on the purchase outside every lease; `None` for unlimited purchases.
    pub unleased: Option<u64>,
    /// Epoch seconds after which the proxy must stop serving from this lease unless renewed.
    pub expires_at: i64,
}

/// Calls leased to one proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub held: u64,
    /// Epoch seconds.
    pub expires_at: i64,
}

/// One purchase's ledger, owned by the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Ledger {
    /// Calls granted in total; `None` is unlimited (still metered).
    pub limit: Option<u64>,
    /// Calls reported served, durable, never decreasing.
    pub used: u64,
    pub leases: BTreeMap<String, Lease>,
}

impl Ledger {
    pub fn new(limit: Option<u64>, used: u64) -> Ledger {
        Ledger {
            limit,
            used,
            leases: BTreeMap::new(),
        }
    }

    /// Calls held by all proxies together.
    pub fn held(&self) -> u64 {
        self.leases.values().map(|l| l.held).sum()
    }

    /// Calls neither used nor leased; `None` for unlimited purchases.
    pub fn unleased(&self) -> Option<u64> {
        self.limit
            .map(|limit| limit.saturating_sub(self.used + self.held()))
    }

    /// Calls left to the buyer (leased or not); `None` for unlimited purchases.
    pub fn calls_left(&self) -> Option<u64> {
        self.limit.map(|limit| limit.saturating_sub(self.used))
    }

    /// `node` served `calls` from its lease. Counted as used even if it exceeds what the node
    /// held (a proxy's journal after a crash may report calls from a lease that expired): the
    /// ledger then never gives those calls out again, and an over-report only loses calls.
    pub fn report(&mut self, node: &str, calls: u64) {
        self.used += calls;
        if let Some(lease) = self.leases.get_mut(node) {
            lease.held = lease.held.saturating_sub(calls);
        }
        self.restore_invariant();
    }

    /// Grants `node` up to `want` more calls, shrinking the grant as the purchase runs low so
    /// that the tail is shared between the proxies asking. Renews the node's lease until
    /// `now + ttl_secs` even when nothing more can be granted. Returns the calls granted.
    pub fn grant(&mut self, node: &str, want: u64, now: i64, ttl_secs: i64) -> u64 {
        let granted = match self.unleased() {
            None => 0, // unlimited: nothing to lease, proxies only meter
            Some(0) => 0,
            Some(unleased) => {
                let asking = self.leases.len().max(1) as u64 + 1;
                // Never hand one proxy more than its share of what is left, but always at
                // least one call while any is left.
                let share = (unleased / asking).max(1);
                want.min(share).min(unleased)
            }
        };
        let lease = self.leases.entry(node.to_owned()).or_insert(Lease {
            held: 0,
            expires_at: now,
        });
        lease.held += granted;
        lease.expires_at = now + ttl_secs;
        granted
    }

    /// Takes back every lease past its expiry (plus `grace_secs`, so that a proxy whose clock
    /// runs behind has stopped serving first). Returns the nodes whose leases were taken.
    pub fn expire(&mut self, now: i64, grace_secs: i64) -> Vec<String> {
        let expired: Vec<String> = self
            .leases
            .iter()
            .filter(|(_, l)| l.expires_at + grace_secs < now)
            .map(|(node, _)| node.clone())
            .collect();
        for node in &expired {
            self.leases.remove(node);
        }
        expired
    }

    /// Gives back what `node` holds (clean shutdown, or an operator releasing a dead proxy).
    /// Returns the calls released.
    pub fn release(&mut self, node: &str) -> u64 {
        self.leases.remove(node).map(|l| l.held).unwrap_or(0)
    }

    /// Sets the calls left to the buyer to `left` (the market's `unused`): the limit moves,
    /// the used count does not. Leases above what is now left shrink, largest first.
    pub fn set_calls_left(&mut self, left: u64) {
        self.limit = Some(self.used + left);
        self.restore_invariant();
    }

    /// Shrinks leases until `used + Σ held ≤ limit` holds again (after a lower limit or an
    /// over-report). A proxy learns the smaller lease at its next exchange; until then it may
    /// serve what it held — see `docs/quota-leases.md` for why that stays exact.
    fn restore_invariant(&mut self) {
        let Some(limit) = self.limit else {
            for lease in self.leases.values_mut() {
                lease.held = 0;
            }
            return;
        };
        let mut excess = (self.used + self.held()).saturating_sub(limit);
        while excess > 0 {
            let Some(lease) = self.leases.values_mut().max_by_key(|l| l.held) else {
                break;
            };
            let cut = lease.held.min(excess);
            if cut == 0 {
                break;
            }
            lease.held -= cut;
            excess -= cut;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invariant(ledger: &Ledger) {
        if let Some(limit) = ledger.limit {
            assert!(
                ledger.used + ledger.held() <= limit,
                "used {} + held {} > limit {limit}",
                ledger.used,
                ledger.held()
            );
        }
    }

    #[test]
    fn grants_never_exceed_what_is_left() {
        let mut ledger = Ledger::new(Some(100), 0);
        let mut total = 0;
        for round in 0..50 {
            for node in ["a", "b", "c"] {
                total += ledger.grant(node, 40, round, 60);
                invariant(&ledger);
            }
        }
        assert_eq!(total, 100);
        assert_eq!(ledger.unleased(), Some(0));
    }

    #[test]
    fn reports_turn_held_into_used() {
        let mut ledger = Ledger::new(Some(10), 0);
        assert_eq!(ledger.grant("a", 8, 0, 60), 5); // half of 10 for the first asker
        ledger.report("a", 3);
        assert_eq!((ledger.used, ledger.held()), (3, 2));
        assert_eq!(ledger.calls_left(), Some(7));
        invariant(&ledger);
    }

    #[test]
    fn tail_is_shared_one_call_at_a_time() {
        let mut ledger = Ledger::new(Some(3), 0);
        assert_eq!(ledger.grant("a", 100, 0, 60), 1);
        assert_eq!(ledger.grant("b", 100, 0, 60), 1);
        assert_eq!(ledger.grant("c", 100, 0, 60), 1);
        assert_eq!(ledger.grant("a", 100, 0, 60), 0);
        invariant(&ledger);
    }

    #[test]
    fn expiry_returns_stranded_calls_after_grace() {
        let mut ledger = Ledger::new(Some(100), 0);
        ledger.grant("dead", 50, 0, 60);
        assert!(ledger.expire(65, 10).is_empty());
        assert_eq!(ledger.expire(71, 10), vec!["dead".to_owned()]);
        assert_eq!(ledger.unleased(), Some(100));
    }

    #[test]
    fn lower_limit_shrinks_leases_and_keeps_the_invariant() {
        let mut ledger = Ledger::new(Some(100), 0);
        ledger.grant("a", 40, 0, 60);
        ledger.grant("b", 40, 0, 60);
        ledger.report("a", 10);
        ledger.set_calls_left(5);
        invariant(&ledger);
        assert_eq!(ledger.calls_left(), Some(5));
    }

    #[test]
    fn over_report_after_crash_counts_and_never_regrants() {
        let mut ledger = Ledger::new(Some(10), 0);
        ledger.grant("a", 5, 0, 60);
        ledger.expire(1000, 0);
        ledger.report("a", 4); // the journal says 4 were served from the expired lease
        assert_eq!(ledger.used, 4);
        invariant(&ledger);
    }

    #[test]
    fn unlimited_purchases_lease_nothing_and_meter() {
        let mut ledger = Ledger::new(None, 0);
        assert_eq!(ledger.grant("a", 100, 0, 60), 0);
        ledger.report("a", 7);
        assert_eq!(ledger.used, 7);
        assert_eq!(ledger.calls_left(), None);
    }
}
