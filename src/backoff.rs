//! Retry delays: exponential backoff with full jitter, up to a cap. The one backoff of the
//! code base (the snapshot subscriber, the lease client and its recovery use it), so that
//! every retry loop waits the same way and none spins.
//!
//! Each failure doubles the ceiling (from `first` up to `cap`); the delay is drawn uniformly
//! between half the ceiling and the ceiling, so that proxies that lost their control plane at
//! the same instant do not retry in step. A success resets it. It keeps no clock and sleeps
//! nowhere itself: callers sleep for what [`Backoff::next_delay`] returns.

use std::time::Duration;

use rand::Rng;

/// The first retry delay's ceiling after a failure.
pub const DEFAULT_FIRST: Duration = Duration::from_millis(100);
/// The largest delay between attempts: with every control plane gone, a proxy tries about
/// once a second per loop, at most.
pub const DEFAULT_CAP: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    /// Failures since the last success.
    failures: u32,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff::new(DEFAULT_FIRST, DEFAULT_CAP)
    }
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff {
            first,
            cap: cap.max(first),
            failures: 0,
        }
    }

    /// Records a failure and returns how long to wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .first
            .saturating_mul(1u32 << self.failures.min(16))
            .min(self.cap);
        self.failures = self.failures.saturating_add(1);
        let low = ceiling / 2;
        low + (ceiling - low).mul_f64(rand::thread_rng().gen::<f64>())
    }

    /// Records a success: the next failure starts from `first` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_with_jitter_and_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = backoff.next_delay();
        assert!((Duration::from_millis(50)..=Duration::from_millis(100)).contains(&first));
        let delays: Vec<Duration> = (0..20).map(|_| backoff.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays[10..].iter().all(|d| *d >= Duration::from_secs(1)));
        // Jittered: not every delay at the cap is the same.
        assert!(delays[10..].windows(2).any(|w| w[0] != w[1]));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
