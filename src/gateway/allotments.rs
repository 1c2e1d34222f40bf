//! The throttling allotment client of a proxy that has a control plane: asks it for the
//! calls this proxy may admit in the current window of each throttling counter that ran
//! short (`crate::throttle_allotment`, docs/throttling.md). Nothing is asked per request: a
//! call refused for want of an allotment marks its counter wanted and waits (bounded) for the
//! next exchange, which asks for every wanted counter at once, a chunk of its limit each.
//!
//! Each exchange also tells the control plane's clock: windows are the control plane's, and
//! the offset of this host's clock is kept in the throttle registry. With the control plane
//! unreachable, a counter is allotted, once per window, what it was allotted in its last
//! window (its last allotment rate), so a proxy neither stops nor runs past its share.
//!
//! Must not decide requests (that is `throttle`) nor keep ledgers (the control plane's).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::throttle::{Counter, ThrottleRegistry};
use super::uplink::Uplink;
use crate::shutdown::Shutdown;
use crate::throttle_allotment::{
    clock_offset, AllotmentReply, AllotmentRequest, Want, CHUNK_DIVISOR, DRIFT_MS_PER_SEC, PATH,
};

/// An exchange that takes longer than this fails (the waiting calls are answered 429 at
/// their deadline anyway).
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(2);

/// Wakes and feeds the allotment exchange; shared by the handler and the client task.
#[derive(Debug)]
pub struct Allotments {
    /// Woken when a counter wants more.
    wanted: tokio::sync::Notify,
    /// Counters that want more since the client last looked, with the window.
    queue: Mutex<Vec<(Arc<Counter>, u64)>>,
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
    /// Asks for more of each of `counters` (each with its window) and waits for the next
    /// exchange, at most `wait`: `false` if none came (the caller answers 429).
    pub async fn wait_for_refill(&self, counters: &[(Arc<Counter>, u64)], wait: Duration) -> bool {
        let mut granted = self.granted.subscribe();
        granted.borrow_and_update();
        for (counter, window) in counters {
            self.want(counter, *window);
        }
        tokio::time::timeout(wait, granted.changed()).await.is_ok()
    }

    /// Asks for more of `counter` in `window` at the next exchange, without waiting for it
    /// (a refill ahead: its allotment is running low). Each counter is asked for once per
    /// exchange.
    pub fn want(&self, counter: &Arc<Counter>, window: u64) {
        if !counter.wanted.swap(true, Ordering::AcqRel) {
            self.queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((counter.clone(), window));
            self.wanted.notify_one();
        }
    }

    /// The counters that want more, each once.
    fn take_wanted(&self) -> Vec<(Arc<Counter>, u64)> {
        let wanted = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()));
        for (counter, _) in &wanted {
            counter.wanted.store(false, Ordering::Release);
        }
        wanted
    }

    /// An exchange ended: waiters try again.
    fn exchanged(&self) {
        self.granted.send_modify(|n| *n += 1);
    }
}

/// Runs the exchanges of `allotments` over `uplink` until `shutdown`, counters leased from
/// `registry`.
pub async fn run(
    allotments: Arc<Allotments>,
    registry: Arc<ThrottleRegistry>,
    uplink: Arc<Uplink>,
    node_id: String,
    shutdown: Shutdown,
) {
    registry.lease();
    let mut failing = false;
    // The error of the offset in use (ms) and when it was taken (this host's ms).
    let mut offset_taken: Option<(i64, i64)> = None;
    loop {
        tokio::select! {
            _ = allotments.wanted.notified() => {}
            _ = shutdown.clone().wait() => return,
        }
        let wanted = allotments.take_wanted();
        if wanted.is_empty() {
            continue;
        }
        match exchange(&uplink, &node_id, &wanted).await {
            Ok((reply, offset_ms, error_ms)) => {
                if failing {
                    tracing::info!("throttling allotments: the control plane answers again");
                    failing = false;
                }
                // The most certain offset, its error grown by the drift since it was taken:
                // one slow exchange does not move the windows by half its round trip.
                let now = now_ms();
                let better = offset_taken.is_none_or(|(error, taken)| {
                    error_ms <= error + (now - taken) / 1000 * DRIFT_MS_PER_SEC
                });
                if better {
                    registry.set_offset_ms(offset_ms);
                    offset_taken = Some((error_ms, now));
                }
                for ((counter, window), grant) in wanted.iter().zip(&reply.grants) {
                    if grant.granted == 0 {
                        counter.set_exhausted(*window);
                    } else {
                        counter.allot(*window as u32, grant.granted);
                    }
                }
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(%error, "throttling allotments: the control plane does not answer; keeping each counter's last allotment rate");
                    failing = true;
                }
                // The last allotment rate, once per window.
                for (counter, window) in &wanted {
                    let window32 = *window as u32;
                    if counter.allotted_in(window32) == 0 {
                        counter.allot(window32, counter.last_total());
                    }
                    if counter.allotted_in(window32) == 0 {
                        counter.set_exhausted(*window);
                    }
                }
            }
        }
        allotments.exchanged();
    }
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum AllotmentError {
    #[error("{0}")]
    Unreachable(#[source] super::uplink::UplinkError),
    #[error("control plane refused the exchange ({status}): {body}")]
    Refused { status: u16, body: String },
    #[error("the control plane's answer is not an allotment reply")]
    BadReply(#[source] serde_json::Error),
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// One exchange: the reply, the control plane's clock offset from this host's and how far
/// off that can be (ms, [`clock_offset`]).
async fn exchange(
    uplink: &Uplink,
    node_id: &str,
    wanted: &[(Arc<Counter>, u64)],
) -> Result<(AllotmentReply, i64, i64), AllotmentError> {
    let wants = wanted
        .iter()
        .map(|(counter, window)| {
            let (limit, window_ms) = counter.limit_and_window();
            Want {
                counter: counter.key().to_owned(),
                window: *window,
                window_ms,
                limit,
                calls: (limit / CHUNK_DIVISOR).max(1),
            }
        })
        .collect();
    let request = AllotmentRequest {
        node_id: node_id.to_owned(),
        wants,
    };
    let body = serde_json::to_vec(&request).expect("a request serializes");
    let sent = now_ms();
    let (index, outcome) = uplink.post(PATH, body, EXCHANGE_TIMEOUT).await;
    let answer = match outcome {
        Ok(answer) => answer,
        Err(error) => {
            uplink.fail_over(index);
            return Err(AllotmentError::Unreachable(error));
        }
    };
    let received = now_ms();
    if !answer.status.is_success() {
        if answer.status.is_server_error() {
            uplink.fail_over(index);
        }
        return Err(AllotmentError::Refused {
            status: answer.status.as_u16(),
            body: String::from_utf8_lossy(&answer.body).into_owned(),
        });
    }
    let reply: AllotmentReply =
        serde_json::from_slice(&answer.body).map_err(AllotmentError::BadReply)?;
    let (offset, error) = clock_offset(sent, received, &reply);
    Ok((reply, offset, error))
}
