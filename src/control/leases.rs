//! Quota leases on the control plane: the ledger owner's side of `docs/quota-leases.md`.
//!
//! It owns the exchange (apply a proxy's usage reports, grant or renew its leases, give back
//! on release), the operator's release of a dead proxy's leases, and the sweep that takes
//! back expired leases. The arithmetic is `crate::lease::Ledger`'s; this module decides from
//! the caught-up state which purchases may be leased, and hands the arithmetic to the store as
//! a [`LedgerUpdate`]: the store runs it on the purchases' ledger rows while it holds them
//! locked (`FOR UPDATE`), in ONE transaction per exchange, whichever replica the proxy talks
//! to. Ledger writes do not take a snapshot version: proxies learn them through exchanges,
//! not pushes. Ledger rows are apart from the purchase documents, so an exchange never
//! conflicts with a market write.
//!
//! Invariant (per purchase, after every commit, across every replica): `used + Σ held ≤
//! limit`. Reports with `since` and an incarnation stay idempotent across replicas: the
//! tallies they are checked against are in the same locked row.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::lease::{LeaseExchange, LeaseGrant, LeaseReply, Ledger};
use crate::shutdown::Shutdown;
use crate::snapshot::{MarketState, PurchaseState};

use super::state::{LedgerDoc, PurchaseRec, State};
use super::store::{LedgerRows, LedgerUpdate};
use super::{ControlError, ControlPlane};

/// The control plane takes an expired lease back only this many seconds after its expiry, so
/// that a proxy whose clock runs behind has already stopped serving from it.
pub const EXPIRY_GRACE_SECS: i64 = 30;
/// How often expired leases are swept.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// A ledger row's ledger; a purchase without a row yet starts from its document's copy.
fn row_ledger(doc: Option<&str>, fallback: &Ledger) -> Result<Ledger, ControlError> {
    match doc {
        Some(doc) => LedgerDoc::parse(doc),
        None => Ok(fallback.clone()),
    }
}

/// What a ledger update computed, handed back out of the store's transaction.
type Outcome<T> = Arc<Mutex<Option<Result<T, ControlError>>>>;

fn take<T>(outcome: &Outcome<T>) -> Result<T, ControlError> {
    outcome
        .lock()
        .expect("ledger outcome")
        .take()
        .unwrap_or_else(|| {
            Err(ControlError::Conflict(
                "the ledger update did not run".into(),
            ))
        })
}

/// A data plane in this process (`marketgate serve`), whose calls taken and not yet reported
/// the control plane has reported before it reads a ledger for a view: in one process a
/// buyer's view shows every call answered before the read (docs/quota-leases.md, "When a
/// call shows in the ledger"). A fleet's proxies report on their own, within an exchange.
#[async_trait::async_trait]
pub trait LocalUsage: Send + Sync {
    /// Reports to the ledger, before it returns, every call of `purchase_ids` taken so far
    /// and not yet reported.
    async fn report_taken(
        &self,
        purchase_ids: &[String],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

impl ControlPlane {
    /// One exchange with a proxy: reports first, then grants (or renewals), or everything
    /// given back with `release_all`. One transaction, durable before it returns.
    pub async fn exchange_leases(
        &self,
        exchange: LeaseExchange,
    ) -> Result<LeaseReply, ControlError> {
        if exchange.node_id.is_empty() {
            return Err(super::rule::required("node_id"));
        }
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let ttl = self.config().control.lease_ttl.as_secs() as i64;
        let mut ids: Vec<String> = exchange
            .reports
            .iter()
            .map(|r| r.purchase_id.clone())
            .chain(exchange.wants.iter().map(|w| w.purchase_id.clone()))
            .collect();
        if exchange.release_all {
            ids.extend(self.held_by(&exchange.node_id).await?);
        }
        ids.sort_unstable();
        ids.dedup();
        // Which purchases exist and may be leased now: from the cache, caught up only when it
        // does not know one of them (one exchange is one store transaction). The quota
        // arithmetic reads the ledger rows locked in that transaction, never the cache.
        let known: Vec<(String, bool, Ledger)> = {
            let names: Vec<&str> = ids.iter().map(String::as_str).collect();
            let state = self.knowing(&names).await?;
            ids.into_iter()
                .filter_map(|id| {
                    let Some(purchase) = state.purchases.get(&id) else {
                        tracing::warn!(
                            purchase = id,
                            node = exchange.node_id,
                            "lease exchange names an unknown purchase"
                        );
                        return None;
                    };
                    let fallback = Ledger::new(purchase.quota_limit, purchase.quota_used);
                    Some((id, servable(&state, purchase, now), fallback))
                })
                .collect()
        };
        if known.is_empty() {
            return Ok(LeaseReply { grants: Vec::new() });
        }
        let outcome: Outcome<Vec<LeaseGrant>> = Arc::default();
        let out = outcome.clone();
        let update = LedgerUpdate {
            ids: known.iter().map(|(id, _, _)| id.clone()).collect(),
            apply: Box::new(move |rows: &mut LedgerRows| {
                let result = exchange_rows(&exchange, &known, rows, now, ttl);
                *out.lock().expect("ledger outcome") = Some(result);
            }),
        };
        self.commit_ledgers(update).await?;
        Ok(LeaseReply {
            grants: take(&outcome)?,
        })
    }

    /// Has the data plane in this process (if any: [`ControlPlane::attach_local_usage`])
    /// report what it took of `purchase_ids`, so that a ledger read next shows every call it
    /// answered. A failure is logged, and the read goes on (it fails itself if the store
    /// does).
    pub async fn report_local_usage(&self, purchase_ids: &[String]) {
        let Some(usage) = self.inner.local_usage.get().and_then(Weak::upgrade) else {
            return;
        };
        if let Err(error) = usage.report_taken(purchase_ids).await {
            tracing::debug!(%error, "the calls taken in this process could not be reported before a ledger read");
        }
    }

    /// Names the data plane of this process (`marketgate serve`), held weakly: the data
    /// plane's lease client holds this control plane.
    pub fn attach_local_usage(&self, usage: Weak<dyn LocalUsage>) {
        let _ = self.inner.local_usage.set(usage);
    }

    /// A purchase's ledger as the store holds it now (for views and tests).
    pub async fn ledger(&self, purchase_id: &str) -> Option<Ledger> {
        let rows = self
            .inner
            .store
            .ledgers(Some(vec![purchase_id.to_owned()]))
            .await
            .ok()?;
        rows.first().and_then(|(_, doc)| LedgerDoc::parse(doc).ok())
    }

    /// The ledgers of `ids` the store has, by purchase id (one query, for list views).
    pub async fn ledgers_of(
        &self,
        ids: Vec<String>,
    ) -> Result<std::collections::HashMap<String, Ledger>, ControlError> {
        self.inner
            .store
            .ledgers(Some(ids))
            .await?
            .into_iter()
            .map(|(id, doc)| Ok((id, LedgerDoc::parse(&doc)?)))
            .collect()
    }

    /// Every ledger, by purchase id (the admin listener's lease view, the expiry sweep).
    pub async fn ledgers(&self) -> Result<Vec<(String, Ledger)>, ControlError> {
        self.inner
            .store
            .ledgers(None)
            .await?
            .into_iter()
            .map(|(id, doc)| Ok((id, LedgerDoc::parse(&doc)?)))
            .collect()
    }

    /// The purchases in whose ledgers `node` holds a lease.
    async fn held_by(&self, node: &str) -> Result<Vec<String>, ControlError> {
        Ok(self
            .ledgers()
            .await?
            .into_iter()
            .filter(|(_, ledger)| ledger.leases.contains_key(node))
            .map(|(id, _)| id)
            .collect())
    }

    /// Gives back every lease `node` holds (an operator, for a proxy that is gone for good).
    /// Returns the calls released.
    pub async fn release_leases(&self, node: &str) -> Result<u64, ControlError> {
        let ids = self.held_by(node).await?;
        let outcome: Outcome<u64> = Arc::default();
        if !ids.is_empty() {
            let out = outcome.clone();
            let node = node.to_owned();
            let update = LedgerUpdate {
                ids,
                apply: Box::new(move |rows: &mut LedgerRows| {
                    let result = each_ledger(rows, |ledger| ledger.release(&node));
                    *out.lock().expect("ledger outcome") = Some(result);
                }),
            };
            self.commit_ledgers(update).await?;
        }
        let released = match outcome.lock().expect("ledger outcome").take() {
            Some(result) => result?,
            None => 0,
        };
        tracing::info!(node, released, "leases released by an operator");
        Ok(released)
    }

    /// Takes back leases past expiry and grace. Returns how many were taken.
    pub async fn expire_leases(&self, now: i64) -> Result<usize, ControlError> {
        let expired = |ledger: &Ledger| {
            ledger
                .leases
                .values()
                .any(|l| l.expires_at + EXPIRY_GRACE_SECS < now)
        };
        let ids: Vec<String> = self
            .ledgers()
            .await?
            .into_iter()
            .filter(|(_, ledger)| expired(ledger))
            .map(|(id, _)| id)
            .collect();
        if ids.is_empty() {
            return Ok(0);
        }
        let outcome: Outcome<u64> = Arc::default();
        let out = outcome.clone();
        let update = LedgerUpdate {
            ids,
            apply: Box::new(move |rows: &mut LedgerRows| {
                // Checked again under the row lock: another replica may have swept first,
                // or the proxy renewed.
                let result = each_ledger(rows, |ledger| {
                    let nodes = ledger.expire(now, EXPIRY_GRACE_SECS);
                    for node in &nodes {
                        tracing::warn!(node, "lease expired: taken back");
                    }
                    nodes.len() as u64
                });
                *out.lock().expect("ledger outcome") = Some(result);
            }),
        };
        self.commit_ledgers(update).await?;
        Ok(take(&outcome)? as usize)
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

/// Applies `f` to every existing ledger row and writes it back; the sum of what `f` returns.
fn each_ledger(
    rows: &mut LedgerRows,
    mut f: impl FnMut(&mut Ledger) -> u64,
) -> Result<u64, ControlError> {
    let mut total = 0;
    for (_, doc) in rows.iter_mut() {
        let Some(text) = doc.as_deref() else {
            continue;
        };
        let mut ledger = LedgerDoc::parse(text)?;
        total += f(&mut ledger);
        *doc = Some(LedgerDoc::render(&ledger));
    }
    Ok(total)
}

/// The exchange's arithmetic on the locked rows (`known`: the purchases, in the rows' order,
/// whether each may be leased, and the ledger to start from where a row is missing).
fn exchange_rows(
    exchange: &LeaseExchange,
    known: &[(String, bool, Ledger)],
    rows: &mut LedgerRows,
    now: i64,
    ttl: i64,
) -> Result<Vec<LeaseGrant>, ControlError> {
    let node = exchange.node_id.as_str();
    let mut grants = Vec::with_capacity(rows.len());
    for ((id, doc), (_, servable, fallback)) in rows.iter_mut().zip(known) {
        let mut ledger = row_ledger(doc.as_deref(), fallback)?;
        for report in exchange.reports.iter().filter(|r| &r.purchase_id == id) {
            match (exchange.incarnation.as_deref(), report.since) {
                (Some(incarnation), Some(since)) => {
                    ledger.report_since(node, incarnation, since, report.used);
                }
                _ => ledger.report(node, report.used),
            }
            // Calls given back count as unleased only now, reported by the proxy that took
            // them out of its cell (never on the control plane's word alone).
            if let (Some(incarnation), Some(returned)) =
                (exchange.incarnation.as_deref(), report.returned)
            {
                ledger.report_returned(node, incarnation, returned);
            }
        }
        let granted = if exchange.release_all {
            ledger.release(node);
            ledger.recall_excess();
            0
        } else {
            let mut want = 0;
            let mut demand = None;
            for w in exchange.wants.iter().filter(|w| &w.purchase_id == id) {
                want += w.calls;
                demand = w.demand.or(demand);
            }
            if !*servable {
                want = 0;
            }
            ledger.grant(node, want, demand, now, ttl)
        };
        let lease = ledger.leases.get(node).copied();
        grants.push(LeaseGrant {
            purchase_id: id.clone(),
            granted,
            held: lease.map_or(0, |l| l.held),
            unleased: ledger.unleased(),
            calls_left: ledger.calls_left(),
            recall: lease.map_or(0, |l| l.recall),
            expires_at: lease.map_or(now, |l| l.expires_at),
        });
        *doc = Some(LedgerDoc::render(&ledger));
    }
    Ok(grants)
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
