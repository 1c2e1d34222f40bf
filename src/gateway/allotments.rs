//! The throttling allotment client of a leased proxy: asks the control plane for the calls
//! this proxy may admit in the current window of each throttling counter it uses, the way
//! the lease client asks for quota (docs/throttling.md), with no call to the control plane
//! per request.
//!
//! A request refused because this proxy's allotment ran short of the limit marks its counter
//! wanted and waits (bounded) for the next exchange. The client asks for every wanted counter
//! in one exchange, grows each counter's allotment, and learns the control plane's clock
//! (its offset from this host's: windows are the control plane's). With the control plane
//! unreachable it allots each counter, per window, what it was last granted for a whole
//! window (its last allotment rate).
//!
//! Must not decide requests (that is `throttle`) nor keep ledgers (the control plane's).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::throttle::Counter;

/// Wakes and feeds the allotment exchange; shared by the handler and the client task.
#[derive(Debug)]
pub struct Allotments {
    /// Woken when a counter wants more.
    wanted: tokio::sync::Notify,
    /// Counters that want more since the client last looked.
    queue: Mutex<Vec<(Arc<Counter>, u32)>>,
    /// Bumped after every exchange.
    granted: tokio::sync::watch::Sender<u64>,
}

impl Default for Allotments {
    fn default() -> Allotments {
        Allotments {
            wanted: tokio::sync::Notify::new(),
            queue: Mutex::new(Vec::new()),
            granted: tokio::sync::watch::channel(0).0,
        }
    }
}

impl Allotments {
    /// Asks for more of `counter` in `window` and waits for the next exchange, at most
    /// `wait`: `false` if none came (the caller answers 429).
    pub async fn wait_for_refill(
        &self,
        counter: &Arc<Counter>,
        window: u32,
        wait: Duration,
    ) -> bool {
        let mut granted = self.granted.subscribe();
        granted.borrow_and_update();
        if !counter.wanted.swap(true, Ordering::AcqRel) {
            self.queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((counter.clone(), window));
        }
        self.wanted.notify_one();
        tokio::time::timeout(wait, granted.changed()).await.is_ok()
    }

    /// Resolves when a counter wants more (for the client task).
    pub async fn wanted(&self) {
        self.wanted.notified().await
    }

    /// The counters that want more, each once (for the client task).
    pub fn take_wanted(&self) -> Vec<(Arc<Counter>, u32)> {
        let wanted = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()));
        for (counter, _) in &wanted {
            counter.wanted.store(false, Ordering::Release);
        }
        wanted
    }

    /// An exchange ended: waiters try again.
    pub fn exchanged(&self) {
        self.granted.send_modify(|n| *n += 1);
    }
}
