//! The proxy's snapshot subscription (docs/snapshot-protocol.md): it long-polls its control
//! planes for what is newer than the snapshot it serves and applies what it is sent.
//!
//! Each poll ([`crate::feed::Poll`]) says what this proxy serves — version and content hash
//! — and so is also its ack. A full snapshot or a delta is applied exactly as an operator's
//! `PUT`/`PATCH /v1/snapshot` is (validated, compiled, persisted, swapped); a delta refused
//! for its base makes the next poll name the version really served, and the control plane
//! answers that with the full snapshot. The content hash is computed here from what was
//! applied, never copied from the control plane, so a proxy serving other content than the
//! control plane believes is seen and resynced.
//!
//! Failures move to the next control plane ([`Uplink::fail_over`]) and back off
//! (`crate::backoff`): with every control plane gone, a poll a second or so at most. Each
//! change of the link's state is logged once, not each attempt. It does not lease quota
//! (`leasing` does, through the same uplink).

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

use super::admin::{decode_delta, decode_snapshot};
use super::uplink::{Uplink, UplinkError};
use super::{Gateway, SnapshotRejection};
use crate::backoff::Backoff;
use crate::feed::{self, ContentHash, Poll};
use crate::shutdown::Shutdown;

/// A poll unanswered for this long is given up (the control plane holds one at most
/// `control::subscriptions::POLL_HOLD`).
pub const POLL_TIMEOUT: Duration = Duration::from_secs(45);

/// The state of the link, logged once per change.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Link {
    Starting,
    Following(String),
    Refused(String),
    Failing(String),
}

pub struct Subscriber {
    gateway: Gateway,
    uplink: Arc<Uplink>,
    node_id: String,
    incarnation: String,
    /// The content hash of the version served, once computed.
    served: Option<(u64, ContentHash)>,
    /// Why the last snapshot sent was not applied; told in the next poll.
    last_error: Option<String>,
    link: Link,
    backoff: Backoff,
}

/// What a poll brought.
enum Sent {
    Nothing,
    Full(Box<crate::snapshot::Snapshot>),
    Delta(Box<crate::snapshot::delta::Delta>),
}

impl Subscriber {
    /// `incarnation` is the lease client's: one identity per data directory.
    pub fn new(gateway: Gateway, uplink: Arc<Uplink>, incarnation: String) -> Subscriber {
        Subscriber {
            node_id: gateway.node_id().to_owned(),
            gateway,
            uplink,
            incarnation,
            served: None,
            last_error: None,
            link: Link::Starting,
            backoff: Backoff::default(),
        }
    }

    /// Polls until `shutdown` fires.
    pub async fn run(mut self, shutdown: Shutdown) {
        loop {
            let wait = tokio::select! {
                wait = self.once() => wait,
                _ = shutdown.clone().wait() => return,
            };
            if let Some(wait) = wait {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.clone().wait() => return,
                }
            }
        }
    }

    /// One poll and what follows from it; returns how long to wait before the next one
    /// (`None`: poll again at once).
    async fn once(&mut self) -> Option<Duration> {
        let content_hash = self.served_hash().await;
        let poll = Poll {
            node_id: self.node_id.clone(),
            incarnation: self.incarnation.clone(),
            version: self.gateway.snapshot_version(),
            content_hash: content_hash.map(|h| h.to_string()),
            last_error: self.last_error.clone(),
        };
        let body = serde_json::to_vec(&poll).expect("a poll serializes");
        let (index, outcome) = self
            .uplink
            .post(feed::SUBSCRIBE_PATH, body, POLL_TIMEOUT)
            .await;
        let reply = match outcome {
            Ok(reply) => reply,
            Err(error) => {
                self.failed(index, &error);
                return Some(self.backoff.next_delay());
            }
        };
        let url = self.uplink.current().1.to_owned();
        let limit = self.gateway.inner.config.proxy.max_snapshot_bytes;
        let sent = match reply.status {
            StatusCode::NO_CONTENT => Sent::Nothing,
            StatusCode::OK => {
                let kind = reply
                    .headers
                    .get(feed::KIND_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("full");
                let decoded = if kind == "delta" {
                    decode_delta(&reply.headers, &reply.body, limit)
                        .map(|d| Sent::Delta(Box::new(d)))
                } else {
                    decode_snapshot(&reply.headers, &reply.body, limit)
                        .map(|s| Sent::Full(Box::new(s)))
                };
                match decoded {
                    Ok(sent) => sent,
                    Err(error) => {
                        self.last_error = Some(format!("the {kind} snapshot sent: {error}"));
                        self.state(Link::Failing(format!("{url}: undecodable {kind} snapshot")));
                        return Some(self.backoff.next_delay());
                    }
                }
            }
            StatusCode::CONFLICT => {
                let reason = String::from_utf8_lossy(&reply.body).into_owned();
                self.state(Link::Refused(reason));
                return Some(self.backoff.next_delay());
            }
            status => {
                let reason = format!(
                    "{url} answered {status}: {}",
                    String::from_utf8_lossy(&reply.body)
                );
                if status.is_server_error() {
                    self.uplink.fail_over(index);
                }
                self.state(Link::Failing(reason));
                return Some(self.backoff.next_delay());
            }
        };
        self.backoff.reset();
        self.state(Link::Following(url));
        let applied = match sent {
            Sent::Nothing => true,
            Sent::Full(snapshot) => self.apply_full(*snapshot).await,
            Sent::Delta(delta) => self.apply_delta(*delta).await,
        };
        // A snapshot refused as invalid would be sent again at once: wait first.
        (!applied).then(|| self.backoff.next_delay())
    }

    fn failed(&mut self, index: usize, error: &UplinkError) {
        let next = self.uplink.fail_over(index).to_owned();
        let reason = match error {
            UplinkError::Unreachable { url, why, .. } => format!("{url} unreachable: {why}"),
            UplinkError::Timeout { url, timeout } => {
                format!("{url} did not answer within {timeout:?}")
            }
        };
        self.state(Link::Failing(format!("{reason}; next: {next}")));
    }

    /// Logs a change of the link's state (once per change, never per attempt).
    fn state(&mut self, link: Link) {
        let same_kind = std::mem::discriminant(&self.link) == std::mem::discriminant(&link);
        // A refusal's body carries a request id: refused again is the same state, not news.
        if self.link == link || (same_kind && matches!(link, Link::Failing(_) | Link::Refused(_))) {
            self.link = link;
            return;
        }
        match &link {
            Link::Following(url) => {
                tracing::info!(control = %url, version = ?self.gateway.snapshot_version(), "following the control plane's snapshots")
            }
            Link::Refused(reason) => {
                tracing::error!(node = %self.node_id, %reason, "the control plane refuses this proxy's node id")
            }
            Link::Failing(reason) => {
                tracing::warn!(%reason, "no control plane answers; serving the snapshot held, retrying with backoff")
            }
            Link::Starting => {}
        }
        self.link = link;
    }

    /// The content hash of the snapshot served, computed once per version (off the async
    /// threads: a pass over the market).
    async fn served_hash(&mut self) -> Option<ContentHash> {
        let wire = self.gateway.wire_snapshot()?;
        if let Some((version, hash)) = self.served {
            if version == wire.version {
                return Some(hash);
            }
        }
        let hash = tokio::task::spawn_blocking(move || (wire.version, ContentHash::of(&wire)))
            .await
            .ok()?;
        self.served = Some(hash);
        Some(hash.1)
    }

    /// Applies a full snapshot; false if it was refused (not for being stale).
    async fn apply_full(&mut self, snapshot: crate::snapshot::Snapshot) -> bool {
        let gateway = self.gateway.clone();
        let applied = tokio::task::spawn_blocking(move || {
            let hash = ContentHash::of(&snapshot);
            if gateway.snapshot_version() == Some(snapshot.version) {
                // The control plane sends the version served only to resync other content.
                tracing::warn!(
                    version = snapshot.version,
                    "serving other content than the control plane's for this version: resyncing"
                );
                gateway.resync_snapshot(snapshot).map(|v| (v, hash))
            } else {
                gateway.apply_snapshot(snapshot).map(|v| (v, hash))
            }
        })
        .await;
        self.applied(applied)
    }

    /// Applies a delta; false if it was refused (not for its base or for being stale). The
    /// content hash follows from the served one by the entities the delta touches, found by
    /// id (`Gateway::apply_delta_hashed`), not by a pass over the market.
    async fn apply_delta(&mut self, delta: crate::snapshot::delta::Delta) -> bool {
        let base_hash = self.served_hash().await;
        let gateway = self.gateway.clone();
        let applied = tokio::task::spawn_blocking(move || {
            gateway
                .apply_delta_hashed(delta, Some(base_hash.unwrap_or_default()))
                .map(|(version, hash)| (version, hash.unwrap_or_default()))
        })
        .await;
        self.applied(applied)
    }

    fn applied(
        &mut self,
        applied: Result<Result<(u64, ContentHash), SnapshotRejection>, tokio::task::JoinError>,
    ) -> bool {
        match applied {
            Ok(Ok((version, hash))) => {
                self.served = Some((version, hash));
                self.last_error = None;
                true
            }
            // An operator's push got there first, or the base moved: the next poll says what
            // is served and is answered accordingly.
            Ok(Err(SnapshotRejection::NotNewer { .. } | SnapshotRejection::WrongBase { .. })) => {
                self.last_error = None;
                true
            }
            Ok(Err(error)) => {
                tracing::error!(%error, "the control plane's snapshot was refused; serving the previous one");
                self.last_error = Some(error.to_string());
                false
            }
            Err(error) => {
                tracing::error!(%error, "applying the snapshot stopped unfinished");
                self.last_error = Some(format!("applying stopped unfinished: {error}"));
                false
            }
        }
    }
}
