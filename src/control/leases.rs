//! Quota leases on the control plane: the ledger owner's side of `docs/quota-leases.md`.
//!
//! It owns the exchange (apply a proxy's usage reports, grant or renew its leases, give back
//! on release), the operator's release of a dead proxy's leases, and the sweep that takes
//! back expired leases. The arithmetic is `crate::lease::Ledger`'s; this module only loads
//! ledgers from purchases, applies it and commits the result before answering. Ledger writes
//! do not bump the snapshot version: proxies learn them through exchanges, not pushes.
//!
//! Invariant (per purchase, after every commit): `used + Σ held ≤ limit`.

use std::time::Duration;

use crate::lease::{LeaseExchange, LeaseGrant, LeaseReply};
use crate::shutdown::Shutdown;
use crate::snapshot::{MarketState, PurchaseState};

use super::state::{Change, PurchaseRec, State};
use super::{ControlError, ControlPlane};

/// The control plane takes an expired lease back only this many seconds after its expiry, so
/// that a proxy whose clock runs behind has already stopped serving from it.
pub const EXPIRY_GRACE_SECS: i64 = 30;
/// How often expired leases are swept.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

impl ControlPlane {
    /// One exchange with a proxy: reports first, then grants (or renewals), or everything
    /// given back with `release_all`. Durable before it returns.
    pub async fn exchange_leases(
        &self,
        exchange: LeaseExchange,
    ) -> Result<LeaseReply, ControlError> {
        let node = exchange.node_id.as_str();
        if node.is_empty() {
            return Err(ControlError::InvalidParameter(
                "node_id: must not be empty".into(),
            ));
        }
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let ttl = self.config().control.lease_ttl.as_secs() as i64;
        let mut state = self.lock().await;
        let mut touched: Vec<PurchaseRec> = Vec::new();
        let mut grants = Vec::new();

        let mut ids: Vec<&str> = exchange
            .reports
            .iter()
            .map(|r| r.purchase_id.as_str())
            .chain(exchange.wants.iter().map(|w| w.purchase_id.as_str()))
            .collect();
        if exchange.release_all {
            ids.extend(
                state
                    .purchases
                    .values()
                    .filter(|p| p.leases.contains_key(node))
                    .map(|p| p.purchase_id.as_str()),
            );
        }
        ids.sort_unstable();
        ids.dedup();

        for id in ids {
            let Some(purchase) = state.purchases.get(id) else {
                tracing::warn!(
                    purchase = id,
                    node,
                    "lease exchange names an unknown purchase"
                );
                continue;
            };
            let mut ledger = purchase.ledger();
            for report in exchange.reports.iter().filter(|r| r.purchase_id == id) {
                match (exchange.incarnation.as_deref(), report.since) {
                    (Some(incarnation), Some(since)) => {
                        ledger.report_since(node, incarnation, since, report.used);
                    }
                    _ => ledger.report(node, report.used),
                }
            }
            let granted = if exchange.release_all {
                ledger.release(node);
                0
            } else {
                let want: u64 = exchange
                    .wants
                    .iter()
                    .filter(|w| w.purchase_id == id)
                    .map(|w| w.calls)
                    .sum();
                let want = if servable(&state, purchase, now) {
                    want
                } else {
                    0
                };
                ledger.grant(node, want, now, ttl)
            };
            let lease = ledger.leases.get(node).copied();
            grants.push(LeaseGrant {
                purchase_id: id.to_owned(),
                granted,
                held: lease.map_or(0, |l| l.held),
                unleased: ledger.unleased(),
                expires_at: lease.map_or(now, |l| l.expires_at),
            });
            let mut changed = purchase.clone();
            changed.set_ledger(ledger);
            touched.push(changed);
        }
        if !touched.is_empty() {
            let changes = touched.into_iter().map(Change::Purchase).collect();
            self.commit_ledger(&mut state, changes).await?;
        }
        Ok(LeaseReply { grants })
    }

    /// A purchase's ledger as it stands (for `/v1/usage`-style views and tests).
    pub async fn ledger(&self, purchase_id: &str) -> Option<crate::lease::Ledger> {
        self.lock()
            .await
            .purchases
            .get(purchase_id)
            .map(PurchaseRec::ledger)
    }

    /// Gives back every lease `node` holds (an operator, for a proxy that is gone for good).
    /// Returns the calls released.
    pub async fn release_leases(&self, node: &str) -> Result<u64, ControlError> {
        let mut state = self.lock().await;
        let mut released = 0;
        let mut changes = Vec::new();
        for purchase in state.purchases.values() {
            if purchase.leases.contains_key(node) {
                let mut ledger = purchase.ledger();
                released += ledger.release(node);
                let mut changed = purchase.clone();
                changed.set_ledger(ledger);
                changes.push(Change::Purchase(changed));
            }
        }
        if !changes.is_empty() {
            self.commit_ledger(&mut state, changes).await?;
        }
        tracing::info!(node, released, "leases released by an operator");
        Ok(released)
    }

    /// Takes back leases past expiry and grace. Returns how many were taken.
    pub async fn expire_leases(&self, now: i64) -> Result<usize, ControlError> {
        let mut state = self.lock().await;
        let mut expired = 0;
        let mut changes = Vec::new();
        for purchase in state.purchases.values() {
            if purchase
                .leases
                .values()
                .any(|l| l.expires_at + EXPIRY_GRACE_SECS < now)
            {
                let mut ledger = purchase.ledger();
                let nodes = ledger.expire(now, EXPIRY_GRACE_SECS);
                for node in &nodes {
                    tracing::warn!(purchase = %purchase.purchase_id, node, "lease expired: taken back");
                }
                expired += nodes.len();
                let mut changed = purchase.clone();
                changed.set_ledger(ledger);
                changes.push(Change::Purchase(changed));
            }
        }
        if !changes.is_empty() {
            self.commit_ledger(&mut state, changes).await?;
        }
        Ok(expired)
    }

    /// Sweeps expired leases every [`SWEEP_INTERVAL`] until `shutdown`.
    pub fn spawn_lease_expiry(&self, shutdown: Shutdown) {
        let cp = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(SWEEP_INTERVAL) => {}
                    _ = shutdown.clone().wait() => return,
                }
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                if let Err(error) = cp.expire_leases(now).await {
                    tracing::error!(%error, "sweeping expired leases failed");
                }
            }
        });
    }
}

/// May calls of this purchase be leased now? Active, within its times, group not delisted.
/// (Frozen or expired purchases are refused by the snapshot anyway; leasing them would only
/// strand calls.)
fn servable(state: &State, purchase: &PurchaseRec, now: i64) -> bool {
    purchase.state == PurchaseState::Active
        && purchase.start_time <= now
        && (purchase.expire_time == 0 || now < purchase.expire_time)
        && state
            .groups
            .get(&purchase.group_id)
            .is_some_and(|g| g.market_state != MarketState::Delisted)
}
