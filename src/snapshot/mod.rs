//! The snapshot: what the control plane publishes and every proxy serves from.
//!
//! `wire` is the JSON both planes exchange. The data plane turns a wire snapshot into its
//! compiled form (`validate`, then `compile`: indexed, routes built) before swapping it in;
//! a snapshot that fails validation changes nothing. `delta` carries only what changed
//! between two versions (`PATCH /v1/snapshot`).

pub mod compile;
pub mod delta;
#[cfg(test)]
mod properties;
pub mod validate;
pub mod wire;

pub use wire::*;
