//! The lease client's transport: how an exchange reaches the control plane. In-process for
//! `serve` (`crate::serve::InProcessLeases`), HTTP for `proxy` ([`HttpLeaseService`]: `POST
//! /v1/leases` through the proxy's [`Uplink`], which fails over along `proxy.control_urls`).
//!
//! It decides nothing about what to ask for (the policy, `leasing`) and keeps nothing on
//! disk (`leasing::state`).

use std::sync::Arc;
use std::time::Duration;

use crate::gateway::uplink::{Uplink, UplinkError};
use crate::lease::{LeaseExchange, LeaseReply};

/// A lease exchange that takes longer than this fails.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an exchange with the control plane failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseServiceError {
    /// Says the control plane and why (a TLS refusal, a refused connection), once per
    /// failing spell in the lease client's log.
    #[error("{0}")]
    Unreachable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("control plane refused the exchange ({status}): {body}")]
    Refused { status: u16, body: String },
    #[error("the control plane's answer is not a lease reply")]
    BadReply(#[source] serde_json::Error),
    #[error("lease exchange timed out")]
    Timeout,
}

/// The control plane as the lease client sees it: in-process for `serve`, HTTP for `proxy`.
#[async_trait::async_trait]
pub trait LeaseService: Send + Sync + 'static {
    async fn exchange(&self, exchange: LeaseExchange) -> Result<LeaseReply, LeaseServiceError>;
}

/// `POST {control_url}/v1/leases` with the admin token, on the control plane the uplink
/// currently uses; a transport failure or a 5xx moves the uplink to the next one.
pub struct HttpLeaseService {
    uplink: Arc<Uplink>,
}

impl HttpLeaseService {
    pub fn new(uplink: Arc<Uplink>) -> HttpLeaseService {
        HttpLeaseService { uplink }
    }
}

#[async_trait::async_trait]
impl LeaseService for HttpLeaseService {
    async fn exchange(&self, exchange: LeaseExchange) -> Result<LeaseReply, LeaseServiceError> {
        let body = serde_json::to_vec(&exchange).expect("an exchange serializes");
        let (index, outcome) = self.uplink.post("/v1/leases", body, EXCHANGE_TIMEOUT).await;
        let reply = match outcome {
            Ok(reply) => reply,
            Err(error) => {
                self.uplink.fail_over(index);
                return Err(match error {
                    UplinkError::Timeout { .. } => LeaseServiceError::Timeout,
                    unreachable => LeaseServiceError::Unreachable(Box::new(unreachable)),
                });
            }
        };
        if !reply.status.is_success() {
            if reply.status.is_server_error() {
                self.uplink.fail_over(index);
            }
            return Err(LeaseServiceError::Refused {
                status: reply.status.as_u16(),
                body: String::from_utf8_lossy(&reply.body).into_owned(),
            });
        }
        serde_json::from_slice(&reply.body).map_err(LeaseServiceError::BadReply)
    }
}
