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
//! Fair shares and give-back: while the demands of the proxies holding a purchase exceed its
//! calls left, each may hold at most its share of them, in proportion to its demand
//! ([`Ledger::fair_share`]); the ledger then asks a proxy holding more to give the excess back
//! ([`Lease::recall`], carried in its exchange's answer), and counts those calls unleased only
//! once the proxy reports them given back ([`UsageReport::returned`], a running total in one
//! life of its data directory, so a repeated report counts once). Until then they stay held:
//! a call is never leased to two proxies at once.
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
    /// Calls of this purchase this proxy has given back from its leases, in total, in this
    /// life of its data directory (with [`LeaseExchange::incarnation`]; persisted by the proxy
    /// before it is sent). A running total, so that a report repeated after a lost answer
    /// counts once: see [`Ledger::report_returned`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub returned: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseWant {
    pub purchase_id: String,
    pub calls: u64,
    /// Calls the proxy would like to hold in all (its outage budget of the purchase's recent
    /// traffic). Fair shares are sized by it; without it, what is held plus `calls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demand: Option<u64>,
}

/// The control plane's answer: per purchase asked about or reported on, what the proxy now
/// holds and until when. (Unknown fields are ignored: a newer control plane may say more.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseReply {
    pub grants: Vec<LeaseGrant>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGrant {
    pub purchase_id: String,
    /// Calls added by this exchange.
    pub granted: u64,
    /// Calls this proxy now holds in total (after reports and grants).
    pub held: u64,
    /// Calls left on the purchase outside every lease; `None` for unlimited purchases.
    pub unleased: Option<u64>,
    /// Calls left on the purchase, leased or not (`limit - used`); `None` for unlimited
    /// purchases (and from an older control plane). Those beyond `held` are elsewhere: worth
    /// waiting for when this proxy's lease runs dry, not a reason to answer "used up".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calls_left: Option<u64>,
    /// Calls the proxy is asked to give back (it holds more than its fair share while another
    /// proxy is short): it takes them out of its quota cell and reports them in
    /// [`UsageReport::returned`]; until then they stay counted as held.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub recall: u64,
    /// Epoch seconds after which the proxy must stop serving from this lease unless renewed.
    pub expires_at: i64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Calls leased to one proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub held: u64,
    /// Epoch seconds.
    pub expires_at: i64,
    /// Calls the proxy last said it would like to hold ([`LeaseWant::demand`]); `None`
    /// (never said) counts as what it holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demand: Option<u64>,
    /// Calls the proxy is asked to give back: part of `held` until it reports them returned.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub recall: u64,
}

impl Lease {
    /// What the proxy would like to hold, as far as the ledger knows.
    fn wanted(&self) -> u64 {
        self.demand.unwrap_or(self.held)
    }
}

/// What one proxy has reported of one purchase, in one life of its data directory.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Tally {
    pub incarnation: String,
    /// Calls counted from this proxy's reports, by its own count.
    pub reported: u64,
    /// Calls counted as given back from its leases ([`UsageReport::returned`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub returned: u64,
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
        let tally = self.tally(node, incarnation, since);
        let counted_before = tally.reported.saturating_sub(since);
        let new = calls.saturating_sub(counted_before);
        tally.reported = tally.reported.max(since + calls);
        self.report(node, new);
        new
    }

    /// `node`'s tally in the life `incarnation`; a new life starts it over, counting from
    /// `since`.
    fn tally(&mut self, node: &str, incarnation: &str, since: u64) -> &mut Tally {
        let tally = self.tallies.entry(node.to_owned()).or_default();
        if tally.incarnation != incarnation {
            *tally = Tally {
                incarnation: incarnation.to_owned(),
                reported: since,
                returned: 0,
            };
        }
        tally
    }

    /// `node` has given back `returned` calls of its leases in all, in the life
    /// `incarnation` of its data directory (a running total: calls this ledger already
    /// counted are not counted again). The calls newly given back leave its lease and are
    /// unleased from now on; they settle its recall first. Returns the calls newly counted.
    ///
    /// Only what the lease still holds can be given back: a lease taken back meanwhile
    /// (expired, released) freed its calls already, and the total only moves the tally on.
    pub fn report_returned(&mut self, node: &str, incarnation: &str, returned: u64) -> u64 {
        let tally = self.tally(node, incarnation, 0);
        let new = returned.saturating_sub(tally.returned);
        tally.returned = tally.returned.max(returned);
        let Some(lease) = self.leases.get_mut(node) else {
            return 0;
        };
        let counted = new.min(lease.held);
        lease.held -= counted;
        lease.recall = lease.recall.saturating_sub(counted);
        counted
    }

    /// Grants `node` up to `want` more calls, within its fair share ([`Ledger::fair_share`])
    /// and what is unleased; records its `demand` (without one: what it holds plus `want`)
    /// and asks the proxies above their shares to give back the excess where another is
    /// short ([`Ledger::recall_excess`]). Renews the node's lease until `now + ttl_secs` even
    /// when nothing more can be granted. Returns the calls granted.
    pub fn grant(
        &mut self,
        node: &str,
        want: u64,
        demand: Option<u64>,
        now: i64,
        ttl_secs: i64,
    ) -> u64 {
        // One grant takes at most an even share of what is unleased (counting the asker), so
        // that proxies asking at about the same time split it without a round of recalls.
        let asking = self.leases.len().max(1) as u64 + 1;
        let lease = self.leases.entry(node.to_owned()).or_insert(Lease {
            held: 0,
            expires_at: now,
            demand: None,
            recall: 0,
        });
        lease.demand = Some(demand.unwrap_or(lease.held + want));
        lease.expires_at = now + ttl_secs;
        let held = lease.held;
        let granted = match self.unleased() {
            None => 0, // unlimited: nothing to lease, proxies only meter
            Some(0) => 0,
            Some(unleased) => {
                let room = self.fair_share(node).saturating_sub(held);
                // Always at least one call while any is left and the share has room.
                let spread = (unleased / asking).max(1);
                want.min(room).min(spread).min(unleased)
            }
        };
        if let Some(lease) = self.leases.get_mut(node) {
            lease.held += granted;
        }
        self.recall_excess();
        granted
    }

    /// The most `node` may hold now: what it would like to hold while the demands of every
    /// proxy with a lease fit in the calls left; otherwise its share of the calls left in
    /// proportion to its demand (so that every proxy's share lasts about as long), and at
    /// least one call while any is left. `0` for unlimited purchases.
    pub fn fair_share(&self, node: &str) -> u64 {
        let Some(left) = self.calls_left() else {
            return 0;
        };
        let mine = self.leases.get(node).map_or(0, Lease::wanted);
        let total: u64 = self.leases.values().map(Lease::wanted).sum();
        if mine == 0 || total <= left {
            return mine;
        }
        let share = (u128::from(left) * u128::from(mine) / u128::from(total)) as u64;
        share.max(u64::from(left > 0))
    }

    /// Sets every lease's recall: while the proxies below their fair shares are short of more
    /// than is unleased, each proxy above its share is asked to give back the excess; else
    /// none is asked (a proxy a little above its share keeps it while nobody is short).
    pub fn recall_excess(&mut self) {
        let shares: Vec<u64> = self
            .leases
            .keys()
            .map(|node| self.fair_share(node))
            .collect();
        let short: u64 = self
            .leases
            .values()
            .zip(&shares)
            .map(|(lease, share)| share.saturating_sub(lease.held))
            .sum();
        let contended = short > self.unleased().unwrap_or(u64::MAX);
        for (lease, share) in self.leases.values_mut().zip(shares) {
            lease.recall = if contended {
                lease.held.saturating_sub(share)
            } else {
                0
            };
        }
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
                total += ledger.grant(node, 40, None, round, 60);
                invariant(&ledger);
            }
        }
        assert_eq!(total, 100);
        assert_eq!(ledger.unleased(), Some(0));
    }

    #[test]
    fn reports_turn_held_into_used() {
        let mut ledger = Ledger::new(Some(10), 0);
        assert_eq!(ledger.grant("a", 8, None, 0, 60), 5); // half of 10 for the first asker
        ledger.report("a", 3);
        assert_eq!((ledger.used, ledger.held()), (3, 2));
        assert_eq!(ledger.calls_left(), Some(7));
        invariant(&ledger);
    }

    #[test]
    fn tail_is_shared_one_call_at_a_time() {
        let mut ledger = Ledger::new(Some(3), 0);
        assert_eq!(ledger.grant("a", 100, None, 0, 60), 1);
        assert_eq!(ledger.grant("b", 100, None, 0, 60), 1);
        assert_eq!(ledger.grant("c", 100, None, 0, 60), 1);
        assert_eq!(ledger.grant("a", 100, None, 0, 60), 0);
        invariant(&ledger);
    }

    #[test]
    fn expiry_returns_stranded_calls_after_grace() {
        let mut ledger = Ledger::new(Some(100), 0);
        ledger.grant("dead", 50, None, 0, 60);
        assert!(ledger.expire(65, 10).is_empty());
        assert_eq!(ledger.expire(71, 10), vec!["dead".to_owned()]);
        assert_eq!(ledger.unleased(), Some(100));
    }

    #[test]
    fn lower_limit_shrinks_leases_and_keeps_the_invariant() {
        let mut ledger = Ledger::new(Some(100), 0);
        ledger.grant("a", 40, None, 0, 60);
        ledger.grant("b", 40, None, 0, 60);
        ledger.report("a", 10);
        ledger.set_calls_left(5);
        invariant(&ledger);
        assert_eq!(ledger.calls_left(), Some(5));
    }

    #[test]
    fn over_report_after_crash_counts_and_never_regrants() {
        let mut ledger = Ledger::new(Some(10), 0);
        ledger.grant("a", 5, None, 0, 60);
        ledger.expire(1000, 0);
        ledger.report("a", 4); // the journal says 4 were served from the expired lease
        assert_eq!(ledger.used, 4);
        invariant(&ledger);
    }

    #[test]
    fn a_report_repeated_after_a_lost_answer_counts_once() {
        let mut ledger = Ledger::new(Some(100), 0);
        ledger.grant("a", 50, None, 0, 60);
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
        ledger.grant("a", 50, None, 0, 60);
        assert_eq!(ledger.report_since("a", "life-1", 0, 30), 30);
        ledger.release("a");
        // Same node id, empty data directory: its count restarts at zero.
        ledger.grant("a", 20, None, 0, 60);
        assert_eq!(ledger.report_since("a", "life-2", 0, 4), 4);
        assert_eq!(ledger.used, 34);
        invariant(&ledger);
    }

    #[test]
    fn proxies_tally_apart() {
        let mut ledger = Ledger::new(Some(100), 0);
        ledger.grant("a", 30, None, 0, 60);
        ledger.grant("b", 30, None, 0, 60);
        ledger.report_since("a", "life-a", 0, 10);
        assert_eq!(ledger.report_since("b", "life-b", 0, 10), 10);
        assert_eq!(ledger.used, 20);
    }

    #[test]
    fn a_share_is_sized_by_demand_once_demands_exceed_what_is_left() {
        let mut ledger = Ledger::new(Some(1000), 0);
        ledger.grant("a", 100, Some(300), 0, 60);
        ledger.grant("b", 100, Some(100), 0, 60);
        // 400 wanted of 1000 left: everyone may hold what it wants.
        assert_eq!((ledger.fair_share("a"), ledger.fair_share("b")), (300, 100));
        ledger.grant("c", 0, Some(1600), 0, 60);
        // 2000 wanted: shares in proportion, 150 + 50 + 800.
        assert_eq!(
            ["a", "b", "c"].map(|n| ledger.fair_share(n)),
            [150, 50, 800]
        );
    }

    #[test]
    fn a_proxy_above_its_share_is_asked_back_and_the_calls_move_once_returned() {
        let mut ledger = Ledger::new(Some(1000), 0);
        // "a" alone, busy: it takes the whole purchase over a few exchanges.
        while ledger.grant("a", 1000, Some(1000), 0, 60) > 0 {}
        assert_eq!(ledger.leases["a"].held, 1000);
        // "b" starts with the same demand: nothing unleased, so "a" is asked for its excess.
        assert_eq!(ledger.grant("b", 500, Some(1000), 0, 60), 0);
        assert_eq!(ledger.fair_share("b"), 500);
        assert_eq!(ledger.leases["a"].recall, 500);
        invariant(&ledger);
        // Asked is not given: until "a" reports them returned they stay its own.
        assert_eq!(ledger.grant("b", 500, Some(1000), 0, 60), 0);
        assert_eq!(ledger.report_returned("a", "life-a", 500), 500);
        assert_eq!(
            ledger.leases["a"],
            Lease {
                held: 500,
                recall: 0,
                ..ledger.leases["a"]
            }
        );
        // The same report again (its answer was lost) counts nothing more.
        assert_eq!(ledger.report_returned("a", "life-a", 500), 0);
        assert_eq!(ledger.leases["a"].held, 500);
        let mut b = 0;
        while b < 500 {
            let granted = ledger.grant("b", 500 - b, Some(1000), 0, 60);
            assert!(granted > 0, "the returned calls reach b");
            b += granted;
            invariant(&ledger);
        }
        assert_eq!(ledger.leases["b"].held, 500);
        assert_eq!(ledger.unleased(), Some(0));
    }

    #[test]
    fn nobody_is_asked_back_while_what_is_unleased_covers_who_is_short() {
        let mut ledger = Ledger::new(Some(1000), 0);
        ledger.grant("a", 400, Some(600), 0, 60);
        ledger.grant("b", 300, Some(600), 0, 60);
        // Shares 500 each; "b" is short 200, and 300 are unleased.
        assert_eq!(ledger.unleased(), Some(300));
        assert!(ledger.leases.values().all(|l| l.recall == 0));
    }

    #[test]
    fn a_return_is_counted_only_from_what_the_lease_still_holds() {
        let mut ledger = Ledger::new(Some(100), 0);
        ledger.grant("a", 40, Some(40), 0, 60);
        ledger.expire(1000, 0);
        // Given back after the lease was taken back: its calls were freed already.
        assert_eq!(ledger.report_returned("a", "life-a", 30), 0);
        assert_eq!(ledger.unleased(), Some(100));
        // A new lease: the old total does not count against it.
        ledger.grant("a", 40, Some(40), 0, 60);
        assert_eq!(ledger.report_returned("a", "life-a", 30), 0);
        assert_eq!(ledger.report_returned("a", "life-a", 35), 5);
        assert_eq!(ledger.leases["a"].held, 35);
    }

    use proptest::prelude::*;

    /// One step of a proxy, or of the ledger's own housekeeping.
    #[derive(Debug, Clone)]
    enum Step {
        /// Proxy `p` serves up to `calls` from its quota cell.
        Serve { p: usize, calls: u64 },
        /// Proxy `p` exchanges (reports, asks for `want` with `demand`); with `lost`, the
        /// ledger commits it but the answer never reaches the proxy.
        Exchange {
            p: usize,
            want: u64,
            demand: u64,
            lost: bool,
        },
        /// Proxy `p` gives back `calls` of its own accord (it went idle).
        GiveBack { p: usize, calls: u64 },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0..4usize, 0..80u64).prop_map(|(p, calls)| Step::Serve { p, calls }),
            (
                0..4usize,
                0..400u64,
                1..1200u64,
                proptest::bool::weighted(0.2)
            )
                .prop_map(|(p, want, demand, lost)| Step::Exchange {
                    p,
                    want,
                    demand,
                    lost
                }),
            (0..4usize, 0..50u64).prop_map(|(p, calls)| Step::GiveBack { p, calls }),
        ]
    }

    /// What a proxy knows: its cell (calls it may still serve), what it served, what the
    /// ledger acknowledged, and the calls it gave back in all.
    #[derive(Debug, Default, Clone)]
    struct Proxy {
        cell: u64,
        served: u64,
        acked: u64,
        returned: u64,
    }

    proptest! {
        /// Whatever the proxies do — ask, serve, give back when asked or of their own
        /// accord, lose answers and report again — the ledger keeps `used + Σ held ≤ limit`,
        /// and no proxy can serve a call the ledger does not count as its own: what was served
        /// plus what every cell may still serve never exceeds the limit.
        #[test]
        fn a_call_is_never_leased_twice(steps in proptest::collection::vec(step(), 1..200)) {
            const LIMIT: u64 = 2000;
            let mut ledger = Ledger::new(Some(LIMIT), 0);
            let mut proxies = vec![Proxy::default(); 4];
            let node = |p: usize| format!("p{p}");
            for step in steps {
                match step {
                    Step::Serve { p, calls } => {
                        let n = calls.min(proxies[p].cell);
                        proxies[p].cell -= n;
                        proxies[p].served += n;
                    }
                    Step::GiveBack { p, calls } => {
                        let n = calls.min(proxies[p].cell);
                        proxies[p].cell -= n;
                        proxies[p].returned += n;
                    }
                    Step::Exchange { p, want, demand, lost } => {
                        let proxy = &mut proxies[p];
                        let name = node(p);
                        let used = proxy.served - proxy.acked;
                        ledger.report_since(&name, "life", proxy.acked, used);
                        ledger.report_returned(&name, "life", proxy.returned);
                        ledger.grant(&name, want, Some(demand), 0, 60);
                        if !lost {
                            let lease = ledger.leases[&name];
                            proxy.acked = proxy.served;
                            proxy.cell = lease.held;
                            // Asked back: out of the cell now, reported at the next exchange.
                            let back = lease.recall.min(proxy.cell);
                            proxy.cell -= back;
                            proxy.returned += back;
                        }
                    }
                }
                invariant(&ledger);
                let served: u64 = proxies.iter().map(|p| p.served).sum();
                let servable: u64 = proxies.iter().map(|p| p.cell).sum();
                prop_assert!(served + servable <= LIMIT, "{served} + {servable} > {LIMIT}: {ledger:?}");
            }
        }
    }

    #[test]
    fn unlimited_purchases_lease_nothing_and_meter() {
        let mut ledger = Ledger::new(None, 0);
        assert_eq!(ledger.grant("a", 100, None, 0, 60), 0);
        ledger.report("a", 7);
        assert_eq!(ledger.used, 7);
        assert_eq!(ledger.calls_left(), None);
    }
}
