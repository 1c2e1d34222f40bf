//! The control plane (`marketgate control`): market API, management API, durable store.

pub mod push;

use crate::config::Config;
use crate::shutdown::Shutdown;

/// Runs a standalone control plane until `shutdown` fires.
pub async fn run_control(
    config: Config,
    shutdown: Shutdown,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let _ = (config, shutdown);
    Err("marketgate control is not built yet".into())
}
