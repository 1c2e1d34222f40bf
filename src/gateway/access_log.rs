//! The access log line of one buyer request (target `access`, level `info`; its fields are
//! docs/operations.md "Access log").
//!
//! Owns the line's fields, their names and order. Hot path: with the text log format (no
//! colours, a filter of targets and levels only: [`crate::log_writer::direct_text`]) the line
//! is written straight into the log's buffer, the very bytes tracing-subscriber's fmt layer
//! writes for the same event (a test compares the two); that saved ~1.8 µs of ~21 per request
//! in `serve` (BENCHMARKS.md, issue 11). Otherwise (JSON, a terminal, a test's own subscriber)
//! it is a `tracing` event with the same fields. It does not decide what a request's fields
//! are (`handler::handle` does).

use std::fmt::Display;
use std::net::SocketAddr;

use crate::log_writer::TextLine;

/// One request's access log fields. `None` fields are left out of the line, as `tracing`
/// leaves out an `Option` field without a value.
pub(crate) struct AccessRecord<'a> {
    pub request_id: &'a str,
    pub node_id: &'a str,
    pub remote_addr: SocketAddr,
    pub host: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub group_id: Option<&'a str>,
    pub group_name: Option<&'a str>,
    pub api_id: Option<&'a str>,
    pub app_key: Option<&'a str>,
    pub auth_rule: Option<&'a dyn Display>,
    pub purchase_id: Option<&'a str>,
    pub throttle_id: Option<&'a str>,
    pub status: u16,
    pub outcome: &'static str,
    pub error_code: Option<&'static str>,
    pub duration_ms: f64,
    pub upstream_ms: Option<f64>,
    pub bytes_in: Option<u64>,
    pub bytes_out: Option<u64>,
    pub quota_left: Option<u64>,
    pub lease_left: Option<u64>,
}

impl AccessRecord<'_> {
    /// Logs the line, if the `access` target is enabled at `info`.
    pub(crate) fn log(&self) {
        if !tracing::enabled!(target: "access", tracing::Level::INFO) {
            return;
        }
        match crate::log_writer::direct_text() {
            // Inside a span the fmt layer would write the span's name first: not here.
            Some(writer) if tracing::Span::current().is_none() => {
                writer.write_line(tracing::Level::INFO, "access", |line| self.write(line))
            }
            _ => self.event(),
        }
    }

    fn write(&self, line: &mut TextLine<'_>) {
        line.str("request_id", self.request_id);
        line.str("node_id", self.node_id);
        line.socket_addr("remote_addr", self.remote_addr);
        line.str("host", self.host);
        line.str("method", self.method);
        line.str("path", self.path);
        let strings = [
            ("group_id", self.group_id),
            ("group_name", self.group_name),
            ("api_id", self.api_id),
            ("app_key", self.app_key),
        ];
        for (name, value) in strings {
            if let Some(value) = value {
                line.str(name, value);
            }
        }
        if let Some(rule) = self.auth_rule {
            line.display("auth_rule", rule);
        }
        if let Some(purchase_id) = self.purchase_id {
            line.str("purchase_id", purchase_id);
        }
        if let Some(throttle_id) = self.throttle_id {
            line.str("throttle_id", throttle_id);
        }
        line.u64("status", self.status.into());
        line.str("outcome", self.outcome);
        if let Some(error_code) = self.error_code {
            line.str("error_code", error_code);
        }
        line.f64("duration_ms", self.duration_ms);
        if let Some(upstream_ms) = self.upstream_ms {
            line.f64("upstream_ms", upstream_ms);
        }
        let counts = [
            ("bytes_in", self.bytes_in),
            ("bytes_out", self.bytes_out),
            ("quota_left", self.quota_left),
            ("lease_left", self.lease_left),
        ];
        for (name, value) in counts {
            if let Some(value) = value {
                line.u64(name, value);
            }
        }
    }

    /// The same fields as a `tracing` event.
    fn event(&self) {
        tracing::info!(
            target: "access",
            request_id = self.request_id,
            node_id = self.node_id,
            remote_addr = %self.remote_addr,
            host = self.host,
            method = self.method,
            path = self.path,
            group_id = self.group_id,
            group_name = self.group_name,
            api_id = self.api_id,
            app_key = self.app_key,
            auth_rule = self.auth_rule.map(tracing::field::display),
            purchase_id = self.purchase_id,
            throttle_id = self.throttle_id,
            status = self.status,
            outcome = self.outcome,
            error_code = self.error_code,
            duration_ms = self.duration_ms,
            upstream_ms = self.upstream_ms,
            bytes_in = self.bytes_in,
            bytes_out = self.bytes_out,
            quota_left = self.quota_left,
            lease_left = self.lease_left,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log_writer::LogFields;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Memory(Arc<Mutex<Vec<u8>>>);

    impl Write for Memory {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The line as `main`'s text subscriber writes the event (`init_logging`).
    fn through_tracing(record: &AccessRecord<'_>) -> String {
        let memory = Memory::default();
        let sink = memory.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .fmt_fields(LogFields)
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || record.event());
        let bytes = memory.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    fn direct(record: &AccessRecord<'_>) -> String {
        let writer = crate::log_writer::LogWriter::in_memory();
        writer.write_line(tracing::Level::INFO, "access", |line| record.write(line));
        String::from_utf8(writer.written()).unwrap()
    }

    /// `2026-12-06T23:40:48.922355Z` and the rest: the timestamps differ by when each was
    /// written; their form must not.
    fn split_timestamp(line: &str) -> (&str, &str) {
        let (stamp, rest) = line.split_at(27);
        let shape: String = stamp
            .chars()
            .map(|c| if c.is_ascii_digit() { '0' } else { c })
            .collect();
        assert_eq!(shape, "0000-00-00T00:00:00.000000Z", "{line}");
        (stamp, rest)
    }

    fn full() -> AccessRecord<'static> {
        AccessRecord {
            request_id: "8c2f0a1b2c3d4e5f60718293a4b5c6d7",
            node_id: "proxy-2",
            remote_addr: "203.0.113.7:52811".parse().unwrap(),
            host: "api.market.example.com",
            method: "POST",
            path: "/v1/weather/\"quoted\"\\ünï",
            group_id: Some("g1"),
            group_name: Some("Weather"),
            api_id: Some("a1"),
            app_key: Some("AK-1"),
            auth_rule: Some(&"the signature does not match"),
            purchase_id: Some("p1"),
            throttle_id: Some("t1"),
            status: 401,
            outcome: "auth_failed",
            error_code: Some("APIG.0301"),
            duration_ms: 12.345678,
            upstream_ms: Some(0.000123),
            bytes_in: Some(0),
            bytes_out: Some(512),
            quota_left: Some(977),
            lease_left: Some(13),
        }
    }

    /// The direct line is byte for byte the fmt layer's, with every field, with the
    /// optional ones absent, with an IPv6 peer, and with floats on both sides of where
    /// `Debug` switches to exponents.
    #[test]
    fn the_direct_line_is_the_fmt_layers_line() {
        let sparse = AccessRecord {
            remote_addr: "[2001:db8::7%3]:443".parse().unwrap(),
            group_id: None,
            group_name: None,
            api_id: None,
            app_key: None,
            auth_rule: None,
            purchase_id: None,
            throttle_id: None,
            error_code: None,
            upstream_ms: None,
            bytes_in: None,
            bytes_out: None,
            quota_left: None,
            lease_left: None,
            duration_ms: 1e-7,
            ..full()
        };
        let mut records = vec![full(), sparse];
        for duration_ms in [
            0.0,
            1.0,
            0.0001,
            0.00009999,
            1e15,
            1e16,
            123456.789,
            f64::NAN,
        ] {
            records.push(AccessRecord {
                duration_ms,
                ..full()
            });
        }
        for record in &records {
            let ours = direct(record);
            let theirs = through_tracing(record);
            assert_eq!(split_timestamp(&ours).1, split_timestamp(&theirs).1);
            assert!(ours.ends_with('\n'));
        }
        let line = direct(&full());
        assert!(
            line.contains(
                "  INFO access: request_id=\"8c2f0a1b2c3d4e5f60718293a4b5c6d7\" node_id=\"proxy-2\" \
                 remote_addr=203.0.113.7:52811 "
            ),
            "{line}"
        );
    }

    /// The timestamp is the wall clock's, in UTC, to the microsecond.
    #[test]
    fn the_timestamp_is_the_utc_wall_clock() {
        let before = time::OffsetDateTime::now_utc();
        let line = direct(&full());
        let after = time::OffsetDateTime::now_utc();
        let stamp = split_timestamp(&line).0;
        let parsed =
            time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339)
                .unwrap();
        let micro = time::Duration::microseconds(1);
        assert!(before - micro <= parsed && parsed <= after, "{stamp}");
    }
}
