//! The snapshot feed: how a proxy subscribes to its control plane (docs/snapshot-protocol.md).
//!
//! A proxy long-polls `POST /v1/snapshot/subscribe` on a control plane's admin listener with
//! a [`Poll`]: who it is (node id, incarnation) and what it serves (version and
//! [`ContentHash`]). The control plane answers as soon as it has something newer — a delta
//! when the proxy serves exactly the delta's base, else the full snapshot — or, after holding
//! the poll a while, `204 No Content`. Each poll is also the acknowledgement of what the
//! proxy applied last, so the control plane learns every proxy's version and content from
//! the polls alone.
//!
//! The content hash lets both planes compare *content*, not just version numbers: a proxy
//! that applied a delta to the wrong base, or was handed a snapshot by an operator, shows a
//! hash other than the control plane's for that version and is resynced with a full
//! snapshot. It is order-independent (a wrapping sum of one hash per entity), so a proxy can
//! update it from a delta at the cost of the entities the delta touches plus one scan of ids,
//! without reserializing the market.
//!
//! This module is wire types and arithmetic only: no I/O.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::snapshot::delta::Delta;
use crate::snapshot::{App, Purchase, Snapshot};

/// The path of the subscription on a control plane's admin listener.
pub const SUBSCRIBE_PATH: &str = "/v1/snapshot/subscribe";
/// Answer header: `full` or `delta`, what the body is.
pub const KIND_HEADER: &str = "x-snapshot-kind";
/// Answer header: the control plane's content hash of the version in the body (or, on a
/// 204, of the version it holds).
pub const HASH_HEADER: &str = "x-content-hash";
/// Answer header: the control plane's current version.
pub const VERSION_HEADER: &str = "x-snapshot-version";

/// One long-poll from a proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Poll {
    pub node_id: String,
    /// The life of the proxy's data directory (its lease state's incarnation): two live
    /// proxies with one node id have two incarnations, and the second is refused.
    pub incarnation: String,
    /// The version the proxy serves; `None` before its first snapshot.
    #[serde(default)]
    pub version: Option<u64>,
    /// The content hash of what it serves.
    #[serde(default)]
    pub content_hash: Option<String>,
    /// Why the last snapshot or delta it was sent was not applied, if it was not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// The order-independent hash of a snapshot's content (not its version or `generated_at`):
/// the wrapping sum of SHA-256 (first 8 bytes) of each entity's JSON with its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ContentHash(pub u64);

impl std::fmt::Display for ContentHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl std::str::FromStr for ContentHash {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<ContentHash, Self::Err> {
        u64::from_str_radix(s, 16).map(ContentHash)
    }
}

/// The kinds of entity, so that equal JSON of two kinds hashes apart.
#[derive(Clone, Copy)]
enum Kind {
    Group = 1,
    App = 2,
    Purchase = 3,
    AppAuth = 4,
    Certificate = 5,
    Domain = 6,
}

fn entity<T: Serialize>(kind: Kind, value: &T) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update([kind as u8]);
    let json = serde_json::to_vec(value).expect("wire types serialize");
    hasher.update(&json);
    let digest = hasher.finalize();
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

fn sum<'a, T: Serialize + 'a>(kind: Kind, items: impl IntoIterator<Item = &'a T>) -> u64 {
    items
        .into_iter()
        .fold(0u64, |acc, item| acc.wrapping_add(entity(kind, item)))
}

impl ContentHash {
    /// The hash of `snapshot`'s whole content: one pass over every entity.
    pub fn of(snapshot: &Snapshot) -> ContentHash {
        ContentHash(
            sum(Kind::Group, &snapshot.groups)
                .wrapping_add(sum(Kind::App, &snapshot.apps))
                .wrapping_add(sum(Kind::Purchase, &snapshot.purchases))
                .wrapping_add(sum(Kind::AppAuth, &snapshot.app_auths))
                .wrapping_add(sum(Kind::Certificate, &snapshot.certificates))
                .wrapping_add(sum(Kind::Domain, &snapshot.domains)),
        )
    }

    /// The hash of what `delta` makes of `base`, given `self` is `base`'s hash: the entities
    /// the delta replaces or removes are subtracted, those it carries added. Faithful to the
    /// content whatever `self` was computed from, so a wrong base stays visible. A pass over
    /// the base's apps and purchases (see [`ContentHash::after_delta_found`]).
    pub fn after_delta(self, base: &Snapshot, delta: &Delta) -> ContentHash {
        fn replaced<T: Serialize>(
            kind: Kind,
            base: &[T],
            id: impl Fn(&T) -> &str,
            touched: &HashSet<&str>,
        ) -> u64 {
            if touched.is_empty() {
                return 0;
            }
            sum(kind, base.iter().filter(|item| touched.contains(id(item))))
        }
        let (app_ids, purchase_ids) = touched(delta);
        let apps = replaced(Kind::App, &base.apps, |a| &a.id, &app_ids);
        let purchases = replaced(Kind::Purchase, &base.purchases, |p| &p.id, &purchase_ids);
        self.after_delta_with(base, delta, apps, purchases)
    }

    /// [`ContentHash::after_delta`] with the base's apps and purchases found by id
    /// (`app`, `purchase`: e.g. `delta::Positions`) rather than by a pass over them: time
    /// proportional to the delta.
    pub fn after_delta_found<'a>(
        self,
        base: &'a Snapshot,
        delta: &Delta,
        app: impl Fn(&str) -> Option<&'a App>,
        purchase: impl Fn(&str) -> Option<&'a Purchase>,
    ) -> ContentHash {
        let (app_ids, purchase_ids) = touched(delta);
        let apps = sum(Kind::App, app_ids.iter().filter_map(|id| app(id)));
        let purchases = sum(
            Kind::Purchase,
            purchase_ids.iter().filter_map(|id| purchase(id)),
        );
        self.after_delta_with(base, delta, apps, purchases)
    }

    /// The rest of [`ContentHash::after_delta`], given the hashes of the base's apps and
    /// purchases the delta replaces or removes.
    fn after_delta_with(
        self,
        base: &Snapshot,
        delta: &Delta,
        replaced_apps: u64,
        replaced_purchases: u64,
    ) -> ContentHash {
        let group_ids: HashSet<&str> = delta
            .groups
            .iter()
            .map(|g| g.id.as_str())
            .chain(delta.removed_groups.iter().map(String::as_str))
            .collect();
        let replaced_groups = if group_ids.is_empty() {
            0
        } else {
            sum(
                Kind::Group,
                base.groups
                    .iter()
                    .filter(|g| group_ids.contains(g.id.as_str())),
            )
        };
        let mut hash = self.0;
        hash = hash
            .wrapping_sub(replaced_groups)
            .wrapping_sub(replaced_apps)
            .wrapping_sub(replaced_purchases);
        hash = hash
            .wrapping_add(sum(Kind::Group, &delta.groups))
            .wrapping_add(sum(Kind::App, &delta.apps))
            .wrapping_add(sum(Kind::Purchase, &delta.purchases));
        if let Some(auths) = &delta.app_auths {
            hash = hash
                .wrapping_sub(sum(Kind::AppAuth, &base.app_auths))
                .wrapping_add(sum(Kind::AppAuth, auths));
        }
        if let Some(certificates) = &delta.certificates {
            hash = hash
                .wrapping_sub(sum(Kind::Certificate, &base.certificates))
                .wrapping_add(sum(Kind::Certificate, certificates));
        }
        if let Some(domains) = &delta.domains {
            hash = hash
                .wrapping_sub(sum(Kind::Domain, &base.domains))
                .wrapping_add(sum(Kind::Domain, domains));
        }
        ContentHash(hash)
    }
}

/// The ids of the apps and of the purchases `delta` replaces or removes (each once).
fn touched(delta: &Delta) -> (HashSet<&str>, HashSet<&str>) {
    let apps = delta
        .apps
        .iter()
        .map(|a| a.id.as_str())
        .chain(delta.removed_apps.iter().map(String::as_str))
        .collect();
    let purchases = delta
        .purchases
        .iter()
        .map(|p| p.id.as_str())
        .chain(delta.removed_purchases.iter().map(String::as_str))
        .collect();
    (apps, purchases)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{delta, Group, MarketState};

    fn group(id: &str, name: &str) -> Group {
        Group {
            id: id.into(),
            name: name.into(),
            sl_domain: format!("{id}.sl.example.com"),
            url_domain: None,
            market_state: MarketState::Unlisted,
            apis: Vec::new(),
        }
    }

    fn snapshot(version: u64, groups: Vec<Group>) -> Snapshot {
        Snapshot {
            version,
            groups,
            ..Snapshot::default()
        }
    }

    #[test]
    fn order_and_version_do_not_count_content_does() {
        let a = snapshot(1, vec![group("g1", "a"), group("g2", "b")]);
        let b = snapshot(7, vec![group("g2", "b"), group("g1", "a")]);
        assert_eq!(ContentHash::of(&a), ContentHash::of(&b));
        let c = snapshot(1, vec![group("g1", "a"), group("g2", "c")]);
        assert_ne!(ContentHash::of(&a), ContentHash::of(&c));
        let text = ContentHash::of(&a).to_string();
        assert_eq!(text.parse::<ContentHash>().unwrap(), ContentHash::of(&a));
    }

    #[test]
    fn a_delta_updates_the_hash_as_a_full_pass_would() {
        let old = snapshot(
            1,
            vec![group("g1", "a"), group("g2", "b"), group("g3", "x")],
        );
        let new = snapshot(
            2,
            vec![group("g1", "a"), group("g2", "B"), group("g4", "y")],
        );
        let d = delta::diff(&old, &new);
        let updated = ContentHash::of(&old).after_delta(&old, &d);
        assert_eq!(updated, ContentHash::of(&new));
        // The same delta on another base (g2 differs there) gives another hash than the
        // control plane's: the wrong base shows.
        let wrong = snapshot(
            1,
            vec![group("g1", "other"), group("g2", "b"), group("g3", "x")],
        );
        let applied = delta::apply(&wrong, d.clone()).unwrap();
        let hash = ContentHash::of(&wrong).after_delta(&wrong, &d);
        assert_eq!(hash, ContentHash::of(&applied));
        assert_ne!(hash, ContentHash::of(&new));
    }

    #[test]
    fn bound_domains_count_as_content() {
        let bound = |redirect| crate::snapshot::Domain {
            domain: "api.seller.example".into(),
            group_id: "g1".into(),
            min_tls_version: crate::snapshot::MinTlsVersion::Tls12,
            https_redirect: redirect,
        };
        let old = Snapshot {
            domains: vec![bound(false)],
            ..snapshot(1, vec![group("g1", "a")])
        };
        let new = Snapshot {
            domains: vec![bound(true)],
            ..snapshot(2, vec![group("g1", "a")])
        };
        assert_ne!(ContentHash::of(&old), ContentHash::of(&new));
        let d = delta::diff(&old, &new);
        assert_eq!(
            ContentHash::of(&old).after_delta(&old, &d),
            ContentHash::of(&new)
        );
    }
}
