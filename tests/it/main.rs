//! Integration tests: real sockets on 127.0.0.1:0, in-process servers, one binary.

mod adversarial;
mod cli;
mod cluster;
mod cluster_fleet;
mod control;
mod control_binary;
mod control_e2e;
mod data_dir;
mod docs_links;
mod domains;
mod fleet;
mod gateway;
mod gateway_crash;
mod gateway_tls;
mod leases;
mod observability;
mod openapi;
mod plane_tls;
mod planes;
mod serve_restore;
mod serve_store_faults;
mod store_faults;
mod store_outage;
mod support;
mod upstream;
mod workers;
