//! Helpers shared by the integration tests; each reads like the scenario it sets up.
pub mod control;
pub mod gateway;
pub mod planes;
pub mod process;
