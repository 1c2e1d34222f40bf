//! What hyper's HTTP/1 parser hides from the service, and what it answers on its own, seen
//! from the connection's bytes: every listener's connection runs through [`Framing`].
//!
//! - **Content-Length beside Transfer-Encoding.** hyper frames such a request as chunked,
//!   drops the Content-Length and only disables keep-alive (`proto/h1/role.rs`): the service
//!   cannot tell it from a plain chunked request. Envoy and nginx refuse it (RFC 9112 §6.1
//!   allows it, and it is how request smuggling starts), and so do we: the read side notes,
//!   per blank-line-delimited stretch of the bytes read, whether a line starting
//!   `content-length:` and one starting `transfer-encoding:` (any case, as hyper reads header
//!   names) both occur, and a request that carries `Transfer-Encoding` on a connection where
//!   that was seen is answered 400 (see [`Evidence::smuggling`]). A head holding both is
//!   always such a stretch (its lines start after a `\n`, and only a blank line ends it, for
//!   httparse as for us), so none is missed; the price of not framing bodies ourselves is that
//!   a body holding both lines may make a later chunked request on the same connection 400.
//!   The cost on the hot path is a `memchr` pass for `\n` over the bytes read, a byte looked
//!   at per line and a word-wise compare for lines starting `c`, `t` or `\r`: about 1,370
//!   instructions for a 380-byte signed head (docs/request-lifecycle.md).
//! - **hyper's own answers.** On a head it cannot parse (400), one over its buffer (431) or a
//!   target over 65,534 bytes (414) hyper writes a bare head itself and closes. The write side
//!   replaces that head, when it starts a write, carries no `x-request-id`, and every request
//!   hyper handed the service already had its response head written (counted here: a
//!   service's own 400 without `x-request-id`, as the proxy admin's errors are, is its
//!   answer and passes), with the same status, the APIG error body naming what was wrong,
//!   and an `X-Request-Id`.
//!
//! It does not parse HTTP, decide requests, or look at HTTP/2 (whose streams forbid
//! `Transfer-Encoding`, and whose errors are frames, not heads).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a connection's bytes and requests showed, shared by its reader, its writer, its
/// service and the idle check of [`crate::accept`] (no clock read per request).
#[derive(Debug, Default)]
pub struct Evidence {
    /// A blank-line-delimited stretch held both a `content-length:` and a
    /// `transfer-encoding:` line.
    both_lengths: AtomicBool,
    /// Requests in flight (until their response body is dropped).
    pub(crate) in_flight: AtomicUsize,
    /// Requests finished.
    pub(crate) finished: AtomicU64,
}

impl Evidence {
    /// Whether `request` must be refused as a possible smuggling attempt: an HTTP/1 request
    /// with `Transfer-Encoding` on a connection whose bytes held a head with a Content-Length
    /// beside a Transfer-Encoding. One relaxed load on the hot path.
    pub fn smuggling<B>(&self, request: &http::Request<B>) -> bool {
        self.both_lengths.load(Ordering::Relaxed)
            && request.version() < http::Version::HTTP_2
            && request
                .headers()
                .contains_key(http::header::TRANSFER_ENCODING)
    }
}

/// The answer to a request refused by [`Evidence::smuggling`]: 400, the APIG error body
/// (`error_code` is the listener's), `X-Request-Id`, and the connection closed after it.
pub fn smuggling_response(error_code: &'static str) -> http::Response<Bytes> {
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    let body = crate::apig::ErrorBody {
        error_code,
        error_msg: "the request has both Content-Length and Transfer-Encoding: \
                    refused, as RFC 9112 §6.1 allows (a request-smuggling vector)",
        request_id: &request_id,
    }
    .to_json();
    http::Response::builder()
        .status(http::StatusCode::BAD_REQUEST)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CONNECTION, "close")
        .header("x-request-id", request_id)
        .body(Bytes::from(body))
        .expect("a valid response")
}

/// Longest header name we look for: `transfer-encoding:`.
const NAME_MAX: usize = 18;
const CONTENT_LENGTH: &[u8] = b"content-length:";
const TRANSFER_ENCODING: &[u8] = b"transfer-encoding:";

/// The read side's line scanner: line starts only, across reads.
#[derive(Debug, Default)]
struct Lines {
    /// The first bytes of a line that a read ended in, while fewer than [`NAME_MAX`].
    carry: [u8; NAME_MAX],
    carry_len: usize,
    /// A line started at the end of the last read and `carry` holds its first bytes.
    carrying: bool,
    content_length: bool,
    transfer_encoding: bool,
}

/// What a line's first bytes (up to [`NAME_MAX`], fewer only if the line is that short or
/// the bytes read end there) say.
#[derive(Debug, PartialEq, Eq)]
enum Start {
    /// An empty line (or one starting `\r`, which httparse accepts only as `\r\n`).
    Blank,
    ContentLength,
    TransferEncoding,
    Other,
    /// Could still be one of ours: more bytes needed.
    Short,
}

fn classify(start: &[u8], complete: bool) -> Start {
    let name = match start.first() {
        None if complete => return Start::Blank,
        None => return Start::Short,
        Some(b'\r' | b'\n') => return Start::Blank,
        Some(b'c' | b'C') => CONTENT_LENGTH,
        Some(b't' | b'T') => TRANSFER_ENCODING,
        Some(_) => return Start::Other,
    };
    let found = if name == CONTENT_LENGTH {
        Start::ContentLength
    } else {
        Start::TransferEncoding
    };
    if start.len() >= name.len() {
        // The whole name is there: compared eight bytes at a time.
        return if names_match(start, name) {
            found
        } else {
            Start::Other
        };
    }
    let n = start.len();
    if !start.eq_ignore_ascii_case(&name[..n]) || complete {
        Start::Other
    } else {
        Start::Short
    }
}

/// ASCII letters to lower case, eight bytes at a time (`| 0x20`). It also maps `\r` onto `-`
/// and `\x1a` onto `:`, which no header name may hold (httparse refuses such a head): at
/// worst a line that is no header counts as one, never the other way round.
const LOWER: u64 = 0x2020_2020_2020_2020;

/// The eight bytes of `bytes` at `at` as one little-endian word (callers pass at least that
/// many; fewer read as 0).
#[inline]
fn word(bytes: &[u8], at: usize) -> u64 {
    bytes
        .get(at..at + 8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_le_bytes)
}

/// Whether `start` begins with `name` (one of ours, 15 or 18 bytes), any case: three or
/// fewer eight-byte compares, overlapping at the end.
fn names_match(start: &[u8], name: &[u8]) -> bool {
    let last = name.len() - 8;
    [0, 8.min(last), last]
        .into_iter()
        .all(|at| word(start, at) | LOWER == word(name, at))
}

/// Whether a line starting with `byte` may be one [`classify`] tells apart from
/// [`Start::Other`]: the hot path looks at no more of most lines.
fn may_matter(byte: u8) -> bool {
    matches!(byte, b'c' | b'C' | b't' | b'T' | b'\r' | b'\n')
}

impl Lines {
    /// Takes the bytes just read; returns true when a stretch holds both lines.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        let mut both = false;
        if self.carrying {
            // The line that began at the end of the last read.
            let take = (NAME_MAX - self.carry_len).min(bytes.len());
            let ends = bytes[..take].iter().position(|&b| b == b'\n');
            let end = ends.unwrap_or(take);
            self.carry[self.carry_len..self.carry_len + end].copy_from_slice(&bytes[..end]);
            self.carry_len += end;
            let carry = self.carry;
            let start = &carry[..self.carry_len];
            match classify(start, ends.is_some() || self.carry_len == NAME_MAX) {
                Start::Short => return false,
                seen => {
                    self.carrying = false;
                    both |= self.note(seen);
                }
            }
        }
        for newline in memchr::memchr_iter(b'\n', bytes) {
            if self.line(bytes, newline + 1, &mut both) {
                return both;
            }
        }
        both
    }

    /// A line starting at `line` in `bytes` (perhaps at its end): noted; true when it needs
    /// the next read (its start is carried).
    #[inline]
    fn line(&mut self, bytes: &[u8], line: usize, both: &mut bool) -> bool {
        if bytes.get(line).is_some_and(|&first| !may_matter(first)) {
            return false;
        }
        let rest = &bytes[line..];
        let head = &rest[..rest.len().min(NAME_MAX)];
        let (start, line_ends) = match head.iter().position(|&b| b == b'\n') {
            Some(end) => (&head[..end], true),
            None => (head, false),
        };
        match classify(start, line_ends || head.len() == NAME_MAX) {
            Start::Short => {
                self.carry[..start.len()].copy_from_slice(start);
                self.carry_len = start.len();
                self.carrying = true;
                true
            }
            seen => {
                *both |= self.note(seen);
                false
            }
        }
    }

    fn note(&mut self, start: Start) -> bool {
        match start {
            Start::Blank => {
                self.content_length = false;
                self.transfer_encoding = false;
            }
            Start::ContentLength => self.content_length = true,
            Start::TransferEncoding => self.transfer_encoding = true,
            Start::Other | Start::Short => {}
        }
        self.content_length && self.transfer_encoding
    }
}

/// A connection's bytes, watched on the way in (see the module docs) and with hyper's own
/// error heads replaced on the way out.
pub struct Framing<I> {
    inner: I,
    evidence: Arc<Evidence>,
    lines: Lines,
    /// The `error_code` of this listener's malformed-request answers.
    error_code: &'static str,
    /// `gateway.max_header_bytes` as this listener applies it, named in a 431.
    max_header_bytes: usize,
    /// Our answer in place of hyper's, and how much of it is written.
    replacing: Option<(Bytes, usize)>,
    /// Response heads written so far (writes that start `HTTP/1.`): hyper writes one of its
    /// own only when every request it handed the service has had its head written.
    heads: u64,
}

impl<I> Framing<I> {
    pub fn new(
        inner: I,
        evidence: Arc<Evidence>,
        error_code: &'static str,
        max_header_bytes: usize,
    ) -> Framing<I> {
        Framing {
            inner,
            evidence,
            lines: Lines::default(),
            error_code,
            max_header_bytes,
            replacing: None,
            heads: 0,
        }
    }
}

/// The status of a head hyper writes on its own, if `bytes` starts with one: 400, 414 or
/// 431, a whole head with no `x-request-id`.
fn hypers_own_head(bytes: &[u8]) -> Option<http::StatusCode> {
    let status = bytes
        .strip_prefix(b"HTTP/1.1 ")
        .or_else(|| bytes.strip_prefix(b"HTTP/1.0 "))?;
    let status = match status.get(..4)? {
        b"400 " => http::StatusCode::BAD_REQUEST,
        b"414 " => http::StatusCode::URI_TOO_LONG,
        b"431 " => http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        _ => return None,
    };
    let end = memchr::memmem::find(bytes, b"\r\n\r\n")?;
    let head = &bytes[..end];
    let has_id = head
        .split(|&b| b == b'\n')
        .any(|line| line.len() >= 13 && line[..13].eq_ignore_ascii_case(b"x-request-id:"));
    (!has_id).then_some(status)
}

/// Our answer in place of hyper's `status`.
fn our_answer(status: http::StatusCode, error_code: &str, max_header_bytes: usize) -> Bytes {
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    let message = match status {
        http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => {
            format!("the request head is over {max_header_bytes} bytes (gateway.max_header_bytes)")
        }
        http::StatusCode::URI_TOO_LONG => {
            "the request target is over 65534 bytes (HTTP/1.1 request-line limit)".to_owned()
        }
        _ => "the request head is not valid HTTP/1.1 (RFC 9112: request line, header field \
              syntax, or Transfer-Encoding on HTTP/1.0 or not ending in chunked)"
            .to_owned(),
    };
    let body = crate::apig::ErrorBody {
        error_code,
        error_msg: &message,
        request_id: &request_id,
    }
    .to_json();
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         x-request-id: {request_id}\r\nconnection: close\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    let mut answer = head.into_bytes();
    answer.extend_from_slice(&body);
    Bytes::from(answer)
}

impl<I: AsyncRead + Unpin> AsyncRead for Framing<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if this.lines.feed(&buf.filled()[before..]) {
            this.evidence.both_lengths.store(true, Ordering::Relaxed);
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> Framing<I> {
    /// Writes what is left of our answer; ready once it is all written.
    fn poll_replacing(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while let Some((answer, written)) = &mut self.replacing {
            if *written == answer.len() {
                break;
            }
            let n =
                std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &answer[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(()))
    }

    /// Whether `first` (the start of a write) is hyper's own error head: then our answer
    /// replaces it and everything hyper writes after it.
    fn replaces(&mut self, first: &[u8]) -> bool {
        if self.replacing.is_some() {
            return true;
        }
        if !first.starts_with(b"HTTP/1.") {
            return false;
        }
        // Requests handed to the service so far; each has its response head written before
        // hyper may write one of its own (a body frame written apart that starts `HTTP/1.`
        // can only make this refuse to replace, never replace an answer of ours).
        let calls = self.evidence.finished.load(Ordering::Relaxed)
            + self.evidence.in_flight.load(Ordering::Relaxed) as u64;
        match hypers_own_head(first) {
            Some(status) if self.heads >= calls => {
                let answer = our_answer(status, self.error_code, self.max_header_bytes);
                self.replacing = Some((answer, 0));
                true
            }
            _ => {
                // An interim `100 Continue` precedes its request's answer: not counted.
                if first.get(9) != Some(&b'1') {
                    self.heads += 1;
                }
                false
            }
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Framing<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.replaces(buf) {
            std::task::ready!(this.poll_replacing(cx))?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &b[..]);
        if this.replaces(first) {
            std::task::ready!(this.poll_replacing(cx))?;
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_replacing(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_replacing(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both(reads: &[&[u8]]) -> bool {
        let mut lines = Lines::default();
        reads
            .iter()
            .fold(false, |seen, read| lines.feed(read) | seen)
    }

    #[test]
    fn content_length_beside_transfer_encoding_is_seen_in_any_order_case_and_split() {
        let head: &[u8] =
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTRANSFER-ENCODING: chunked\r\n\r\n";
        assert!(both(&[head]));
        let reversed: &[u8] =
            b"POST / HTTP/1.1\ntransfer-encoding: chunked\nhost: a\ncontent-length: 5\n\n";
        assert!(both(&[reversed]));
        // Split at every byte: the carry across reads sees the same.
        for split in 0..head.len() {
            assert!(both(&[&head[..split], &head[split..]]), "split at {split}");
        }
        for split in 0..reversed.len() {
            assert!(
                both(&[&reversed[..split], &reversed[split..]]),
                "split at {split}"
            );
        }
        // One byte per read.
        let bytes: Vec<&[u8]> = head.chunks(1).collect();
        assert!(both(&bytes));
    }

    #[test]
    fn one_of_them_or_both_in_different_heads_is_not_seen() {
        assert!(!both(&[
            b"POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\nhelloPOST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
        ]));
        assert!(!both(&[
            b"POST / HTTP/1.1\r\ncontent-lengthy: 5\r\nx-transfer-encoding: chunked\r\n\r\n"
        ]));
        assert!(!both(&[b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"]));
    }

    #[test]
    fn hypers_own_heads_are_told_from_ours() {
        assert_eq!(
            hypers_own_head(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"),
            Some(http::StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            hypers_own_head(b"HTTP/1.1 431 Request Header Fields Too Large\r\ndate: x\r\n\r\n"),
            Some(http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
        assert_eq!(
            hypers_own_head(b"HTTP/1.1 400 Bad Request\r\nX-Request-Id: 1\r\n\r\n"),
            None
        );
        assert_eq!(hypers_own_head(b"HTTP/1.1 200 OK\r\n\r\n"), None);
        assert_eq!(hypers_own_head(b"{\"a\":1}"), None);
        let answer = our_answer(http::StatusCode::URI_TOO_LONG, "APIG.0201", 10);
        assert!(answer.starts_with(b"HTTP/1.1 414 URI Too Long\r\n"));
        assert_eq!(hypers_own_head(&answer), None);
    }

    mod properties {
        use super::super::Lines;
        use proptest::prelude::*;

        /// A line of a head: a header of one of the two names (any case) or another, or a
        /// blank line, each ended by `\r\n` or `\n`.
        fn line() -> impl Strategy<Value = (u8, String)> {
            let name = prop_oneof![
                Just("content-length".to_owned()),
                Just("transfer-encoding".to_owned()),
                "[a-z-]{0,20}",
            ];
            (0u8..5, name, any::<u64>(), "[ -~]{0,24}", any::<bool>()).prop_map(
                |(kind, name, case, value, crlf)| {
                    let end = if crlf { "\r\n" } else { "\n" };
                    if kind == 0 {
                        return (0, end.to_owned());
                    }
                    let cased: String = name
                        .chars()
                        .enumerate()
                        .map(|(i, c)| {
                            if case >> (i % 64) & 1 == 1 {
                                c.to_ascii_uppercase()
                            } else {
                                c
                            }
                        })
                        .collect();
                    (kind, format!("{cased}:{value}{end}"))
                },
            )
        }

        /// Whether a blank-line-delimited stretch of `lines` holds both names: what the
        /// scanner must say, computed line by line.
        fn expected(lines: &[(u8, String)]) -> bool {
            let (mut cl, mut te) = (false, false);
            for (kind, line) in lines {
                if *kind == 0 {
                    (cl, te) = (false, false);
                    continue;
                }
                let lower = line.to_ascii_lowercase();
                cl |= lower.starts_with("content-length:");
                te |= lower.starts_with("transfer-encoding:");
                if cl && te {
                    return true;
                }
            }
            false
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            /// However the bytes are split into reads, the scanner says what a line-by-line
            /// reading of the heads says.
            #[test]
            fn the_scan_matches_a_line_by_line_reading_at_any_split(
                lines in proptest::collection::vec(line(), 0..24),
                splits in proptest::collection::vec(any::<usize>(), 0..8),
            ) {
                let mut bytes = b"POST / HTTP/1.1\r\n".to_vec();
                for (_, line) in &lines {
                    bytes.extend_from_slice(line.as_bytes());
                }
                let mut cuts: Vec<usize> = splits.iter().map(|s| s % (bytes.len() + 1)).collect();
                cuts.sort_unstable();
                let mut scan = Lines::default();
                let mut seen = false;
                let mut from = 0;
                for cut in cuts.into_iter().chain([bytes.len()]) {
                    seen |= scan.feed(&bytes[from..cut]);
                    from = cut;
                }
                prop_assert_eq!(seen, expected(&lines));
            }
        }
    }
}
