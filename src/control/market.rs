//! The market API (CONTRACT §3): the twelve rows the cloud market calls, and the group
//! market state machine of §3.2:
//!
//! | from | row | to |
//! |---|---|---|
//! | unlisted | 7 lock | locked |
//! | locked | 7 unlock | unlisted |
//! | unlisted, locked, off_sale | 1 onsell | on_sale |
//! | on_sale | 2 off-sell | off_sale |
//! | on_sale, off_sale | 3 delist | delisted (final; purchases kept, frozen) |
//!
//! Purchases: `reserved` (row 4) → `active` (row 5) ⇄ `frozen` (rows 6, 10) → `unsubscribed`
//! (row 11). `order_id` makes row 5 idempotent: the order id is the purchase's claim in the
//! store, so of concurrent duplicates (on any replica) one commits, the others are refused,
//! run again on a view that holds the winner's purchase, and answer it: one purchase, the same
//! answer.
//!
//! Must not touch API definitions or apps other than the MARKET app a purchase creates.

use axum::extract::State as AxState;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::config::Role;
use crate::lease::Ledger;
use crate::snapshot::{MarketState, PurchaseState};

use super::auth::Call;
use super::error::ControlError;
use super::management::{new_app_code, new_credential, reply, DEFAULT_PAGE_LIMIT, MAX_PAGE_LIMIT};
use super::market_requests::{self as requests, PurchaseNamed, PurchaseOrder};
use super::rule;
use super::state::{
    new_id, now_rfc3339, rfc3339, AppCodeRec, AppRec, Change, GroupRec, LedgerDoc, PurchaseRec,
    State, KIND_GROUP,
};
use super::store::LedgerUpdate;
use super::ControlPlane;

type Handler = Result<Response, ControlError>;

/// Longest market domain, in characters.
const MAX_URL_DOMAIN_CHARS: usize = 255;

/// The group named by the path, owned by the acting (seller) domain.
fn seller_group<'a>(
    state: &'a State,
    call: &Call,
    seller: &str,
    missing_is_400: bool,
) -> Result<&'a GroupRec, ControlError> {
    let id = call.param("group_id");
    let group = state.groups.get(id).ok_or_else(|| match missing_is_400 {
        true => ControlError::GroupNotFoundBadRequest(id.to_owned()),
        false => ControlError::GroupNotFound(id.to_owned()),
    })?;
    if group.domain_id != seller {
        return Err(ControlError::Forbidden(format!(
            "the API group {id} does not belong to domain {seller}"
        )));
    }
    Ok(group)
}

/// The acting domain where the row requires `X-Domain-Id`.
fn required_domain(call: &Call) -> Result<String, ControlError> {
    call.acting_domain(true)?
        .ok_or(ControlError::MissingHeader("X-Domain-Id"))
}

/// A market `url_domain` or a seller's bound domain (lower-cased): refused with its rule.
pub(crate) fn check_url_domain(url_domain: &str) -> Result<(), ControlError> {
    if valid_url_domain(url_domain) {
        return Ok(());
    }
    Err(rule::invalid(
        "url_domain",
        format!(
            "must be a domain name of at most {MAX_URL_DOMAIN_CHARS} characters with at \
             least one dot; each label 1 to 63 of a-z, 0-9 and -, not starting or ending \
             with - (got \"{url_domain}\")"
        ),
    ))
}

fn valid_url_domain(domain: &str) -> bool {
    domain.len() <= MAX_URL_DOMAIN_CHARS
        && domain.contains('.')
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}

/// Row 1: list the group under `url_domain`.
pub async fn onsell(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    call.check_instance(&cp, false)?;
    call.market_project()?;
    let seller = required_domain(&call)?;
    let url_domain = call.body::<requests::Onsell>()?.validate()?;
    let mut state = cp.state().await?;
    let mut group = seller_group(&state, &call, &seller, false)?.clone();
    match group.market_state {
        MarketState::Delisted => return Err(ControlError::Delisted(group.id)),
        MarketState::Unlisted
        | MarketState::Locked
        | MarketState::OffSale
        | MarketState::OnSale => {}
    }
    // A bound domain is a record of its own (its claim's owner), even in this group.
    let bound = state.domains.values().any(|d| d.url_domain == url_domain);
    if bound
        || state
            .domain_owner(&url_domain)
            .is_some_and(|owner| owner != group.id)
    {
        return Err(ControlError::UrlDomainTaken(url_domain));
    }
    if !state.has_sellable_api(&group.id) {
        return Err(ControlError::NoSellableApi(group.id));
    }
    group.market_state = MarketState::OnSale;
    group.url_domain = Some(url_domain);
    group.update_time = now_rfc3339();
    let out = json!({"id": group.id, "name": group.name, "remark": group.remark,
                     "update_time": group.update_time, "url_domain": group.url_domain});
    cp.commit(&mut state, vec![Change::Group(group)]).await?;
    Ok(reply(StatusCode::CREATED, out))
}

/// Row 2: take off sale; buyers keep calling.
pub async fn offsell(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    call.check_instance(&cp, false)?;
    call.market_project()?;
    let seller = required_domain(&call)?;
    let mut state = cp.state().await?;
    let mut group = seller_group(&state, &call, &seller, false)?.clone();
    match group.market_state {
        MarketState::OnSale => {}
        MarketState::Unlisted
        | MarketState::Locked
        | MarketState::OffSale
        | MarketState::Delisted => return Err(ControlError::ListingNotFound(group.id)),
    }
    group.market_state = MarketState::OffSale;
    group.update_time = now_rfc3339();
    cp.commit(&mut state, vec![Change::Group(group)]).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Row 3: delist; every buyer is refused, purchases are kept (frozen).
pub async fn delist(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    call.check_instance(&cp, true)?;
    call.market_project()?;
    let seller = required_domain(&call)?;
    let mut state = cp.state().await?;
    let mut group = seller_group(&state, &call, &seller, true)?.clone();
    match group.market_state {
        MarketState::Delisted => return Ok(StatusCode::NO_CONTENT.into_response()),
        MarketState::OnSale | MarketState::OffSale => {}
        MarketState::Unlisted | MarketState::Locked => {
            return Err(ControlError::NeverListed(group.id))
        }
    }
    let now = now_rfc3339();
    let mut changes: Vec<Change> = state
        .purchases
        .values()
        .filter(|p| p.group_id == group.id && p.state == PurchaseState::Active)
        .map(|p| {
            let mut p = p.clone();
            p.state = PurchaseState::Frozen;
            p.update_time = now.clone();
            Change::Purchase(p)
        })
        .collect();
    group.market_state = MarketState::Delisted;
    group.update_time = now;
    changes.push(Change::Group(group));
    cp.commit(&mut state, changes).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A group a buyer may reserve or buy: exists, not the buyer's own, on sale.
fn buyable<'a>(
    state: &'a State,
    group_id: &str,
    buyer: &str,
    missing_is_400: bool,
) -> Result<&'a GroupRec, ControlError> {
    let group = state
        .groups
        .get(group_id)
        .ok_or_else(|| match missing_is_400 {
            true => ControlError::GroupNotFoundBadRequest(group_id.to_owned()),
            false => ControlError::GroupNotFound(group_id.to_owned()),
        })?;
    if group.domain_id == buyer {
        return Err(ControlError::CannotBuyOwnGroup(group.id.clone()));
    }
    match group.market_state {
        MarketState::OnSale => Ok(group),
        MarketState::Unlisted
        | MarketState::Locked
        | MarketState::OffSale
        | MarketState::Delisted => Err(ControlError::NotOnSale(group.id.clone())),
    }
}

/// Row 4: pre-order.
pub async fn reserve(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    call.check_instance(&cp, true)?;
    let project = call.market_project()?;
    let buyer = required_domain(&call)?;
    let group_id = call.body::<requests::Reserve>()?.validate()?;
    let mut state = cp.state().await?;
    buyable(&state, &group_id, &buyer, true)?;
    let now = now_rfc3339();
    let purchase = PurchaseRec {
        purchase_id: new_id(),
        order_id: None,
        group_id: group_id.clone(),
        domain_id: buyer,
        project_id: project,
        state: PurchaseState::Reserved,
        order_type: None,
        start_time: 0,
        expire_time: 0,
        req_quota: None,
        quota_limit: None,
        quota_used: 0,
        app_id: None,
        create_time: now.clone(),
        update_time: now,
    };
    let out = json!({"group_id": group_id, "purchase_id": purchase.purchase_id});
    // Decided on the group being on sale: it must still be at commit.
    let reads = [(KIND_GROUP, group_id.as_str())];
    cp.commit_with(&mut state, &reads, vec![Change::Purchase(purchase)], None)
        .await?;
    Ok(reply(StatusCode::CREATED, out))
}

fn purchase_answer(state: &State, p: &PurchaseRec) -> Value {
    let app = p.app_id.as_ref().and_then(|id| state.apps.get(id));
    json!({
        "purchase_id": p.purchase_id,
        "order_id": p.order_id,
        "group_id": p.group_id,
        "start_time": rfc3339(p.start_time),
        "expire_time": rfc3339(p.expire_time),
        "req_quota": p.req_quota,
        "order_type": p.order_type,
        "app_key": app.map(|a| a.app_key.clone()),
        "app_secret": app.map(|a| a.app_secret.clone()),
    })
}

/// What a purchase request asks for, compared with the purchase an `order_id` already made.
struct Bought {
    start_time: i64,
    expire_time: i64,
    order_type: u8,
    req_quota: Option<u64>,
}

impl Bought {
    /// `None` when `existing` was bought with this content, else the fields that differ
    /// (`req_quota 100, this request 200`).
    fn differs_from(&self, existing: &PurchaseRec) -> Option<String> {
        let show = |q: Option<u64>| q.map_or_else(|| "unlimited".to_owned(), |q| q.to_string());
        let mut differs = Vec::new();
        if existing.req_quota != self.req_quota {
            differs.push(format!(
                "req_quota {} (this request: {})",
                show(existing.req_quota),
                show(self.req_quota)
            ));
        }
        if existing.order_type != Some(self.order_type) {
            differs.push(format!(
                "order_type {} (this request: {})",
                existing.order_type.map_or(0, i64::from),
                self.order_type
            ));
        }
        if existing.start_time != self.start_time {
            differs.push(format!(
                "start_time {} (this request: {})",
                existing.start_time, self.start_time
            ));
        }
        if existing.expire_time != self.expire_time {
            differs.push(format!(
                "expire_time {} (this request: {})",
                existing.expire_time, self.expire_time
            ));
        }
        (!differs.is_empty()).then(|| differs.join(", "))
    }
}

/// Row 5: buy. Idempotent on `order_id`: the same content again answers the same purchase; a
/// different content under the same `order_id` is 409 naming what differs.
pub async fn purchase(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    call.check_instance(&cp, false)?;
    let project = call.market_project()?;
    let buyer = required_domain(&call)?;
    let PurchaseOrder {
        order_id,
        group_id,
        start_time,
        expire_time,
        order_type,
        req_quota,
        reservation,
    } = call.body::<requests::Purchase>()?.validate()?;
    let mut state = cp.state().await?;
    if let Some(existing) = state.purchase_of_order(&order_id) {
        if existing.group_id != group_id || existing.domain_id != buyer {
            return Err(ControlError::Conflict(format!(
                "order_id {order_id} belongs to another purchase"
            )));
        }
        let asked = Bought {
            start_time,
            expire_time,
            order_type,
            req_quota,
        };
        if let Some(differs) = asked.differs_from(existing) {
            return Err(ControlError::Conflict(format!(
                "order_id {order_id} was already bought as purchase {} with {differs}; an \
                 order_id is one purchase: replay it with the same content, or use a new \
                 order_id",
                existing.purchase_id
            )));
        }
        return Ok(reply(
            StatusCode::CREATED,
            purchase_answer(&state, existing),
        ));
    }
    buyable(&state, &group_id, &buyer, false)?;
    let now = now_rfc3339();
    let mut purchase = match reservation {
        Some(id) => {
            let reserved = state
                .purchases
                .get(&id)
                .filter(|p| p.domain_id == buyer)
                .ok_or_else(|| ControlError::PurchaseNotFound(id.clone()))?;
            if reserved.state != PurchaseState::Reserved || reserved.group_id != group_id {
                return Err(ControlError::Conflict(format!(
                    "purchase {id} is not a reservation of group {group_id}"
                )));
            }
            reserved.clone()
        }
        None => PurchaseRec {
            purchase_id: new_id(),
            order_id: None,
            group_id: group_id.clone(),
            domain_id: buyer.clone(),
            project_id: project.clone(),
            state: PurchaseState::Reserved,
            order_type: None,
            start_time: 0,
            expire_time: 0,
            req_quota: None,
            quota_limit: None,
            quota_used: 0,
            app_id: None,
            create_time: now.clone(),
            update_time: now.clone(),
        },
    };
    let app = AppRec {
        id: new_id(),
        name: format!("market_{}", &purchase.purchase_id),
        remark: format!("purchase {}", purchase.purchase_id),
        app_key: new_credential(),
        app_secret: new_credential(),
        domain_id: buyer,
        project_id: project,
        creator: "MARKET".into(),
        codes: vec![AppCodeRec {
            id: new_id(),
            app_code: new_app_code(),
            create_time: now.clone(),
        }],
        register_time: now.clone(),
        update_time: now.clone(),
    };
    purchase.order_id = Some(order_id);
    purchase.state = PurchaseState::Active;
    purchase.order_type = Some(order_type);
    purchase.start_time = start_time;
    purchase.expire_time = expire_time;
    purchase.req_quota = req_quota;
    purchase.quota_limit = req_quota;
    purchase.app_id = Some(app.id.clone());
    purchase.update_time = now;
    let purchase_id = purchase.purchase_id.clone();
    // The ledger row, in the same transaction: the calls bought.
    let ledger = LedgerUpdate {
        ids: vec![purchase_id.clone()],
        apply: Box::new(move |rows| {
            let mut ledger = rows[0]
                .1
                .as_deref()
                .and_then(|doc| LedgerDoc::parse(doc).ok())
                .unwrap_or_default();
            ledger.limit = req_quota;
            rows[0].1 = Some(LedgerDoc::render(&ledger));
        }),
    };
    // Decided on the group being on sale: it must still be at commit. The order_id is the
    // purchase's claim: a concurrent purchase of the same order (on any replica) loses it,
    // runs again, and answers this purchase.
    let reads = [(KIND_GROUP, group_id.as_str())];
    cp.commit_with(
        &mut state,
        &reads,
        vec![Change::App(app), Change::Purchase(purchase)],
        Some(ledger),
    )
    .await?;
    let out = purchase_answer(&state, &state.purchases[&purchase_id]);
    Ok(reply(StatusCode::CREATED, out))
}

fn state_name(state: PurchaseState) -> &'static str {
    match state {
        PurchaseState::Reserved => "reserved",
        PurchaseState::Active => "active",
        PurchaseState::Frozen => "frozen",
        PurchaseState::Unsubscribed => "unsubscribed",
    }
}

/// The buyer's view of a purchase (row 12, and the answer of row 6), with the live figures of
/// its ledger where the store has one (else the copy of the last market write). A purchase
/// of a delisted group shows as frozen: a purchase committed while its group was being
/// delisted (on another replica) is refused like the others.
fn purchase_view(state: &State, p: &PurchaseRec, ledger: Option<&Ledger>) -> Value {
    let app = p.app_id.as_ref().and_then(|id| state.apps.get(id));
    let group = state.groups.get(&p.group_id);
    let delisted = group.is_some_and(|g| g.market_state == MarketState::Delisted);
    let shown = match p.state {
        PurchaseState::Active if delisted => PurchaseState::Frozen,
        other => other,
    };
    let (limit, used, left) = match ledger {
        Some(l) => (l.limit, l.used, l.calls_left()),
        None => (p.quota_limit, p.quota_used, p.calls_left()),
    };
    json!({
        "purchase_id": p.purchase_id,
        "order_id": p.order_id,
        "group_id": p.group_id,
        "group_name": group.map(|g| g.name.clone()),
        "url_domain": group.and_then(|g| g.url_domain.clone()),
        "state": state_name(shown),
        "order_type": p.order_type,
        "start_time": rfc3339(p.start_time),
        "expire_time": rfc3339(p.expire_time),
        "req_quota": p.req_quota,
        "quota_limit": limit,
        "quota_used": used,
        "quota_left": left,
        "app_id": p.app_id,
        "app_key": app.map(|a| a.app_key.clone()),
        "create_time": p.create_time,
        "update_time": p.update_time,
    })
}

/// Row 6: `unused <= 0` freezes; `unused > 0` unfreezes with `unused` calls left.
pub async fn set_unused(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    call.check_instance(&cp, false)?;
    let path_project = call.market_project()?;
    let buyer = call.acting_domain(false)?;
    let (unused, named) = call.body::<requests::SetUnused>()?.validate()?;
    let mut state = cp.state().await?;
    let found = match named {
        PurchaseNamed::ById(id) => state.purchases.get(&id),
        PurchaseNamed::ByGroup {
            group_id,
            project_id,
        } => {
            let project = project_id.unwrap_or(path_project);
            state
                .purchases
                .values()
                .filter(|p| {
                    p.group_id == group_id
                        && p.project_id == project
                        && matches!(p.state, PurchaseState::Active | PurchaseState::Frozen)
                })
                .max_by(|a, b| a.create_time.cmp(&b.create_time))
        }
    };
    let mut purchase = found
        .filter(|p| buyer.as_ref().is_none_or(|d| &p.domain_id == d))
        .cloned()
        .ok_or_else(|| ControlError::PurchaseNotFound("for this group and project".into()))?;
    match purchase.state {
        PurchaseState::Active | PurchaseState::Frozen => {}
        PurchaseState::Reserved | PurchaseState::Unsubscribed => {
            return Err(ControlError::Conflict(format!(
                "purchase {} is {}",
                purchase.purchase_id,
                state_name(purchase.state)
            )))
        }
    }
    if unused <= 0 {
        purchase.state = PurchaseState::Frozen;
    } else {
        let delisted = state
            .groups
            .get(&purchase.group_id)
            .is_some_and(|g| g.market_state == MarketState::Delisted);
        if delisted {
            return Err(ControlError::Delisted(purchase.group_id));
        }
        purchase.state = PurchaseState::Active;
    }
    let id = purchase.purchase_id.clone();
    let ledger = match unused > 0 {
        false => None,
        true => {
            // In `serve`, the calls already answered are in the ledger before "calls left"
            // is set: the buyer then has exactly `unused` more.
            cp.report_local_usage(std::slice::from_ref(&id)).await;
            // The snapshot's copy, from the ledger as it stands; the ledger itself is set
            // under its row lock in the same transaction (reports may land in between).
            let live = cp
                .ledger(&id)
                .await
                .unwrap_or_else(|| Ledger::new(purchase.quota_limit, purchase.quota_used));
            purchase.quota_used = live.used;
            purchase.quota_limit = Some(live.used + unused as u64);
            let fallback = live;
            Some(LedgerUpdate {
                ids: vec![id.clone()],
                apply: Box::new(move |rows| {
                    let mut ledger = rows[0]
                        .1
                        .as_deref()
                        .and_then(|doc| LedgerDoc::parse(doc).ok())
                        .unwrap_or(fallback);
                    // Leases above what is now left shrink (docs/quota-leases.md, "Market
                    // changes").
                    ledger.set_calls_left(unused as u64);
                    rows[0].1 = Some(LedgerDoc::render(&ledger));
                }),
            })
        }
    };
    purchase.update_time = now_rfc3339();
    cp.commit_with(&mut state, &[], vec![Change::Purchase(purchase)], ledger)
        .await?;
    let live = cp.ledger(&id).await;
    Ok(reply(
        StatusCode::OK,
        purchase_view(&state, &state.purchases[&id], live.as_ref()),
    ))
}

/// Row 7: lock for market review (3) / unlock (2).
pub async fn lock(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    call.check_instance(&cp, false)?;
    call.market_project()?;
    let seller = required_domain(&call)?;
    let lock = call.body::<requests::Status>()?.lock()?;
    let mut state = cp.state().await?;
    let mut group = seller_group(&state, &call, &seller, false)?.clone();
    let to = match (lock, group.market_state) {
        (true, MarketState::Unlisted | MarketState::Locked) => MarketState::Locked,
        (false, MarketState::Locked | MarketState::Unlisted) => MarketState::Unlisted,
        (_, from) => {
            return Err(ControlError::Conflict(format!(
                "the API group {} is {}",
                group.id,
                from.as_str()
            )))
        }
    };
    group.market_state = to;
    group.update_time = now_rfc3339();
    let out = json!({"id": group.id, "name": group.name, "remark": group.remark,
                     "update_time": group.update_time, "status": if lock { 3 } else { 2 }});
    cp.commit(&mut state, vec![Change::Group(group)]).await?;
    Ok(reply(StatusCode::CREATED, out))
}

/// `{total, size, groups}` with `page_no` (1-based) and `page_size`.
fn market_groups(
    call: &Call,
    state: &State,
    keep: impl Fn(&GroupRec) -> bool,
) -> Result<Response, ControlError> {
    let domain = call.acting_domain(false)?;
    let num = |name: &str| call.query.get(name).and_then(|v| v.parse::<i64>().ok());
    let size = match num("page_size") {
        Some(s) if s > 0 => (s as usize).min(MAX_PAGE_LIMIT),
        _ => DEFAULT_PAGE_LIMIT,
    };
    let page_no = num("page_no").unwrap_or(1).max(1) as usize;
    let name = call.query.get("name").filter(|n| !n.is_empty());
    let all: Vec<Value> = state
        .groups
        .values()
        .filter(|g| domain.as_ref().is_none_or(|d| &g.domain_id == d))
        .filter(|g| name.is_none_or(|n| g.name.contains(n.as_str())))
        .filter(|g| keep(g))
        .map(|g| {
            json!({"id": g.id, "name": g.name, "remark": g.remark, "url_domain": g.url_domain,
                   "market_state": g.market_state.as_str(), "update_time": g.update_time,
                   "sl_domain": g.sl_domain})
        })
        .collect();
    let total = all.len();
    let groups: Vec<Value> = all
        .into_iter()
        .skip((page_no - 1) * size)
        .take(size)
        .collect();
    Ok(reply(
        StatusCode::OK,
        json!({"total": total, "size": groups.len(), "groups": groups}),
    ))
}

/// Row 8: groups that could be listed.
pub async fn list_tosell(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    call.check_instance(&cp, false)?;
    call.market_project()?;
    let state = cp.state().await?;
    market_groups(&call, &state, |g| {
        matches!(
            g.market_state,
            MarketState::Unlisted | MarketState::Locked | MarketState::OffSale
        ) && state.has_sellable_api(&g.id)
    })
}

/// Row 9: listed groups.
pub async fn list_onsell(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    call.check_instance(&cp, false)?;
    call.market_project()?;
    let state = cp.state().await?;
    market_groups(&call, &state, |g| g.market_state == MarketState::OnSale)
}

/// Row 10: freeze (3) / unfreeze (1) purchases by list; one result per purchase.
pub async fn freeze(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    call.check_instance(&cp, false)?;
    call.market_project()?;
    let domain = call.acting_domain(false)?;
    let (freeze, ids) = call.body::<requests::Status>()?.freeze()?;
    let mut state = cp.state().await?;
    let now = now_rfc3339();
    let (mut results, mut changes) = (Vec::new(), Vec::new());
    for id in ids {
        let outcome = match state
            .purchases
            .get(&id)
            .filter(|p| domain.as_ref().is_none_or(|d| &p.domain_id == d))
        {
            None => Err(ControlError::PurchaseNotFound(id.clone())),
            Some(p) => match (p.state, freeze) {
                (PurchaseState::Active | PurchaseState::Frozen, true) => Ok(PurchaseState::Frozen),
                (PurchaseState::Active | PurchaseState::Frozen, false) => {
                    let delisted = state
                        .groups
                        .get(&p.group_id)
                        .is_some_and(|g| g.market_state == MarketState::Delisted);
                    if delisted {
                        Err(ControlError::Delisted(p.group_id.clone()))
                    } else {
                        Ok(PurchaseState::Active)
                    }
                }
                (PurchaseState::Reserved | PurchaseState::Unsubscribed, _) => Err(
                    ControlError::Conflict(format!("purchase {id} is {}", state_name(p.state))),
                ),
            },
        };
        match outcome {
            Ok(to) => {
                let mut p = state.purchases[&id].clone();
                p.state = to;
                p.update_time = now.clone();
                changes.push(Change::Purchase(p));
                results
                    .push(json!({"purchase_id": id, "result": "success", "state": state_name(to)}));
            }
            Err(e) => {
                let (_, code) = e.status_and_code();
                results.push(json!({"purchase_id": id, "result": "failed", "error_code": code, "error_msg": e.to_string()}));
            }
        }
    }
    if !changes.is_empty() {
        cp.commit(&mut state, changes).await?;
    }
    Ok(reply(StatusCode::OK, json!({"results": results})))
}

/// The purchase named by the path, visible to the acting (buyer) domain.
fn buyer_purchase<'a>(state: &'a State, call: &Call) -> Result<&'a PurchaseRec, ControlError> {
    let id = call.param("purchase_id");
    let domain = call.acting_domain(false)?;
    let purchase = state
        .purchases
        .get(id)
        .ok_or_else(|| ControlError::PurchaseNotFound(id.to_owned()))?;
    match domain {
        Some(d) if d != purchase.domain_id => Err(ControlError::Forbidden(format!(
            "the purchase {id} is not domain {d}'s"
        ))),
        Some(_) | None => Ok(purchase),
    }
}

/// Row 11: end a purchase; its APP stops working.
pub async fn unsubscribe(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    call.check_instance(&cp, false)?;
    call.market_project()?;
    let mut state = cp.state().await?;
    let mut purchase = buyer_purchase(&state, &call)?.clone();
    if purchase.state == PurchaseState::Unsubscribed {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    purchase.state = PurchaseState::Unsubscribed;
    purchase.update_time = now_rfc3339();
    cp.commit(&mut state, vec![Change::Purchase(purchase)])
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Row 12: the buyer's purchases.
pub async fn list_purchases(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    call.check_instance(&cp, false)?;
    let project = call.market_project()?;
    let domain = call.acting_domain(false)?;
    let state = cp.state().await?;
    let mut items: Vec<&PurchaseRec> = state
        .purchases
        .values()
        .filter(|p| {
            p.project_id == project || call.principal.role == Role::Market && domain.is_some()
        })
        .filter(|p| domain.as_ref().is_none_or(|d| &p.domain_id == d))
        .filter(|p| {
            call.query
                .get("group_id")
                .is_none_or(|g| g.is_empty() || g == &p.group_id)
        })
        .collect();
    items.sort_by(|a, b| a.create_time.cmp(&b.create_time));
    let ids: Vec<String> = items.iter().map(|p| p.purchase_id.clone()).collect();
    cp.report_local_usage(&ids).await;
    let ledgers = cp.ledgers_of(ids).await?;
    let views = items
        .into_iter()
        .map(|p| purchase_view(&state, p, ledgers.get(&p.purchase_id)))
        .collect();
    Ok(super::management::page(&call, "purchases", views))
}

/// Row 12: one purchase.
pub async fn show_purchase(AxState(cp): AxState<ControlPlane>, call: Call) -> Handler {
    call.check_instance(&cp, false)?;
    call.market_project()?;
    let state = cp.state().await?;
    let purchase = buyer_purchase(&state, &call)?;
    cp.report_local_usage(std::slice::from_ref(&purchase.purchase_id))
        .await;
    let live = cp.ledger(&purchase.purchase_id).await;
    Ok(reply(
        StatusCode::OK,
        purchase_view(&state, purchase, live.as_ref()),
    ))
}
