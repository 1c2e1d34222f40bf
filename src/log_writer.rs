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
//! Lines are formatted by tracing-subscriber's fmt layer (one `write_all` per line), with
//! [`LogFields`] writing the text format's fields; a caller with a line on the hot path (the
//! gateway's access log) may instead write the same bytes itself with [`TextLine`] when
//! [`direct_text`] offers the writer. It does not decide what is logged.

use std::cell::RefCell;
use std::io::{self, Write};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

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

    /// A writer that keeps what is written out in memory, nothing buffered (tests).
    #[cfg(test)]
    pub(crate) fn in_memory() -> LogWriter {
        LogWriter::new(Sink::Memory(Mutex::default()), 0)
    }

    /// What an [`LogWriter::in_memory`] writer has written out.
    #[cfg(test)]
    pub(crate) fn written(&self) -> Vec<u8> {
        match &self.shared.sink {
            Sink::Memory(memory) => lock(memory).clone(),
            Sink::Stdout => unreachable!("tests write to memory"),
        }
    }

    /// Writes out the access log lines buffered so far (at the end of the process).
    pub fn flush(&self) -> io::Result<()> {
        self.shared.write_out(&mut lock(&self.shared.pending))
    }
}

/// The process's writer, once `main` found that text lines may be written without the fmt
/// layer ([`LogWriter::offer_direct_text`]).
static DIRECT_TEXT: OnceLock<LogWriter> = OnceLock::new();

/// The writer a hot-path line may be written to with [`LogWriter::write_line`], when the log
/// is text without colours and its filter has no span or field directives (so that an enabled
/// target and level is all that decides whether a line is written). `None`: emit a `tracing`
/// event (JSON, a terminal, a test's own subscriber).
pub fn direct_text() -> Option<&'static LogWriter> {
    DIRECT_TEXT.get()
}

impl LogWriter {
    /// Offers this writer to [`direct_text`]'s callers. `main` calls it for the text format
    /// without ANSI colours and a filter of targets and levels only.
    pub fn offer_direct_text(&self) {
        let _ = DIRECT_TEXT.set(self.clone());
    }

    /// Writes one line of `target` at `level` as the text format's fmt layer would (timestamp,
    /// level, target, then the fields `fields` writes), buffered like every line of
    /// [`BUFFERED_TARGETS`]. No allocation once the thread's line buffer has grown.
    pub fn write_line(
        &self,
        level: tracing::Level,
        target: &str,
        fields: impl FnOnce(&mut TextLine<'_>),
    ) {
        LINE.with_borrow_mut(|buffer| {
            buffer.clear();
            write_timestamp(buffer, SystemTime::now());
            buffer.extend_from_slice(level_text(level));
            buffer.push(b' ');
            buffer.extend_from_slice(target.as_bytes());
            buffer.extend_from_slice(b": ");
            let mut line = TextLine {
                out: buffer,
                is_empty: true,
            };
            fields(&mut line);
            buffer.push(b'\n');
            let _ = Line {
                shared: &self.shared,
                buffered: BUFFERED_TARGETS.contains(&target),
            }
            .write_all(buffer);
        });
    }
}

thread_local! {
    /// The line [`LogWriter::write_line`] formats into, kept for the thread's next line.
    static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// The last second [`write_timestamp`] formatted, and its text up to the seconds' dot.
    static SECOND: RefCell<(u64, [u8; 20])> = const { RefCell::new((u64::MAX, [0; 20])) };
}

/// The level as the fmt layer writes it without colours (right-aligned in five), and a space.
fn level_text(level: tracing::Level) -> &'static [u8] {
    match level {
        tracing::Level::TRACE => b"TRACE",
        tracing::Level::DEBUG => b"DEBUG",
        tracing::Level::INFO => b" INFO",
        tracing::Level::WARN => b" WARN",
        tracing::Level::ERROR => b"ERROR",
    }
}

/// `2026-12-06T23:40:48.922355Z ` as tracing-subscriber's `SystemTime` timer writes it (UTC,
/// microseconds), the date and time of day formatted once a second per thread.
fn write_timestamp(out: &mut Vec<u8>, now: SystemTime) {
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with_borrow_mut(|(second, text)| {
        if *second != secs {
            let at = time::OffsetDateTime::from_unix_timestamp(secs as i64)
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            let mut pos = 0;
            let mut digits = |value: u32, width: usize, then: u8| {
                for i in (0..width).rev() {
                    text[pos + i] = b'0' + (value / 10u32.pow((width - 1 - i) as u32) % 10) as u8;
                }
                text[pos + width] = then;
                pos += width + 1;
            };
            digits(at.year().clamp(0, 9999) as u32, 4, b'-');
            digits(at.month() as u32, 2, b'-');
            digits(at.day() as u32, 2, b'T');
            digits(at.hour() as u32, 2, b':');
            digits(at.minute() as u32, 2, b':');
            digits(at.second() as u32, 2, b'.');
            *second = secs;
        }
        out.extend_from_slice(&text[..]);
    });
    let micros = since.subsec_micros();
    let mut fraction = *b"000000Z ";
    let mut buffer = itoa::Buffer::new();
    let text = buffer.format(micros).as_bytes();
    fraction[6 - text.len()..6].copy_from_slice(text);
    out.extend_from_slice(&fraction);
}

/// One text line's fields, written as [`LogFields`] writes them (so as tracing-subscriber's
/// `DefaultFields`): `name=value` separated by spaces, strings in quotes, `Display` values as
/// they are, floats in their `Debug` form.
pub struct TextLine<'a> {
    out: &'a mut Vec<u8>,
    is_empty: bool,
}

impl TextLine<'_> {
    fn name(&mut self, name: &str) {
        if !self.is_empty {
            self.out.push(b' ');
        }
        self.is_empty = false;
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'=');
    }

    /// A string field: `name="value"` (escaped as `Debug` escapes it, when it must be).
    pub fn str(&mut self, name: &str, value: &str) {
        self.name(name);
        if quotes_as_is(value) {
            self.out.push(b'"');
            self.out.extend_from_slice(value.as_bytes());
            self.out.push(b'"');
        } else {
            let _ = write!(self.out, "{value:?}");
        }
    }

    pub fn u64(&mut self, name: &str, value: u64) {
        self.name(name);
        self.out
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }

    pub fn f64(&mut self, name: &str, value: f64) {
        self.name(name);
        match plain_f64(&mut ryu::Buffer::new(), value) {
            Some(text) => self.out.extend_from_slice(text.as_bytes()),
            None => {
                let _ = write!(self.out, "{value:?}");
            }
        }
    }

    /// A field recorded with `%value` (`tracing::field::display`): its `Display` text.
    pub fn display(&mut self, name: &str, value: &dyn fmt::Display) {
        self.name(name);
        let _ = write!(self.out, "{value}");
    }

    /// A socket address recorded with `%addr`: IPv4's written without `core::fmt`.
    pub fn socket_addr(&mut self, name: &str, addr: std::net::SocketAddr) {
        let std::net::SocketAddr::V4(v4) = addr else {
            return self.display(name, &addr);
        };
        self.name(name);
        let mut digits = itoa::Buffer::new();
        for (i, octet) in v4.ip().octets().into_iter().enumerate() {
            if i > 0 {
                self.out.push(b'.');
            }
            self.out.extend_from_slice(digits.format(octet).as_bytes());
        }
        self.out.push(b':');
        self.out
            .extend_from_slice(digits.format(v4.port()).as_bytes());
    }
}

/// `value`'s `Debug` text by ryu, where the two agree: finite, and zero or in [1e-4, 1e16)
/// (`Debug` switches to exponent notation outside it, ryu below 1e-5 and from 1e16). Both
/// print the shortest digits that read back as `value` (a property test checks).
fn plain_f64(buffer: &mut ryu::Buffer, value: f64) -> Option<&str> {
    let magnitude = value.abs();
    (value.is_finite() && (magnitude == 0.0 || (1e-4..1e16).contains(&magnitude)))
        .then(|| buffer.format_finite(value))
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

/// A string whose `Debug` form is itself in quotes: printable ASCII, no `"` or `\`. Hot path
/// (a dozen strings per access line): no early exit, so that the loop is vectorised (~10
/// instructions a byte when it was not).
fn quotes_as_is(value: &str) -> bool {
    !value.bytes().fold(false, |escaped, b| {
        escaped | !(0x20..0x7f).contains(&b) | (b == b'"') | (b == b'\\')
    })
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

    fn record_f64(&mut self, field: &Field, value: f64) {
        let mut buffer = ryu::Buffer::new();
        match plain_f64(&mut buffer, value) {
            Some(text) if Self::plain(field) => {
                if self.name(field) {
                    self.result = self.writer.write_str(text);
                }
            }
            _ => self.default_debug(field, &value),
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
        assert_eq!(writer.written(), b"");
        writer.make_writer().write_all(b"warn\n").unwrap();
        assert_eq!(writer.written(), b"a1\na2\nwarn\n");
        writer.make_writer_for(&access).write_all(b"a3\n").unwrap();
        assert_eq!(writer.written().len(), 11, "a3 waits");
        let long = vec![b'x'; ACCESS_LOG_BUFFER_BYTES];
        writer.make_writer_for(&access).write_all(&long).unwrap();
        assert_eq!(
            writer.written().len(),
            11 + 3 + long.len(),
            "a full buffer is written out"
        );
        writer.make_writer_for(&access).write_all(b"a4\n").unwrap();
        writer.flush().unwrap();
        assert!(writer.written().ends_with(b"xa4\n"));
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

    proptest::proptest! {
        /// Where ryu's text is used for a float, it is `Debug`'s: any bit pattern, and the
        /// milliseconds a request takes.
        #[test]
        fn ryu_writes_what_debug_writes_where_it_is_used(
            bits in proptest::num::u64::ANY,
            millis in 0.0001f64..1e7,
        ) {
            for value in [f64::from_bits(bits), millis, -millis] {
                if let Some(text) = plain_f64(&mut ryu::Buffer::new(), value) {
                    proptest::prop_assert_eq!(text, format!("{value:?}"));
                }
            }
        }
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
