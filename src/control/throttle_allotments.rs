//! The control plane's side of throttling allotments (docs/throttling.md): grants proxies
//! calls of a throttling counter in the current window of the control plane's clock, from
//! the store's ledger (`store::allotments`), so that the calls granted to all proxies per
//! window never exceed the limit, across control replicas too (the row is locked while a
//! grant is decided).
//!
//! Must not look at policies: a want names its counter, window and limit (the proxy's
//! snapshot is this control plane's); nothing here changes the snapshot.

use crate::throttle_allotment::{grantable, AllotmentReply, AllotmentRequest, Grant};

use super::error::ControlError;
use super::store::allotments::AllotWant;
use super::ControlPlane;

/// The largest limit a want may name (Huawei's largest).
const MAX_LIMIT: u64 = i32::MAX as u64;
/// The shortest window (one second).
const MIN_WINDOW_MS: u64 = 1_000;

impl ControlPlane {
    /// Grants each want what is left of its counter's limit in its window (at most what it
    /// asks), if the window is the current one on this control plane's clock (or the next one
    /// within the skew allowance); others are granted nothing.
    pub async fn allot_throttles(
        &self,
        request: AllotmentRequest,
    ) -> Result<AllotmentReply, ControlError> {
        let now_ms = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
        let now_ms = now_ms.max(0) as u64;
        for (i, want) in request.wants.iter().enumerate() {
            if want.window_ms < MIN_WINDOW_MS || want.limit > MAX_LIMIT || want.counter.is_empty() {
                return Err(ControlError::BadJson(format!(
                    "wants[{i}]: a counter, a window of at least {MIN_WINDOW_MS} ms and a limit of at most {MAX_LIMIT}"
                )));
            }
        }
        // Rows are locked in one order (counter, window) so that concurrent exchanges never
        // deadlock; each counter and window is asked once.
        let mut order: Vec<usize> = (0..request.wants.len())
            .filter(|&i| {
                let want = &request.wants[i];
                grantable(want.window, want.window_ms, now_ms)
            })
            .collect();
        order.sort_by(|&a, &b| {
            let (a, b) = (&request.wants[a], &request.wants[b]);
            (&a.counter, a.window).cmp(&(&b.counter, b.window))
        });
        order.dedup_by(|a, b| {
            let (a, b) = (&request.wants[*a], &request.wants[*b]);
            a.counter == b.counter && a.window == b.window
        });
        let wants = order
            .iter()
            .map(|&i| {
                let want = &request.wants[i];
                let window_end = want.window.saturating_add(1).saturating_mul(want.window_ms);
                AllotWant {
                    counter: want.counter.clone(),
                    window: want.window as i64,
                    limit: want.limit,
                    calls: want.calls.min(want.limit),
                    expires_ms: (window_end as i64)
                        .saturating_add(crate::throttle_allotment::KEEP_AFTER_WINDOW_MS),
                }
            })
            .collect::<Vec<_>>();
        let granted = if wants.is_empty() {
            Vec::new()
        } else {
            self.inner.store.allot(wants, now_ms as i64).await?
        };
        let mut grants: Vec<Grant> = request
            .wants
            .iter()
            .map(|want| Grant {
                counter: want.counter.clone(),
                window: want.window,
                granted: 0,
            })
            .collect();
        for (&i, calls) in order.iter().zip(granted) {
            grants[i].granted = calls;
        }
        let answered_ms = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
        Ok(AllotmentReply {
            now_ms,
            answered_ms: (answered_ms.max(0) as u64).max(now_ms),
            grants,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::throttle_allotment::Want;

    #[tokio::test]
    async fn proxies_asking_in_turn_are_granted_the_limit_and_no_more() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "data_dir = '{0}'\ndatabase_url = 'sqlite://{0}/m.db'\n",
            dir.path().display()
        );
        let config = crate::config::Config::from_toml(&text, Vec::new()).unwrap();
        let cp = ControlPlane::open(&config).await.unwrap();
        let now = time::OffsetDateTime::now_utc().unix_timestamp() as u64 * 1000;
        let window = now / 3_600_000;
        let ask = |node: &str| AllotmentRequest {
            node_id: node.into(),
            wants: vec![Want {
                counter: "p/api/app/a".into(),
                window,
                window_ms: 3_600_000,
                limit: 100,
                calls: 60,
            }],
        };
        let mut granted = Vec::new();
        for node in ["proxy-1", "proxy-2", "proxy-3"] {
            granted.push(cp.allot_throttles(ask(node)).await.unwrap().grants[0].granted);
        }
        assert_eq!(granted, [60, 40, 0]);
        // Another window starts from nothing; a past one is granted nothing.
        let mut past = ask("proxy-1");
        past.wants[0].window -= 1;
        assert_eq!(cp.allot_throttles(past).await.unwrap().grants[0].granted, 0);
    }
}
