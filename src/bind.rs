//! Binding a configured listener: the one place that turns "Address already in use" into an
//! error naming the address, the config key it came from and how to change it.
//!
//! It only binds; what is served on the socket is the caller's.

use std::net::SocketAddr;

/// A listener that could not be bound, with the key that chose its address.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({key}{hint})", hint = hint(.key, .source))]
pub struct BindError {
    /// The config key of the address, e.g. `control.listen`.
    pub key: &'static str,
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds `addr`, the value of config key `key`.
pub async fn bind(
    key: &'static str,
    addr: SocketAddr,
) -> Result<tokio::net::TcpListener, BindError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { key, addr, source })
}

/// What a person does about it: for a taken port, where to change it.
fn hint(key: &str, source: &std::io::Error) -> String {
    match source.kind() {
        std::io::ErrorKind::AddrInUse => format!(
            "; another process, perhaps another marketgate, holds it: stop it, or move it with \
             {} or {key} in the config file",
            env_name(key)
        ),
        _ => String::new(),
    }
}

/// `control.listen` → `MARKETGATE_CONTROL__LISTEN` (config.rs's override naming).
fn env_name(key: &str) -> String {
    format!("MARKETGATE_{}", key.to_ascii_uppercase().replace('.', "__"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_taken_port_names_the_address_the_key_and_the_variable() {
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let err = bind("control.listen", addr).await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("cannot listen on {addr} (control.listen; ")),
            "{text}"
        );
        assert!(text.contains("MARKETGATE_CONTROL__LISTEN"), "{text}");
        assert_eq!(err.source.kind(), std::io::ErrorKind::AddrInUse);
    }
}
