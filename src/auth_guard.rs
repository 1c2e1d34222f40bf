//! Bounds how fast one peer can guess credentials on a listener: AppKeys, signatures and
//! AppCodes on the buyer listeners, tokens and access keys on the control and admin ones.
//!
//! Each listener counts its failed authentications (401s) per peer address in windows of
//! `auth_failure_window_secs`; a peer with `auth_failure_limit` failures in the current window
//! is refused (429, `Retry-After`) before anything of its requests is checked, until the
//! window ends. So no peer makes more than `auth_failure_limit` guesses per window, however
//! fast it sends.
//!
//! Memory is fixed, whatever the number of peers: a table of [`SLOTS`] 64-bit cells, each a
//! peer's tag, window and count packed in one atomic (no lock, no allocation). A peer's slot
//! is chosen by a hash keyed at random per process, so a stranger cannot aim at another
//! peer's slot. A peer whose slot is held by another peer in the current window is counted
//! in one shared overflow cell, limited at [`OVERFLOW_FACTOR`] times the per-peer limit: a
//! spread-out attack costs the peers without a slot of their own, never memory. IPv6 peers
//! count by /64 (what one host is usually given), IPv4 by address.
//!
//! This module decides nothing about what a credential is; callers tell it of failures and
//! ask it before they authenticate. Cold unless someone fails: [`AuthGuard::check`] is one
//! atomic load while no peer failed in the current window.

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Cells in a listener's table (8 bytes each: 32 KiB).
pub const SLOTS: usize = 4096;
/// The shared overflow cell admits this many times the per-peer limit per window.
pub const OVERFLOW_FACTOR: u64 = 8;

const COUNT_BITS: u32 = 24;
const WINDOW_BITS: u32 = 20;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
const WINDOW_MASK: u64 = (1 << WINDOW_BITS) - 1;

/// The configured bound: `limit` failures per `window` and peer; `limit` 0 turns it off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthFailureLimit {
    pub limit: u32,
    pub window: Duration,
}

/// A peer over its limit may come back after this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many failed authentications from this address: retry after {} s", .retry_after.as_secs())]
pub struct Penalised {
    pub retry_after: Duration,
}

/// One listener's failure table (see the module docs).
pub struct AuthGuard {
    bound: AuthFailureLimit,
    slots: Box<[AtomicU64]>,
    overflow: AtomicU64,
    /// The last window (plus one, 0 = never) in which any failure was recorded: while it is
    /// not the current one, no peer can be over its limit and `check` looks no further.
    busy_window: AtomicU64,
    hasher: std::collections::hash_map::RandomState,
}

impl std::fmt::Debug for AuthGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthGuard")
            .field("bound", &self.bound)
            .finish_non_exhaustive()
    }
}

fn pack(tag: u64, window: u64, count: u64) -> u64 {
    (tag << (WINDOW_BITS + COUNT_BITS)) | ((window & WINDOW_MASK) << COUNT_BITS) | count
}

fn unpack(cell: u64) -> (u64, u64, u64) {
    (
        cell >> (WINDOW_BITS + COUNT_BITS),
        (cell >> COUNT_BITS) & WINDOW_MASK,
        cell & COUNT_MASK,
    )
}

/// What one peer is counted as: an IPv4 address, or an IPv6 /64.
fn peer_key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u128::from(u32::from(v4)),
            None => (u128::from(v6) >> 64 << 64) | (1 << 32),
        },
    }
}

impl AuthGuard {
    pub fn new(bound: AuthFailureLimit) -> AuthGuard {
        AuthGuard {
            bound,
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            overflow: AtomicU64::new(0),
            busy_window: AtomicU64::new(0),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    pub fn bound(&self) -> AuthFailureLimit {
        self.bound
    }

    fn window_of(&self, now_secs: u64) -> (u64, Duration) {
        let length = self.bound.window.as_secs().max(1);
        let window = now_secs / length;
        let left = (window + 1) * length - now_secs;
        (window & WINDOW_MASK, Duration::from_secs(left))
    }

    /// The peer's slot and its tag (never 0, so an empty cell is no one's).
    fn slot_of(&self, ip: IpAddr) -> (&AtomicU64, u64) {
        let hash = self.hasher.hash_one(peer_key(ip));
        // The top 20 bits (what a cell keeps of a tag), never 0.
        let tag = (hash >> (WINDOW_BITS + COUNT_BITS)) | 1;
        (&self.slots[(hash as usize) % SLOTS], tag)
    }

    /// May `ip` try to authenticate now (`now_secs`: Unix time)? Hot path: one atomic load
    /// while no one failed in this window.
    pub fn check(&self, ip: IpAddr, now_secs: u64) -> Result<(), Penalised> {
        if self.bound.limit == 0 {
            return Ok(());
        }
        let (window, left) = self.window_of(now_secs);
        if self.busy_window.load(Ordering::Relaxed) != window + 1 {
            return Ok(());
        }
        let limit = u64::from(self.bound.limit);
        let (slot, tag) = self.slot_of(ip);
        let (owner, at, count) = unpack(slot.load(Ordering::Relaxed));
        let over = if at != window || count == 0 {
            false
        } else if owner == tag {
            count >= limit
        } else {
            let (_, at, count) = unpack(self.overflow.load(Ordering::Relaxed));
            at == window && count >= limit * OVERFLOW_FACTOR
        };
        if over {
            Err(Penalised { retry_after: left })
        } else {
            Ok(())
        }
    }

    /// Counts one failed authentication by `ip`.
    pub fn failed(&self, ip: IpAddr, now_secs: u64) {
        if self.bound.limit == 0 {
            return;
        }
        let (window, _) = self.window_of(now_secs);
        self.busy_window.store(window + 1, Ordering::Relaxed);
        let (slot, tag) = self.slot_of(ip);
        let mut current = slot.load(Ordering::Relaxed);
        loop {
            let (owner, at, count) = unpack(current);
            let next = if at != window || count == 0 {
                pack(tag, window, 1)
            } else if owner == tag {
                pack(tag, window, (count + 1).min(COUNT_MASK))
            } else {
                // Another peer holds this slot in this window: the shared overflow cell.
                return Self::count_into(&self.overflow, 0, window);
            };
            match slot.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(seen) => current = seen,
            }
        }
    }

    fn count_into(cell: &AtomicU64, tag: u64, window: u64) {
        let _ = cell.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |current| {
            let (_, at, count) = unpack(current);
            Some(if at == window {
                pack(tag, window, (count + 1).min(COUNT_MASK))
            } else {
                pack(tag, window, 1)
            })
        });
    }
}

/// Seconds since the Unix epoch, for callers that hold no clock reading of their own.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(limit: u32) -> AuthGuard {
        AuthGuard::new(AuthFailureLimit {
            limit,
            window: Duration::from_secs(10),
        })
    }

    fn v4(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn a_peer_is_refused_after_its_limit_until_the_window_ends() {
        let guard = guard(3);
        let t = 1_000_000;
        for _ in 0..3 {
            assert_eq!(guard.check(v4(1), t), Ok(()));
            guard.failed(v4(1), t);
        }
        assert_eq!(
            guard.check(v4(1), t + 5),
            Err(Penalised {
                retry_after: Duration::from_secs(5)
            })
        );
        // Other peers are untouched; the next window starts afresh.
        assert_eq!(guard.check(v4(2), t), Ok(()));
        assert_eq!(guard.check(v4(1), t + 10), Ok(()));
    }

    #[test]
    fn ipv6_peers_count_by_64_prefix() {
        let guard = guard(2);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2::ffff".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        guard.failed(a, 50);
        guard.failed(b, 50);
        assert!(guard.check(a, 50).is_err());
        assert!(guard.check(other, 50).is_ok());
        let mapped: IpAddr = "::ffff:192.0.2.9".parse().unwrap();
        guard.failed(mapped, 50);
        guard.failed(v4(9), 50);
        assert!(guard.check(v4(9), 50).is_err());
    }

    /// However many peers fail, the table stays its size, and every peer is still bounded:
    /// by its own cell or by the shared overflow cell.
    #[test]
    fn many_peers_cost_no_memory_and_stay_bounded() {
        let guard = guard(2);
        let t = 7_000;
        let peers: Vec<IpAddr> = (0..(SLOTS as u32 * 4))
            .map(|i| IpAddr::from((0x0a00_0000u32 + i).to_be_bytes()))
            .collect();
        let mut admitted = 0u64;
        for _round in 0..4 {
            for &peer in &peers {
                if guard.check(peer, t).is_ok() {
                    admitted += 1;
                    guard.failed(peer, t);
                }
            }
        }
        assert_eq!(guard.slots.len(), SLOTS);
        // At most `limit` per slot plus the overflow's share (counted concurrently with the
        // checks, so each cell may be passed by the failures already in flight: none here).
        let bound = SLOTS as u64 * 2 + 2 * OVERFLOW_FACTOR;
        assert!(admitted <= bound, "{admitted} > {bound}");
    }

    #[test]
    fn a_limit_of_zero_turns_it_off() {
        let guard = guard(0);
        for _ in 0..100 {
            guard.failed(v4(1), 1);
        }
        assert_eq!(guard.check(v4(1), 1), Ok(()));
    }
}
