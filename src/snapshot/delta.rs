//! Snapshot deltas (`PATCH /v1/snapshot`): what changed between two versions, so that a large
//! market does not resend every purchase after each change.
//!
//! A delta names the version it applies to (`from_version`) and the version it produces;
//! entities are replaced whole by id or removed by id. [`diff`] computes one from two full
//! snapshots (control plane); [`apply`] rebuilds the full snapshot from the base (data
//! plane), which then validates and compiles it exactly like a full push. A proxy whose
//! version is not `from_version` refuses the delta and is sent the full snapshot.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashTable};

use serde::{Deserialize, Serialize};

use super::wire::{App, AppAuth, Certificate, Domain, Group, Purchase, Snapshot, Throttling};

/// The changes from `from_version` to `version`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Delta {
    pub from_version: u64,
    pub version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generated_at: Option<String>,
    /// Groups added or changed, whole (with all their APIs).
    #[serde(default)]
    pub groups: Vec<Group>,
    #[serde(default)]
    pub removed_groups: Vec<String>,
    #[serde(default)]
    pub apps: Vec<App>,
    #[serde(default)]
    pub removed_apps: Vec<String>,
    #[serde(default)]
    pub purchases: Vec<Purchase>,
    #[serde(default)]
    pub removed_purchases: Vec<String>,
    /// App authorizations are small: when any changed, the whole list is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_auths: Option<Vec<AppAuth>>,
    /// Certificates likewise: the whole list when any changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificates: Option<Vec<Certificate>>,
    /// Bound domains likewise (at most five per group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domains: Option<Vec<Domain>>,
    /// Throttling policies likewise: the whole set when any changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttling: Option<Throttling>,
}

/// Why a delta could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    #[error("delta applies to version {from_version}, this proxy has {current:?}")]
    WrongBase {
        from_version: u64,
        current: Option<u64>,
    },
    #[error("delta version {version} is not greater than its base {from_version}")]
    NotNewer { from_version: u64, version: u64 },
}

impl Delta {
    /// Nothing but the version changes.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
            && self.removed_groups.is_empty()
            && self.apps.is_empty()
            && self.removed_apps.is_empty()
            && self.purchases.is_empty()
            && self.removed_purchases.is_empty()
            && self.app_auths.is_none()
            && self.certificates.is_none()
            && self.domains.is_none()
            && self.throttling.is_none()
    }

    /// Entities carried, a rough size for choosing between delta and full push.
    pub fn len(&self) -> usize {
        self.groups.len()
            + self.removed_groups.len()
            + self.apps.len()
            + self.removed_apps.len()
            + self.purchases.len()
            + self.removed_purchases.len()
            + self.app_auths.as_ref().map_or(0, Vec::len)
            + self.certificates.as_ref().map_or(0, Vec::len)
            + self.domains.as_ref().map_or(0, Vec::len)
            + self
                .throttling
                .as_ref()
                .map_or(0, |t| t.policies.len() + t.app_users.len())
    }
}

/// The delta that turns `old` into `new`.
pub fn diff(old: &Snapshot, new: &Snapshot) -> Delta {
    let (groups, removed_groups) = diff_by_id(&old.groups, &new.groups, |g| &g.id);
    let (apps, removed_apps) = diff_by_id(&old.apps, &new.apps, |a| &a.id);
    let (purchases, removed_purchases) = diff_by_id(&old.purchases, &new.purchases, |p| &p.id);
    Delta {
        from_version: old.version,
        version: new.version,
        generated_at: new.generated_at.clone(),
        groups,
        removed_groups,
        apps,
        removed_apps,
        purchases,
        removed_purchases,
        app_auths: (old.app_auths != new.app_auths).then(|| new.app_auths.clone()),
        certificates: (old.certificates != new.certificates).then(|| new.certificates.clone()),
        domains: (old.domains != new.domains).then(|| new.domains.clone()),
        throttling: (old.throttling != new.throttling).then(|| new.throttling.clone()),
    }
}

/// The full snapshot that `delta` makes of `base`. Order of entities: the base's order with
/// replacements in place, then additions in the delta's order.
pub fn apply(base: &Snapshot, delta: Delta) -> Result<Snapshot, DeltaError> {
    if base.version != delta.from_version {
        return Err(DeltaError::WrongBase {
            from_version: delta.from_version,
            current: Some(base.version),
        });
    }
    if delta.version <= delta.from_version {
        return Err(DeltaError::NotNewer {
            from_version: delta.from_version,
            version: delta.version,
        });
    }
    Ok(Snapshot {
        version: delta.version,
        generated_at: delta.generated_at,
        groups: merge_by_id(&base.groups, delta.groups, &delta.removed_groups, |g| &g.id),
        apps: merge_by_id(&base.apps, delta.apps, &delta.removed_apps, |a| &a.id),
        purchases: merge_by_id(
            &base.purchases,
            delta.purchases,
            &delta.removed_purchases,
            |p| &p.id,
        ),
        app_auths: delta.app_auths.unwrap_or_else(|| base.app_auths.clone()),
        certificates: delta
            .certificates
            .unwrap_or_else(|| base.certificates.clone()),
        domains: delta.domains.unwrap_or_else(|| base.domains.clone()),
        throttling: delta.throttling.unwrap_or_else(|| base.throttling.clone()),
    })
}

/// Where each app and purchase of a wire snapshot is, by id: what lets [`apply_in_place`]
/// apply a delta in time proportional to the delta, not the market. The tables hold
/// positions only (the ids are the snapshot's own strings).
#[derive(Debug, Default)]
pub struct Positions {
    hasher: DefaultHashBuilder,
    apps: HashTable<u32>,
    purchases: HashTable<u32>,
}

impl Positions {
    /// The positions in `snapshot` (one pass over it).
    pub fn of(snapshot: &Snapshot) -> Positions {
        let hasher = DefaultHashBuilder::default();
        let apps = table(&hasher, &snapshot.apps, |a| &a.id);
        let purchases = table(&hasher, &snapshot.purchases, |p| &p.id);
        Positions {
            hasher,
            apps,
            purchases,
        }
    }

    /// The app `id` of `snapshot` (the one these positions are of).
    pub fn app<'a>(&self, snapshot: &'a Snapshot, id: &str) -> Option<&'a App> {
        find(&self.hasher, &self.apps, &snapshot.apps, |a| &a.id, id).map(|i| &snapshot.apps[i])
    }

    /// The purchase `id` of `snapshot` (the one these positions are of).
    pub fn purchase<'a>(&self, snapshot: &'a Snapshot, id: &str) -> Option<&'a Purchase> {
        find(
            &self.hasher,
            &self.purchases,
            &snapshot.purchases,
            |p| &p.id,
            id,
        )
        .map(|i| &snapshot.purchases[i])
    }
}

fn table<T>(hasher: &DefaultHashBuilder, list: &[T], id: impl Fn(&T) -> &String) -> HashTable<u32> {
    let mut table = HashTable::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        // Fits: validation allows at most 2^32 - 1 apps, and one purchase per app.
        table.insert_unique(hasher.hash_one(id(item).as_str()), i as u32, |&j| {
            hasher.hash_one(id(&list[j as usize]).as_str())
        });
    }
    table
}

fn find<T>(
    hasher: &DefaultHashBuilder,
    table: &HashTable<u32>,
    list: &[T],
    id: impl Fn(&T) -> &String,
    wanted: &str,
) -> Option<usize> {
    table
        .find(hasher.hash_one(wanted), |&i| {
            list.get(i as usize).is_some_and(|item| id(item) == wanted)
        })
        .map(|&i| i as usize)
}

/// Applies `delta` to `snapshot` in place, `positions` kept up to date: the same content as
/// [`apply`] makes, in time proportional to the delta for apps and purchases (groups and
/// the small lists are rebuilt as `apply` does). Order differs from `apply`'s: a removed
/// app or purchase takes the last one's place (order is not content: the content hash and
/// every consumer find entities by id).
pub fn apply_in_place(
    snapshot: &mut Snapshot,
    positions: &mut Positions,
    delta: Delta,
) -> Result<(), DeltaError> {
    if snapshot.version != delta.from_version {
        return Err(DeltaError::WrongBase {
            from_version: delta.from_version,
            current: Some(snapshot.version),
        });
    }
    if delta.version <= delta.from_version {
        return Err(DeltaError::NotNewer {
            from_version: delta.from_version,
            version: delta.version,
        });
    }
    snapshot.version = delta.version;
    snapshot.generated_at = delta.generated_at;
    if !delta.groups.is_empty() || !delta.removed_groups.is_empty() {
        snapshot.groups = merge_by_id(&snapshot.groups, delta.groups, &delta.removed_groups, |g| {
            &g.id
        });
    }
    let hasher = &positions.hasher;
    merge_in_place(
        hasher,
        &mut positions.apps,
        &mut snapshot.apps,
        delta.apps,
        &delta.removed_apps,
        |a| &a.id,
    );
    merge_in_place(
        hasher,
        &mut positions.purchases,
        &mut snapshot.purchases,
        delta.purchases,
        &delta.removed_purchases,
        |p| &p.id,
    );
    if let Some(app_auths) = delta.app_auths {
        snapshot.app_auths = app_auths;
    }
    if let Some(certificates) = delta.certificates {
        snapshot.certificates = certificates;
    }
    if let Some(domains) = delta.domains {
        snapshot.domains = domains;
    }
    if let Some(throttling) = delta.throttling {
        snapshot.throttling = throttling;
    }
    Ok(())
}

/// Removes `removed` (the last entity taking a removed one's place), then replaces each of
/// `changed` in place or appends it.
fn merge_in_place<T>(
    hasher: &DefaultHashBuilder,
    table: &mut HashTable<u32>,
    list: &mut Vec<T>,
    changed: Vec<T>,
    removed: &[String],
    id: impl Fn(&T) -> &String,
) {
    let hash = |text: &str| hasher.hash_one(text);
    for gone in removed {
        let Some(at) = find(hasher, table, list, &id, gone) else {
            continue;
        };
        if let Ok(entry) = table.find_entry(hash(gone), |&i| i as usize == at) {
            entry.remove();
        }
        let last = list.len() - 1;
        if at != last {
            if let Some(moved) = table.find_mut(hash(id(&list[last])), |&i| i as usize == last) {
                *moved = at as u32;
            }
        }
        list.swap_remove(at);
    }
    for item in changed {
        match find(hasher, table, list, &id, id(&item)) {
            Some(at) => list[at] = item,
            None => {
                let at = list.len() as u32;
                let h = hash(id(&item));
                list.push(item);
                table.insert_unique(h, at, |&i| hash(id(&list[i as usize])));
            }
        }
    }
}

fn diff_by_id<T: Clone + PartialEq>(
    old: &[T],
    new: &[T],
    id: impl Fn(&T) -> &String,
) -> (Vec<T>, Vec<String>) {
    let old_by_id: HashMap<&String, &T> = old.iter().map(|item| (id(item), item)).collect();
    let new_ids: HashSet<&String> = new.iter().map(&id).collect();
    let changed = new
        .iter()
        .filter(|item| old_by_id.get(id(item)) != Some(item))
        .cloned()
        .collect();
    let removed = old
        .iter()
        .map(&id)
        .filter(|old_id| !new_ids.contains(old_id))
        .cloned()
        .collect();
    (changed, removed)
}

fn merge_by_id<T: Clone>(
    base: &[T],
    changed: Vec<T>,
    removed: &[String],
    id: impl Fn(&T) -> &String,
) -> Vec<T> {
    let removed: HashSet<&String> = removed.iter().collect();
    let mut replacements: HashMap<String, T> = changed
        .into_iter()
        .map(|item| (id(&item).clone(), item))
        .collect();
    let mut merged: Vec<T> = base
        .iter()
        .filter(|item| !removed.contains(id(item)))
        .map(|item| {
            replacements
                .remove(id(item))
                .unwrap_or_else(|| item.clone())
        })
        .collect();
    // What is left of the replacements is new; sorted by id so equal inputs give equal output.
    let mut added: Vec<(String, T)> = replacements.into_iter().collect();
    added.sort_by(|a, b| a.0.cmp(&b.0));
    merged.extend(added.into_iter().map(|(_, item)| item));
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::wire::{MarketState, PurchaseState};

    fn purchase(id: &str, used: u64) -> Purchase {
        Purchase {
            id: id.into(),
            group_id: "g".into(),
            app_id: "a".into(),
            state: PurchaseState::Active,
            start_time: 0,
            expire_time: 10,
            quota_limit: Some(100),
            quota_used: used,
        }
    }

    fn snapshot(version: u64, purchases: Vec<Purchase>) -> Snapshot {
        Snapshot {
            version,
            groups: vec![Group {
                id: "g".into(),
                name: "g".into(),
                sl_domain: "g.sl".into(),
                url_domain: Some("g.market".into()),
                market_state: MarketState::OnSale,
                apis: vec![],
            }],
            purchases,
            ..Snapshot::default()
        }
    }

    #[test]
    fn diff_then_apply_rebuilds_the_new_snapshot() {
        let old = snapshot(1, vec![purchase("p1", 0), purchase("p2", 0)]);
        let mut new = snapshot(2, vec![purchase("p1", 5), purchase("p3", 0)]);
        new.groups[0].market_state = MarketState::Delisted;
        let delta = diff(&old, &new);
        assert_eq!(delta.removed_purchases, vec!["p2".to_owned()]);
        assert_eq!(delta.purchases.len(), 2);
        assert_eq!(delta.groups.len(), 1);
        assert!(delta.app_auths.is_none());
        let rebuilt = apply(&old, delta).unwrap();
        assert_eq!(rebuilt, new);
    }

    #[test]
    fn unchanged_entities_are_not_sent() {
        let old = snapshot(1, vec![purchase("p1", 0)]);
        let new = snapshot(2, vec![purchase("p1", 0)]);
        let delta = diff(&old, &new);
        assert!(delta.is_empty());
        assert_eq!(apply(&old, delta).unwrap(), new);
    }

    /// In place, with positions, the same content as [`apply`] (by id), whatever the mix of
    /// replacements, removals (the last one's place taken) and additions, and the positions
    /// still find every entity after it.
    #[test]
    fn in_place_makes_what_apply_makes() {
        let purchases =
            |ids: &[(&str, u64)]| ids.iter().map(|&(id, used)| purchase(id, used)).collect();
        let old = snapshot(
            1,
            purchases(&[("p1", 0), ("p2", 0), ("p3", 0), ("p4", 0), ("p5", 0)]),
        );
        let new = snapshot(2, purchases(&[("p5", 9), ("p2", 0), ("p6", 1), ("p0", 0)]));
        let delta = diff(&old, &new);
        let mut in_place = old.clone();
        let mut positions = Positions::of(&in_place);
        apply_in_place(&mut in_place, &mut positions, delta.clone()).unwrap();
        let applied = apply(&old, delta).unwrap();
        let by_id = |s: &Snapshot| {
            let mut p = s.purchases.clone();
            p.sort_by(|a, b| a.id.cmp(&b.id));
            p
        };
        assert_eq!(by_id(&in_place), by_id(&applied));
        assert_eq!(in_place.version, 2);
        for p in &applied.purchases {
            assert_eq!(positions.purchase(&in_place, &p.id), Some(p));
        }
        for gone in ["p1", "p3", "p4"] {
            assert_eq!(positions.purchase(&in_place, gone), None);
        }
    }

    #[test]
    fn wrong_base_is_refused() {
        let old = snapshot(1, vec![]);
        let new = snapshot(3, vec![]);
        let delta = diff(&old, &new);
        let other = snapshot(2, vec![]);
        assert_eq!(
            apply(&other, delta),
            Err(DeltaError::WrongBase {
                from_version: 1,
                current: Some(2)
            })
        );
    }
}
