//! Where the process's log lines go: standard output, with the access log's lines gathered.
//!
//! A line of the access logs (targets `access` and `control_access`, one per request) is
//! appended to a buffer that is written out in one `write` when it holds
//! [`ACCESS_LOG_BUFFER_BYTES`], at least every [`ACCESS_LOG_FLUSH`] (a `log-flush` thread),
//! and when the process ends ([`LogWriter::flush`], called by `main` after the drain) — as
//! nginx's `access_log … buffer=64k flush=…`. Written one by one, each line cost a system
//! call on the request's thread (BENCHMARKS.md, issue 11). Every other line (start-up,
//! warnings, errors) is written at once, after the access lines buffered before it, so the
//! order of lines is kept. What a crash (not a graceful stop) can lose: the access lines of
//! the last [`ACCESS_LOG_FLUSH`], never a warning or an error.
//!
//! It does not format lines (tracing-subscriber's fmt layer does, one `write_all` per line)
//! nor decide what is logged.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{RecordFields, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultFields, DefaultVisitor, Writer};
use tracing_subscriber::fmt::{FormatFields, MakeWriter};

/// An access log buffer this full is written out by the thread that filled it, in bytes.
pub const ACCESS_LOG_BUFFER_BYTES: usize = 64 * 1024;
/// The longest an access log line waits in the buffer before it is written out.
pub const ACCESS_LOG_FLUSH: Duration = Duration::from_millis(200);

/// The targets whose lines are buffered.
const BUFFERED_TARGETS: [&str; 2] = ["access", "control_access"];

/// The log's writer (a tracing-subscriber [`MakeWriter`]). Cheap to clone.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

struct Shared {
    /// Access log lines not yet written out.
    pending: Mutex<Vec<u8>>,
    sink: Sink,
}

/// Where lines are written out.
enum Sink {
    Stdout,
    /// What a test reads back.
    #[cfg(test)]
    Memory(Mutex<Vec<u8>>),
}

impl Sink {
    fn write_all(&self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Sink::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(bytes).and_then(|()| out.flush())
            }
            #[cfg(test)]
            Sink::Memory(memory) => {
                lock(memory).extend_from_slice(bytes);
                Ok(())
            }
        }
    }
}

impl LogWriter {
    /// A writer to standard output, and its `log-flush` thread (which holds only a weak
    /// reference: it ends after the last writer is dropped).
    pub fn stdout() -> LogWriter {
        let writer = LogWriter::new(Sink::Stdout, ACCESS_LOG_BUFFER_BYTES);
        let shared = Arc::downgrade(&writer.shared);
        let spawned = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(move || loop {
                std::thread::sleep(ACCESS_LOG_FLUSH);
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                let _ = shared.write_out(&mut lock(&shared.pending));
            });
        if spawned.is_err() {
            // No thread: nothing would write a quiet buffer out, so nothing is buffered.
            return LogWriter::new(Sink::Stdout, 0);
        }
        writer
    }

    fn new(sink: Sink, capacity: usize) -> LogWriter {
        LogWriter {
            shared: Arc::new(Shared {
                pending: Mutex::new(Vec::with_capacity(capacity)),
                sink,
            }),
        }
    }

    /// Writes out the access log lines buffered so far (at the end of the process).
    pub fn flush(&self) -> io::Result<()> {
        self.shared.write_out(&mut lock(&self.shared.pending))
    }
}

/// Writes out what is still buffered when dropped (`main` holds one for the process's life).
pub struct FlushOnDrop(pub LogWriter);

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        let _ = self.0.flush();
    }
}

fn lock(pending: &Mutex<Vec<u8>>) -> MutexGuard<'_, Vec<u8>> {
    pending.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Writes the buffered lines out and empties the buffer (also when the write failed: a
    /// log that cannot be written is not kept growing).
    fn write_out(&self, pending: &mut Vec<u8>) -> io::Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let written = self.sink.write_all(pending);
        pending.clear();
        written
    }
}

/// One line's writer: into the buffer, or straight out.
pub struct Line<'a> {
    shared: &'a Shared,
    buffered: bool,
}

impl Write for Line<'_> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut pending = lock(&self.shared.pending);
        // Without a flush thread the buffer has no room: every line goes straight out.
        if self.buffered && pending.capacity() > 0 {
            pending.extend_from_slice(line);
            if pending.len() >= ACCESS_LOG_BUFFER_BYTES {
                self.shared.write_out(&mut pending)?;
            }
        } else {
            // The access lines buffered before this one first, then this one, under the
            // lock (so that no access line slips in between).
            self.shared.write_out(&mut pending)?;
            self.shared.sink.write_all(line)?;
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line {
            shared: &self.shared,
            buffered: false,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Line<'a> {
        Line {
            shared: &self.shared,
            buffered: BUFFERED_TARGETS.contains(&meta.target()),
        }
    }
}

/// How a text line's fields are written: as tracing-subscriber's [`DefaultFields`] writes
/// them, byte for byte, but strings of printable ASCII, integers and booleans without
/// `core::fmt` (the access log's ~20 fields cost ~25k instructions per request through
/// `Debug`: BENCHMARKS.md, issue 11). Anything else (floats, errors, the message, escapes,
/// colours at a terminal) goes to [`DefaultFields`]' own visitor.
#[derive(Debug, Default)]
pub struct LogFields;

impl<'writer> FormatFields<'writer> for LogFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        if writer.has_ansi_escapes() {
            return DefaultFields::new().format_fields(writer, fields);
        }
        let mut visitor = TextFields {
            writer,
            is_empty: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct TextFields<'w> {
    writer: Writer<'w>,
    is_empty: bool,
    result: fmt::Result,
}

impl TextFields<'_> {
    /// Writes `name=` (after a space unless first), as [`DefaultFields`] does.
    fn name(&mut self, field: &Field) -> bool {
        if self.result.is_err() {
            return false;
        }
        let name = field.name();
        let name = name.strip_prefix("r#").unwrap_or(name);
        if !self.is_empty {
            self.result = self.writer.write_char(' ');
        }
        self.is_empty = false;
        self.result = self
            .result
            .and_then(|()| self.writer.write_str(name))
            .and_then(|()| self.writer.write_char('='));
        self.result.is_ok()
    }

    /// Whether `field` takes the fast path: a named field tracing-subscriber neither skips
    /// (`log.*`) nor writes bare (`message`).
    fn plain(field: &Field) -> bool {
        let name = field.name();
        name != "message" && !name.starts_with("log.")
    }

    /// The field through [`DefaultFields`]' visitor.
    fn default(&mut self, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        if self.result.is_err() {
            return;
        }
        let mut visitor = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        record(&mut visitor);
        self.result = visitor.finish();
    }

    fn default_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.default(|visitor| visitor.record_debug(field, value));
        self.is_empty &= field.name().starts_with("log.");
    }
}

/// A string whose `Debug` form is itself in quotes: printable ASCII, no `"` or `\`.
fn quotes_as_is(value: &str) -> bool {
    value
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

impl Visit for TextFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if Self::plain(field) && quotes_as_is(value) {
            if self.name(field) {
                self.result = self
                    .writer
                    .write_char('"')
                    .and_then(|()| self.writer.write_str(value))
                    .and_then(|()| self.writer.write_char('"'));
            }
        } else {
            self.default(|visitor| visitor.record_str(field, value));
            self.is_empty &= field.name().starts_with("log.");
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if Self::plain(field) {
            if self.name(field) {
                self.result = self.writer.write_str(itoa::Buffer::new().format(value));
            }
        } else {
            self.default_debug(field, &value);
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if Self::plain(field) {
            if self.name(field) {
                self.result = self.writer.write_str(itoa::Buffer::new().format(value));
            }
        } else {
            self.default_debug(field, &value);
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if Self::plain(field) {
            if self.name(field) {
                self.result = self.writer.write_str(if value { "true" } else { "false" });
            }
        } else {
            self.default_debug(field, &value);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.default(|visitor| visitor.record_error(field, value));
        self.is_empty &= field.name().starts_with("log.");
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.default_debug(field, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(writer: &LogWriter) -> Vec<u8> {
        match &writer.shared.sink {
            Sink::Memory(memory) => lock(memory).clone(),
            Sink::Stdout => unreachable!("tests write to memory"),
        }
    }

    /// Access lines wait in the buffer; any other line writes them out before itself, so the
    /// order holds; a full buffer is written out by the line that fills it; `flush` writes
    /// out the rest.
    #[test]
    fn access_lines_wait_and_other_lines_keep_the_order() {
        let writer = LogWriter::new(Sink::Memory(Mutex::default()), ACCESS_LOG_BUFFER_BYTES);
        let access = tracing::Metadata::new(
            "access line",
            "access",
            tracing::Level::INFO,
            None,
            None,
            None,
            tracing::field::FieldSet::new(&[], tracing::callsite::Identifier(&CALLSITE)),
            tracing::metadata::Kind::EVENT,
        );
        writer.make_writer_for(&access).write_all(b"a1\n").unwrap();
        writer.make_writer_for(&access).write_all(b"a2\n").unwrap();
        assert_eq!(written(&writer), b"");
        writer.make_writer().write_all(b"warn\n").unwrap();
        assert_eq!(written(&writer), b"a1\na2\nwarn\n");
        writer.make_writer_for(&access).write_all(b"a3\n").unwrap();
        assert_eq!(written(&writer).len(), 11, "a3 waits");
        let long = vec![b'x'; ACCESS_LOG_BUFFER_BYTES];
        writer.make_writer_for(&access).write_all(&long).unwrap();
        assert_eq!(
            written(&writer).len(),
            11 + 3 + long.len(),
            "a full buffer is written out"
        );
        writer.make_writer_for(&access).write_all(b"a4\n").unwrap();
        writer.flush().unwrap();
        assert!(written(&writer).ends_with(b"xa4\n"));
    }

    /// The fast fields write what tracing-subscriber's own write, for every kind of value
    /// the access log sends and the ones that fall back.
    #[test]
    fn log_fields_are_written_as_the_default_fields() {
        use tracing_subscriber::fmt::format::DefaultFields;
        fn line(fields: impl for<'w> FormatFields<'w> + Send + Sync + 'static) -> String {
            let out = Arc::new(Mutex::new(Vec::new()));
            let sink = out.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_ansi(false)
                .without_time()
                .fmt_fields(fields)
                .with_writer(move || Tee(sink.clone()))
                .finish();
            tracing::subscriber::with_default(subscriber, || {
                let error = std::io::Error::other("gone");
                let none: Option<&str> = None;
                tracing::info!(
                    target: "access",
                    request_id = "8c2f0a",
                    path = "/a b/\"quoted\"\\",
                    host = "ünïcode",
                    status = 200u16,
                    delta = -3i64,
                    upstream = none,
                    bytes_in = Some(12u64),
                    duration_ms = 1.25f64,
                    debug = true,
                    r#type = "raw",
                    shown = %"display",
                    error = &error as &(dyn std::error::Error + 'static),
                    "the message {}", 7
                );
                tracing::info!(target: "access", only = 1u64);
            });
            let bytes = lock(&out).clone();
            String::from_utf8(bytes).unwrap()
        }
        #[derive(Clone)]
        struct Tee(Arc<Mutex<Vec<u8>>>);
        impl Write for Tee {
            fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
                lock(&self.0).extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let fast = line(LogFields);
        assert_eq!(fast, line(DefaultFields::new()));
        assert!(fast.contains(r#"request_id="8c2f0a" "#), "{fast}");
    }

    struct Callsite;
    static CALLSITE: Callsite = Callsite;
    impl tracing::callsite::Callsite for Callsite {
        fn set_interest(&self, _: tracing::subscriber::Interest) {}
        fn metadata(&self) -> &tracing::Metadata<'_> {
            unimplemented!("not registered")
        }
    }
}
