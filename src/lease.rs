//! Quota leases: how many proxies share one purchase's calls without ever over-admitting.
//!
//! The control plane owns each purchase's ledger ([`Ledger`]): the calls granted in total
//! (`limit`), the calls proxies reported as served (`used`), and per proxy the calls leased
//! to it and not yet reported (`held`). A proxy serves only from what it holds.
//!
//! Invariant, kept by every method here: `used + Σ held ≤ limit`. Since a proxy serves at
//! most what it holds, no mix of proxies can serve more than `limit`.
//!
//! Reports are idempotent where the proxy says where it counts from ([`UsageReport::since`],
//! [`LeaseExchange::incarnation`]): an exchange the control plane committed but whose answer
//! the proxy never got (a timeout, a crash) is reported again, and only the calls the ledger
//! has not yet counted are added.
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
    /// Give back everything held after applying the reports (clean shutdown, or the
    /// recovery after a start).
    #[serde(default)]
    pub release_all: bool,
    /// The proxy is stopping cleanly: it leaves the control plane's `GET /v1/proxies` and
    /// frees its node id at once (a start's recovery gives leases back without leaving).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leaving: bool,
    /// Names the life of the proxy's data directory (made when its lease state is first
    /// written): a proxy that lost its disk counts from zero again, and the ledger must know.
    /// Without it, reports are plain increments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incarnation: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageReport {
    pub purchase_id: String,
    /// Calls served on top of `since`.
    pub used: u64,
    /// Calls of this purchase this proxy had reported before, as far as it knows (the sum of
    /// its acknowledged reports). With [`LeaseExchange::incarnation`], it makes the report
    /// idempotent: see [`Ledger::report_since`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
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

/// What one proxy has reported of one purchase, in one life of its data directory.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Tally {
    pub incarnation: String,
    /// Calls counted from this proxy's reports, by its own count.
    pub reported: u64,
}

/// One purchase's ledger, owned by the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Ledger {
    /// Calls granted in total; `None` is unlimited (still metered).
    pub limit: Option<u64>,
    /// Calls reported served, durable, never decreasing.
    pub used: u64,
    pub leases: BTreeMap<String, Lease>,
    /// Per proxy, what its reports have counted so far (kept after its lease ends, so that a
    /// report repeated after a restart is still recognised).
    pub tallies: BTreeMap<String, Tally>,
}

impl Ledger {
    pub fn new(limit: Option<u64>, used: u64) -> Ledger {
        Ledger {
            limit,
            used,
            leases: BTreeMap::new(),
            tallies: BTreeMap::new(),
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

    /// `node` served `calls` on top of the `since` it had reported before, in the life
    /// `incarnation` of its data directory. Calls this ledger already counted — from an
    /// exchange it committed but whose answer the proxy never got — are not counted twice.
    /// A new incarnation (the proxy lost its disk, or never said) starts its tally at `since`.
    /// Returns the calls newly counted as used.
    pub fn report_since(&mut self, node: &str, incarnation: &str, since: u64, calls: u64) -> u64 {
        let tally = self.tallies.entry(node.to_owned()).or_default();
        if tally.incarnation != incarnation {
            *tally = Tally {
                incarnation: incarnation.to_owned(),
                reported: since,
            };
        }
        let counted_before = tally.reported.saturating_sub(since);
        let new = calls.saturating_sub(counted_before);
        tally.reported = tally.reported.max(since + calls);
        self.report(node, new);
        new
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
    fn a_report_repeated_after_a_lost_answer_counts_once() {
        let mut ledger = Ledger::new(Some(100), 0);
        ledger.grant("a", 50, 0, 60);
        assert_eq!(ledger.report_since("a", "life-1", 0, 10), 10);
        // The answer was lost: the proxy still thinks it reported 0, and has served 5 more.
        assert_eq!(ledger.report_since("a", "life-1", 0, 15), 5);
        assert_eq!(ledger.used, 15);
        assert_eq!(ledger.leases["a"].held, 35);
        // The next report counts from the acknowledged 15.
        assert_eq!(ledger.report_since("a", "life-1", 15, 3), 3);
        assert_eq!(ledger.used, 18);
        invariant(&ledger);
    }

    #[test]
    fn a_proxy_with_a_new_disk_counts_from_zero_again() {
        let mut ledger = Ledger::new(Some(100), 0);
        ledger.grant("a", 50, 0, 60);
        assert_eq!(ledger.report_since("a", "life-1", 0, 30), 30);
        ledger.release("a");
        // Same node id, empty data directory: its count restarts at zero.
        ledger.grant("a", 20, 0, 60);
        assert_eq!(ledger.report_since("a", "life-2", 0, 4), 4);
        assert_eq!(ledger.used, 34);
        invariant(&ledger);
    }

    #[test]
    fn proxies_tally_apart() {
        let mut ledger = Ledger::new(Some(100), 0);
        ledger.grant("a", 30, 0, 60);
        ledger.grant("b", 30, 0, 60);
        ledger.report_since("a", "life-a", 0, 10);
        assert_eq!(ledger.report_since("b", "life-b", 0, 10), 10);
        assert_eq!(ledger.used, 20);
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
