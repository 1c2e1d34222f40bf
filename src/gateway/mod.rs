//! The data plane (`marketgate proxy`): enforces purchases on buyers' calls and forwards them.

use crate::config::Config;
use crate::shutdown::Shutdown;

/// Runs a standalone proxy until `shutdown` fires.
pub async fn run_proxy(
    config: Config,
    shutdown: Shutdown,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let _ = (config, shutdown);
    Err("marketgate proxy is not built yet".into())
}
