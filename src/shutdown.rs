//! Graceful shutdown as a value: servers take a [`Shutdown`] and stop accepting when it fires.
//!
//! `main` fires it on SIGTERM or Ctrl-C; tests fire it by hand. Every clone sees the same
//! signal, and one fired before a clone was taken is still seen.

use tokio::sync::watch;

/// Fires a [`Shutdown`] and all its clones.
#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// Resolves once shutdown has been asked for.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl ShutdownTrigger {
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger(tx), Shutdown(rx))
    }

    pub fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    /// A shutdown that never fires.
    pub fn never() -> Shutdown {
        let (tx, rx) = watch::channel(false);
        std::mem::forget(tx);
        Shutdown(rx)
    }

    pub fn is_fired(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits until fired.
    pub async fn wait(mut self) {
        // An error means the trigger is gone without firing: treat as fired so that
        // nothing waits forever on a dropped owner.
        let _ = self.0.wait_for(|fired| *fired).await;
    }
}
