//! marketgate: an API-marketplace gateway that lets through exactly what was bought.
//!
//! # Layout
//!
//! - [`accept`]: the one accept loop of every listener: connection limits, timeouts, back-off.
//! - [`framing`]: what hyper's HTTP/1 parser hides or answers on its own, from a connection's
//!   bytes: Content-Length beside Transfer-Encoding refused, hyper's bare 400/414/431 replaced
//!   by the APIG error body.
//! - [`auth_guard`]: per listener, a bound on failed authentications per peer (a fixed table,
//!   no memory per stranger), checked before any credential is.
//! - [`data_dir`]: one process per `data_dir` (a pid-holding `flock`), files in it 0600.
//! - [`config`]: the TOML file and `MARKETGATE_*` overrides, validated into [`config::Config`].
//! - [`plane_tls`]: TLS between the planes: the admin listener's certificate (and client CA),
//!   a proxy's trust in its control planes (a CA or pinned certificates) and its own.
//! - [`bind`]: binding a configured listener; a taken address is named with its key.
//! - [`template`]: the `req_uri` template grammar both planes and the router share (a leaf).
//! - [`certificate`]: PEM certificates and keys into what rustls serves, and their notAfter
//!   (a leaf).
//! - [`signing`]: SDK-HMAC-SHA256 canonicalisation, signing and verification (both planes).
//! - [`apig`]: Huawei APIG error codes and the error body.
//! - [`backoff`]: the one retry backoff (exponential, jittered, capped).
//! - [`durable`]: the one durable file replacement (temporary file, fsync, rename, 0600).
//! - [`feed`]: the snapshot subscription between the planes: its wire form and the content
//!   hash both planes compute (docs/snapshot-protocol.md).
//! - [`buyer`]: the buyer tool behind `marketgate sign` and `marketgate call`.
//! - [`snapshot`]: the contract between the planes: wire types, validation, compiled form.
//! - [`gateway`]: the data plane: listeners, per-request phases, quota and its lease client,
//!   forwarding, admin.
//! - [`control`]: the control plane: store, market API, management API, snapshot building
//!   and pushing, the lease ledger, its admin listener.
//! - [`throttle_allotment`]: throttling allotments: the exchange and ledger arithmetic that
//!   let proxies share a throttling limit exactly.
//! - [`lease`]: quota leases: the protocol and ledger arithmetic that let proxies share a purchase.
//! - [`metrics_text`]: the Prometheus text format of one or more registries, empty families kept.
//! - [`serve`]: `marketgate serve`: both planes in one process, joined without HTTP.
//! - [`shutdown`]: graceful shutdown as a value that servers wait on.
//! - [`log_writer`]: where log lines go: standard output, the access log's lines buffered.

pub mod accept;
pub mod apig;
pub mod auth_guard;
pub mod backoff;
pub mod bind;
pub mod buyer;
pub mod certificate;
pub mod config;
pub mod control;
pub mod data_dir;
pub mod durable;
pub mod feed;
pub mod framing;
pub mod gateway;
pub mod lease;
pub mod log_writer;
pub mod metrics_text;
pub mod plane_tls;
pub mod serve;
pub mod shutdown;
pub mod signing;
pub mod snapshot;
pub mod template;
pub mod throttle_allotment;
