//! Our HTTP/1.1 client connection to a backend, driven from the request's own task
//! (pingora-core's `protocols/http/v1/client.rs` is the model): a `TcpStream` and a read
//! buffer, boxed so that the pool and a request hand it to each other as one pointer. It
//! writes the request head straight into one buffer, sends it with the body, parses the
//! answer's head with `httparse` and frames its body (length, chunked, or until EOF).
//!
//! It owns the wire format only: it does not pool, time out, retry or decide what a
//! failure costs the buyer (`forward.rs` does), and it never touches the headers it is
//! given beyond writing them (hop-by-hop stripping is `forward.rs`'s). Hot path: no
//! `String` is built and no allocation is made per request beyond the response's
//! `HeaderMap` and what the read buffer's growth costs.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use http_body::Body as _;
use tokio::io::{AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;

use super::{Body, BoxError};

/// At most this many header fields in a response head (hyper's client has the same bound).
pub const MAX_RESPONSE_HEADERS: usize = 100;
/// A response head (status line and fields) must fit in this many bytes.
pub const MAX_RESPONSE_HEAD_BYTES: usize = 64 * 1024;
/// A chunk-size line (with its extensions) longer than this is refused.
const MAX_CHUNK_LINE_BYTES: usize = 4 * 1024;
/// A chunked body's trailer section longer than this is refused (it is read and dropped).
const MAX_TRAILER_BYTES: usize = 64 * 1024;
/// Room a read is given at least; when the buffer has less spare, this much more is reserved.
const READ_MIN_BYTES: usize = 2 * 1024;
/// The first read's room; doubled while reads fill it (a large body), up to the maximum.
const READ_START_BYTES: usize = 8 * 1024;
const READ_MAX_BYTES: usize = 256 * 1024;
/// The request head buffer's first size (it grows as needed and is kept).
const HEAD_START_BYTES: usize = 1024;

/// What went wrong on the wire. `forward.rs` wraps it in `ForwardError`, which says whether
/// the backend was reached.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("writing the request to the backend failed")]
    Write(#[source] io::Error),
    #[error("reading the backend's answer failed")]
    Read(#[source] io::Error),
    #[error("the backend closed the connection before a complete response head")]
    ClosedBeforeHead,
    #[error("the backend closed the connection before the response body ended")]
    ClosedInBody,
    #[error("the backend's response head is malformed")]
    MalformedHead(#[source] httparse::Error),
    #[error("the backend's response head is larger than {MAX_RESPONSE_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("the backend answered 101 Switching Protocols, which is not proxied")]
    SwitchingProtocols,
    #[error("the backend's Content-Length is invalid or given twice with different values")]
    BadContentLength,
    #[error("the backend's chunked body is malformed")]
    MalformedChunk,
    #[error("the request body failed")]
    RequestBody(#[source] BoxError),
    #[error("the request body's length is not the length it announced")]
    RequestBodyLength,
}

impl ClientError {
    /// A failure of the connection itself (closed, reset) rather than of what either side
    /// sent: on a reused connection with nothing of the answer in, the request may be sent
    /// again elsewhere.
    pub fn is_connection_lost(&self) -> bool {
        matches!(
            self,
            ClientError::Write(_) | ClientError::Read(_) | ClientError::ClosedBeforeHead
        )
    }
}

/// One HTTP/1.1 connection to a backend. Always handled as `Box<Connection>`: the pool, the
/// request and the response body move it as one pointer.
pub struct Connection {
    stream: TcpStream,
    /// Bytes read and not yet consumed. Response heads and body data are split off it as
    /// `Bytes` (no copy); its allocation is reused once those are dropped.
    read: BytesMut,
    /// The room the next read is given (see `READ_START_BYTES`).
    read_size: usize,
    /// The request head being sent; its capacity is kept from request to request.
    head: Vec<u8>,
}

/// How a request body goes on the wire.
pub enum Outgoing {
    /// All of it is in hand (possibly nothing): written with the head, and can be written
    /// again on another connection.
    Whole(Bytes),
    /// Streamed as it comes: with `Content-Length` when its size is known, else chunked.
    /// `first` is data already taken from it.
    Stream {
        body: Body,
        length: Option<u64>,
        first: Option<Bytes>,
    },
}

impl Outgoing {
    /// Sorts a body out without waiting: one that has ended, or that yields all of its
    /// known size at once (a `Full`), is whole; anything else streams.
    pub fn new(mut body: Body) -> Result<Outgoing, ClientError> {
        if body.is_end_stream() {
            return Ok(Outgoing::Whole(Bytes::new()));
        }
        let length = body.size_hint().exact();
        let mut first = None;
        if let Some(length) = length {
            // A no-op waker: a body that is not ready is polled again with the request's
            // own waker once the head is out.
            let mut cx = Context::from_waker(Waker::noop());
            match Pin::new(&mut body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        if data.len() as u64 == length && body.is_end_stream() {
                            return Ok(Outgoing::Whole(data));
                        }
                        if data.len() as u64 > length {
                            return Err(ClientError::RequestBodyLength);
                        }
                        first = Some(data);
                    }
                }
                Poll::Ready(Some(Err(error))) => return Err(ClientError::RequestBody(error)),
                Poll::Ready(None) if length == 0 => return Ok(Outgoing::Whole(Bytes::new())),
                Poll::Ready(None) => return Err(ClientError::RequestBodyLength),
                Poll::Pending => {}
            }
        }
        Ok(Outgoing::Stream {
            body,
            length,
            first,
        })
    }

    /// The `Content-Length` to send, if the size is known.
    fn length(&self) -> Option<u64> {
        match self {
            Outgoing::Whole(bytes) => Some(bytes.len() as u64),
            Outgoing::Stream { length, .. } => *length,
        }
    }
}

/// Methods whose empty body is sent without `content-length: 0` (as hyper's client did).
fn no_length_when_empty(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET
            | Method::HEAD
            | Method::DELETE
            | Method::OPTIONS
            | Method::CONNECT
            | Method::TRACE
    )
}

impl Connection {
    pub fn new(stream: TcpStream) -> Box<Connection> {
        Box::new(Connection {
            stream,
            read: BytesMut::new(),
            read_size: READ_START_BYTES,
            head: Vec::with_capacity(HEAD_START_BYTES),
        })
    }

    /// Whether an idle connection can take a request: nothing arrived on it since its last
    /// answer (no EOF, no stray bytes). Reads tokio's readiness, no system call — unless
    /// the last read filled its room exactly and so left the socket marked readable: then
    /// one non-blocking read tells.
    pub fn idle_and_open(&mut self) -> bool {
        if !self.read.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => matches!(
                self.stream.try_read(&mut [0u8; 1]),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock
            ),
        }
    }

    /// Writes the request head into the connection's head buffer (see [`write_head`]).
    pub fn encode_head(
        &mut self,
        method: &Method,
        target: impl FnOnce(&mut Vec<u8>),
        host: &HeaderValue,
        headers: &HeaderMap,
        body: &Outgoing,
    ) {
        write_head(&mut self.head, method, target, host, headers, body);
    }

    /// The head last encoded, copied into another connection's buffer (a request sent again
    /// on a new connection).
    pub fn copy_head_from(&mut self, other: &Connection) {
        self.head.clear();
        self.head.extend_from_slice(&other.head);
    }

    /// Reads what the socket has into the read buffer. Ready(0): EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let spare = self.read.capacity() - self.read.len();
        if spare < READ_MIN_BYTES {
            self.read.reserve(self.read_size);
        }
        let room = self.read.capacity() - self.read.len();
        // `read_buf` through `AsyncRead::poll_read`: a read shorter than its room clears
        // tokio's readiness, which is what lets `idle_and_open` go without a system call.
        let n = ready!(std::pin::pin!(self.stream.read_buf(&mut self.read)).poll(cx))?;
        self.read_size = if n == room {
            (self.read_size * 2).min(READ_MAX_BYTES)
        } else {
            READ_START_BYTES
        };
        Poll::Ready(Ok(n))
    }
}

/// Writes a request head into `head`: the request line (the target written by `target`),
/// `Host` (the one given), every header as given except `Host`, `Content-Length` and
/// `Transfer-Encoding`, then the body's framing. Hot path.
fn write_head(
    head: &mut Vec<u8>,
    method: &Method,
    target: impl FnOnce(&mut Vec<u8>),
    host: &HeaderValue,
    headers: &HeaderMap,
    body: &Outgoing,
) {
    head.clear();
    head.extend_from_slice(method.as_str().as_bytes());
    head.push(b' ');
    target(head);
    head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    head.extend_from_slice(host.as_bytes());
    head.extend_from_slice(b"\r\n");
    let mut had_length = false;
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH {
            had_length = true;
            continue;
        }
        // Written above (the backend's, not the buyer's), and framing of our own below.
        if name == header::HOST || name == header::TRANSFER_ENCODING {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    match body.length() {
        Some(0) if !had_length && no_length_when_empty(method) => {}
        Some(length) => {
            head.extend_from_slice(b"content-length: ");
            push_decimal(head, length);
            head.extend_from_slice(b"\r\n");
        }
        None => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    head.extend_from_slice(b"\r\n");
}

/// Appends `n` in decimal.
fn push_decimal(dst: &mut Vec<u8>, n: u64) {
    dst.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// A chunk-size line for `n`: hex digits and CRLF, in a fixed buffer.
fn chunk_line(n: u64) -> ([u8; 18], u8) {
    let mut line = [0u8; 18];
    let digits = (64 - n.leading_zeros()).div_ceil(4).max(1) as usize;
    for (i, slot) in line[..digits].iter_mut().enumerate() {
        let nibble = (n >> (4 * (digits - 1 - i))) & 0xf;
        *slot = b"0123456789abcdef"[nibble as usize];
    }
    line[digits] = b'\r';
    line[digits + 1] = b'\n';
    (line, (digits + 2) as u8)
}

/// Writes the concatenation of `parts` from byte `written` on, advancing `written`; ready
/// when all of it is out. One `writev` per readiness.
fn poll_write_parts(
    stream: &mut TcpStream,
    cx: &mut Context<'_>,
    parts: [&[u8]; 3],
    written: &mut usize,
) -> Poll<io::Result<()>> {
    loop {
        let mut skip = *written;
        let mut slices = [IoSlice::new(&[]); 3];
        let mut count = 0;
        for part in parts {
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            slices[count] = IoSlice::new(&part[skip..]);
            skip = 0;
            count += 1;
        }
        if count == 0 {
            return Poll::Ready(Ok(()));
        }
        let n = if count == 1 {
            ready!(Pin::new(&mut *stream).poll_write(cx, &slices[0]))?
        } else {
            ready!(Pin::new(&mut *stream).poll_write_vectored(cx, &slices[..count]))?
        };
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        *written += n;
    }
}

/// A streamed request body on its way out.
struct Streaming {
    body: Body,
    /// Bytes still owed under `Content-Length`; `None`: chunked.
    remaining: Option<u64>,
    /// The piece being written: a chunk-size line (chunked), data, a CRLF after it.
    line: ([u8; 18], u8),
    data: Bytes,
    suffix: &'static [u8],
    written: usize,
    /// The body has ended (its last piece may still be being written).
    ended: bool,
}

impl Streaming {
    /// The next piece to write: `data`, framed (its length already counted off
    /// `remaining` when the body has one).
    fn set_piece(&mut self, data: Bytes) {
        self.written = 0;
        if self.remaining.is_some() {
            self.line.1 = 0;
            self.suffix = b"";
        } else {
            self.line = chunk_line(data.len() as u64);
            self.suffix = b"\r\n";
        }
        self.data = data;
    }

    /// Counts `data` off the announced length.
    fn count(&mut self, data: &Bytes) -> Result<(), ClientError> {
        if let Some(remaining) = &mut self.remaining {
            *remaining = remaining
                .checked_sub(data.len() as u64)
                .ok_or(ClientError::RequestBodyLength)?;
        }
        Ok(())
    }

    fn set_end(&mut self) -> Result<(), ClientError> {
        self.ended = true;
        self.written = 0;
        self.data = Bytes::new();
        self.line.1 = 0;
        match self.remaining {
            Some(0) => self.suffix = b"",
            Some(_) => return Err(ClientError::RequestBodyLength),
            None => self.suffix = b"0\r\n\r\n",
        }
        Ok(())
    }
}

/// The request being written: its head and whole body, then a streamed body.
struct Sending {
    whole: Bytes,
    written: usize,
    stream: Option<Streaming>,
}

/// A request on a connection: written (head, then body, while the answer is read) and its
/// answer read. Holds the connection until the answer's body ends.
pub struct Exchange {
    conn: Box<Connection>,
    sending: Option<Sending>,
    /// Anything of the request was accepted by the socket.
    sent_any: bool,
    /// Anything of the answer arrived.
    received_any: bool,
    /// Writing failed (the backend may have answered and closed): the answer is still read,
    /// the connection is not reused. Reported if no answer comes.
    write_error: Option<io::Error>,
    /// The parse of the read buffer's current contents found it incomplete.
    parsed_len: usize,
}

/// How a response body is delimited.
#[derive(Clone, Copy)]
enum Framing {
    /// Nothing follows the head (HEAD request, 204, 304, `Content-Length: 0`).
    Empty,
    /// `Content-Length`: this many bytes still to come.
    Length(u64),
    Chunked(Chunk),
    /// Until the backend closes (no length given): never reused.
    Eof,
}

/// Where a chunked body's decoder is.
#[derive(Clone, Copy)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers(usize),
}

impl Exchange {
    /// Starts a request on `conn`: its head (encoded already) and body.
    pub fn start(conn: Box<Connection>, body: Outgoing) -> Exchange {
        let (whole, stream) = match body {
            Outgoing::Whole(bytes) => (bytes, None),
            Outgoing::Stream {
                body,
                length,
                first,
            } => {
                let mut streaming = Streaming {
                    body,
                    // `Outgoing::new` checked that `first` is within the length.
                    remaining: length.map(|n| n - first.as_ref().map_or(0, |d| d.len() as u64)),
                    line: ([0; 18], 0),
                    data: Bytes::new(),
                    suffix: b"",
                    written: 0,
                    ended: false,
                };
                if let Some(data) = first {
                    streaming.set_piece(data);
                }
                (Bytes::new(), Some(streaming))
            }
        };
        Exchange {
            conn,
            sending: Some(Sending {
                whole,
                written: 0,
                stream,
            }),
            sent_any: false,
            received_any: false,
            write_error: None,
            parsed_len: 0,
        }
    }

    /// Anything of the request was written.
    pub fn sent_any(&self) -> bool {
        self.sent_any
    }

    /// Anything of the answer arrived.
    pub fn received_any(&self) -> bool {
        self.received_any
    }

    /// The connection, once the exchange failed (to copy its head for a second try).
    pub fn into_connection(self) -> Box<Connection> {
        self.conn
    }

    /// Writes what it can of the request. Ready(Ok) once all of it is out, or once a write
    /// failed (kept in `write_error`: the answer may still come). Errors: the body's own.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ClientError>> {
        let Some(sending) = &mut self.sending else {
            return Poll::Ready(Ok(()));
        };
        let conn = &mut *self.conn;
        let result = loop {
            let before = sending.written;
            let whole = poll_write_parts(
                &mut conn.stream,
                cx,
                [&conn.head, &sending.whole, b""],
                &mut sending.written,
            );
            self.sent_any |= sending.written > before;
            match whole {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(error)) => break Err(error),
                Poll::Ready(Ok(())) => {}
            }
            let Some(stream) = &mut sending.stream else {
                break Ok(());
            };
            match poll_write_parts(
                &mut conn.stream,
                cx,
                [
                    &stream.line.0[..stream.line.1 as usize],
                    &stream.data,
                    stream.suffix,
                ],
                &mut stream.written,
            ) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(error)) => break Err(error),
                Poll::Ready(Ok(())) => {}
            }
            if stream.ended {
                break Ok(());
            }
            match ready!(Pin::new(&mut stream.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // Trailers of a streamed body are not forwarded.
                    if let Ok(data) = frame.into_data() {
                        if !data.is_empty() {
                            stream.count(&data)?;
                            stream.set_piece(data);
                        }
                    }
                }
                Some(Err(error)) => return Poll::Ready(Err(ClientError::RequestBody(error))),
                None => stream.set_end()?,
            }
        };
        self.sending = None;
        if let Err(error) = result {
            self.write_error = Some(error);
        }
        Poll::Ready(Ok(()))
    }

    /// Writes the request and reads the answer's head (1xx answers skipped). Hot path.
    pub fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        method: &Method,
    ) -> Poll<Result<(Response<()>, BodyReader), ClientError>> {
        loop {
            if let Poll::Ready(Err(error)) = self.poll_send(cx) {
                return Poll::Ready(Err(error));
            }
            if self.conn.read.len() > self.parsed_len {
                if let Some(head) = parse_head(&mut self.conn.read, method)? {
                    self.parsed_len = 0;
                    match head {
                        Parsed::Informational => continue,
                        Parsed::Final(response, framing, keep_alive) => {
                            let reader = BodyReader {
                                done: matches!(framing, Framing::Empty),
                                framing,
                                keep_alive,
                            };
                            return Poll::Ready(Ok((response, reader)));
                        }
                    }
                }
                if self.conn.read.len() >= MAX_RESPONSE_HEAD_BYTES {
                    return Poll::Ready(Err(ClientError::HeadTooLarge));
                }
                self.parsed_len = self.conn.read.len();
            }
            match ready!(self.conn.poll_fill(cx)) {
                Ok(0) => {
                    return Poll::Ready(Err(match self.write_error.take() {
                        Some(error) if !self.received_any => ClientError::Write(error),
                        _ => ClientError::ClosedBeforeHead,
                    }))
                }
                Ok(_) => self.received_any = true,
                Err(error) => {
                    return Poll::Ready(Err(match self.write_error.take() {
                        Some(error) if !self.received_any => ClientError::Write(error),
                        _ => ClientError::Read(error),
                    }))
                }
            }
        }
    }

    /// The next piece of the answer's body; `None` at its end. Keeps writing the request's
    /// body meanwhile.
    pub fn poll_body(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut BodyReader,
    ) -> Poll<Option<Result<Bytes, ClientError>>> {
        if let Poll::Ready(Err(error)) = self.poll_send(cx) {
            return Poll::Ready(Some(Err(error)));
        }
        loop {
            if reader.done {
                return Poll::Ready(None);
            }
            let read = &mut self.conn.read;
            match &mut reader.framing {
                Framing::Empty => reader.done = true,
                Framing::Length(0) => reader.done = true,
                Framing::Length(remaining) => {
                    if !read.is_empty() {
                        let n = (*remaining).min(read.len() as u64);
                        *remaining -= n;
                        // Done with the last byte: the consumer may stop polling once
                        // `is_end_stream` says so.
                        reader.done = *remaining == 0;
                        return Poll::Ready(Some(Ok(read.split_to(n as usize).freeze())));
                    }
                }
                Framing::Eof => {
                    if !read.is_empty() {
                        return Poll::Ready(Some(Ok(read.split().freeze())));
                    }
                }
                Framing::Chunked(state) => match decode_chunked(read, state) {
                    Err(error) => return Poll::Ready(Some(Err(error))),
                    Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(data))),
                    Ok(Decoded::End) => reader.done = true,
                    Ok(Decoded::More) => {}
                },
            }
            if reader.done {
                continue;
            }
            match ready!(self.conn.poll_fill(cx)) {
                Ok(0) if matches!(reader.framing, Framing::Eof) => reader.done = true,
                Ok(0) => return Poll::Ready(Some(Err(ClientError::ClosedInBody))),
                Ok(_) => {}
                Err(error) => return Poll::Ready(Some(Err(ClientError::Read(error)))),
            }
        }
    }

    /// The connection, if it can take another request: the request all written, the answer
    /// all read (and nothing after it), and neither side asked to close.
    pub fn reusable(self, reader: &BodyReader) -> Option<Box<Connection>> {
        let reusable = reader.done
            && reader.keep_alive
            && self.sending.is_none()
            && self.write_error.is_none()
            && self.conn.read.is_empty();
        reusable.then_some(self.conn)
    }
}

/// How the answer's body is read, and whether the connection may be kept after it.
pub struct BodyReader {
    framing: Framing,
    keep_alive: bool,
    done: bool,
}

impl BodyReader {
    /// The body has been read to its end.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The bytes still to come, where the answer said.
    pub fn exact_remaining(&self) -> Option<u64> {
        match self.framing {
            _ if self.done => Some(0),
            Framing::Empty => Some(0),
            Framing::Length(remaining) => Some(remaining),
            Framing::Chunked(_) | Framing::Eof => None,
        }
    }
}

enum Decoded {
    Data(Bytes),
    End,
    More,
}

/// Decodes what the buffer holds of a chunked body: data (without copying), the end, or
/// the need for more bytes. Chunk extensions and trailers are skipped.
fn decode_chunked(read: &mut BytesMut, state: &mut Chunk) -> Result<Decoded, ClientError> {
    loop {
        match *state {
            Chunk::Size => match httparse::parse_chunk_size(read) {
                Ok(httparse::Status::Complete((used, size))) => {
                    read.advance(used);
                    *state = if size == 0 {
                        Chunk::Trailers(0)
                    } else {
                        Chunk::Data(size)
                    };
                }
                Ok(httparse::Status::Partial) if read.len() > MAX_CHUNK_LINE_BYTES => {
                    return Err(ClientError::MalformedChunk)
                }
                Ok(httparse::Status::Partial) => return Ok(Decoded::More),
                Err(httparse::InvalidChunkSize) => return Err(ClientError::MalformedChunk),
            },
            Chunk::Data(remaining) => {
                if read.is_empty() {
                    return Ok(Decoded::More);
                }
                let n = remaining.min(read.len() as u64);
                *state = if n == remaining {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(remaining - n)
                };
                return Ok(Decoded::Data(read.split_to(n as usize).freeze()));
            }
            Chunk::DataEnd => {
                if read.len() < 2 {
                    return Ok(Decoded::More);
                }
                if &read[..2] != b"\r\n" {
                    return Err(ClientError::MalformedChunk);
                }
                read.advance(2);
                *state = Chunk::Size;
            }
            Chunk::Trailers(seen) => {
                let Some(end) = read.windows(2).position(|w| w == b"\r\n") else {
                    if seen + read.len() > MAX_TRAILER_BYTES {
                        return Err(ClientError::MalformedChunk);
                    }
                    return Ok(Decoded::More);
                };
                read.advance(end + 2);
                if end == 0 {
                    return Ok(Decoded::End);
                }
                if seen + end + 2 > MAX_TRAILER_BYTES {
                    return Err(ClientError::MalformedChunk);
                }
                *state = Chunk::Trailers(seen + end + 2);
            }
        }
    }
}

enum Parsed {
    /// A 1xx answer, consumed: the final one follows.
    Informational,
    Final(Response<()>, Framing, bool),
}

/// What the framing headers of a head said.
#[derive(Default)]
struct FramingHeaders {
    content_length: Option<u64>,
    bad_content_length: bool,
    transfer_encoding: bool,
    chunked_last: bool,
    close: bool,
    keep_alive: bool,
}

/// Parses a response head at the start of `read`; `None` if it is not all there yet. The
/// head is split off the buffer and frozen: header values are slices of it (no copy).
fn parse_head(read: &mut BytesMut, method: &Method) -> Result<Option<Parsed>, ClientError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut response = httparse::Response::new(&mut fields);
    let len = match response.parse(read) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(error) => return Err(ClientError::MalformedHead(error)),
    };
    let code = response.code.unwrap_or(0);
    if (100..200).contains(&code) {
        if code == 101 {
            return Err(ClientError::SwitchingProtocols);
        }
        read.advance(len);
        return Ok(Some(Parsed::Informational));
    }
    let status = StatusCode::from_u16(code)
        .map_err(|_| ClientError::MalformedHead(httparse::Error::Status))?;
    let version = if response.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let reason = response.reason.unwrap_or("");
    let base = read.as_ptr() as usize;
    // Offsets of names and values in the buffer: the parse borrows it, and the head is
    // split off it only after.
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_RESPONSE_HEADERS];
    let mut framing = FramingHeaders::default();
    let count = response.headers.len();
    for (field, span) in response.headers.iter().zip(spans.iter_mut()) {
        let name = field.name.as_bytes();
        let at = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
        *span = (
            at(name),
            name.len() as u32,
            at(field.value),
            field.value.len() as u32,
        );
        framing.note(name, field.value);
    }
    let reason_phrase = (!reason.is_empty() && status.canonical_reason() != Some(reason))
        .then(|| (reason.as_ptr() as usize - base, reason.len()));
    let head = read.split_to(len).freeze();

    let mut headers = HeaderMap::with_capacity(count);
    for &(name_at, name_len, value_at, value_len) in &spans[..count] {
        let name = &head[name_at as usize..(name_at + name_len) as usize];
        let name = HeaderName::from_bytes(name)
            .map_err(|_| ClientError::MalformedHead(httparse::Error::HeaderName))?;
        let value = head.slice(value_at as usize..(value_at + value_len) as usize);
        let value = HeaderValue::from_maybe_shared(value)
            .map_err(|_| ClientError::MalformedHead(httparse::Error::HeaderValue))?;
        headers.append(name, value);
    }
    let mut answer = Response::new(());
    *answer.status_mut() = status;
    *answer.version_mut() = version;
    *answer.headers_mut() = headers;
    if let Some((at, len)) = reason_phrase {
        // A non-standard reason phrase is passed on, as hyper's client did.
        if let Ok(phrase) = hyper::ext::ReasonPhrase::try_from(head.slice(at..at + len)) {
            answer.extensions_mut().insert(phrase);
        }
    }

    let mut keep_alive = if version == Version::HTTP_10 {
        framing.keep_alive && !framing.close
    } else {
        !framing.close
    };
    let body_less = *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let body = if body_less {
        Framing::Empty
    } else if framing.transfer_encoding {
        // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length; a message with both
        // may be an attempt at smuggling, so the connection is not reused after it.
        if framing.content_length.is_some() || framing.bad_content_length {
            keep_alive = false;
            // "A sender MUST remove the received Content-Length field prior to forwarding
            // such a message."
            answer.headers_mut().remove(header::CONTENT_LENGTH);
        }
        if framing.chunked_last {
            Framing::Chunked(Chunk::Size)
        } else {
            keep_alive = false;
            Framing::Eof
        }
    } else if framing.bad_content_length {
        return Err(ClientError::BadContentLength);
    } else {
        match framing.content_length {
            Some(0) => Framing::Empty,
            Some(length) => Framing::Length(length),
            None => {
                keep_alive = false;
                Framing::Eof
            }
        }
    };
    Ok(Some(Parsed::Final(answer, body, keep_alive)))
}

impl FramingHeaders {
    /// Notes a field that bears on framing or on keeping the connection. Names are matched
    /// by length first: most fields cost one comparison.
    fn note(&mut self, name: &[u8], value: &[u8]) {
        match name.len() {
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                for part in value.split(|&b| b == b',') {
                    match parse_length(part.trim_ascii()) {
                        Some(n) if self.content_length.is_none_or(|seen| seen == n) => {
                            self.content_length = Some(n);
                        }
                        _ => self.bad_content_length = true,
                    }
                }
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                self.transfer_encoding = true;
                let last = value.rsplit(|&b| b == b',').next().unwrap_or(b"");
                self.chunked_last = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
            }
            10 if name.eq_ignore_ascii_case(b"connection") => {
                for token in value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        self.close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        self.keep_alive = true;
                    }
                }
            }
            _ => {}
        }
    }
}

/// A `Content-Length` value: digits only, no sign, no overflow.
fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &[u8], method: &Method) -> Result<Option<Parsed>, ClientError> {
        parse_head(&mut BytesMut::from(text), method)
    }

    fn framing_of(text: &[u8]) -> (Framing, bool) {
        match parsed(text, &Method::GET) {
            Ok(Some(Parsed::Final(_, framing, keep_alive))) => (framing, keep_alive),
            Ok(Some(Parsed::Informational)) => panic!("informational"),
            Ok(None) => panic!("partial"),
            Err(error) => panic!("{error}"),
        }
    }

    #[test]
    fn the_head_is_parsed_and_its_framing_read() {
        let (framing, keep) = framing_of(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello");
        assert!(matches!(framing, Framing::Length(5)) && keep);
        let (framing, keep) = framing_of(b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\n");
        assert!(matches!(framing, Framing::Length(5)) && keep);
        let (framing, keep) =
            framing_of(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n");
        assert!(matches!(framing, Framing::Chunked(_)) && keep);
        let (framing, keep) = framing_of(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n",
        );
        assert!(matches!(framing, Framing::Chunked(_)) && !keep, "TE + CL");
        let te_and_cl =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n";
        let Ok(Some(Parsed::Final(response, _, _))) = parsed(te_and_cl, &Method::GET) else {
            panic!("TE + CL parses");
        };
        assert!(
            !response.headers().contains_key("content-length"),
            "Content-Length is not passed on beside Transfer-Encoding"
        );
        let (framing, keep) = framing_of(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n");
        assert!(matches!(framing, Framing::Eof) && !keep);
        let (framing, keep) = framing_of(b"HTTP/1.1 200 OK\r\n\r\n");
        assert!(matches!(framing, Framing::Eof) && !keep);
        let (framing, keep) = framing_of(
            b"HTTP/1.1 200 OK\r\nconnection: Keep-Alive, close\r\ncontent-length: 0\r\n\r\n",
        );
        assert!(matches!(framing, Framing::Empty) && !keep);
        let (_, keep) = framing_of(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n");
        assert!(!keep, "HTTP/1.0 without keep-alive");
        let (_, keep) =
            framing_of(b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n");
        assert!(keep, "HTTP/1.0 with keep-alive");
        let (framing, keep) = framing_of(b"HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n");
        assert!(matches!(framing, Framing::Empty) && keep);
        match parsed(
            b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n",
            &Method::HEAD,
        ) {
            Ok(Some(Parsed::Final(_, Framing::Empty, true))) => {}
            _ => panic!("a HEAD answer has no body"),
        }
    }

    #[test]
    fn bad_heads_are_errors_and_partial_ones_wait() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999999\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length:\r\n\r\n",
        ] {
            assert!(
                matches!(
                    parsed(bad, &Method::GET),
                    Err(ClientError::BadContentLength)
                ),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(
            parsed(b"HTTP/1.1 abc OK\r\n\r\n", &Method::GET),
            Err(ClientError::MalformedHead(_))
        ));
        assert!(matches!(
            parsed(b"HTTP/1.1 101 Switching Protocols\r\n\r\n", &Method::GET),
            Err(ClientError::SwitchingProtocols)
        ));
        assert!(matches!(
            parsed(b"HTTP/1.1 200 OK\r\ncontent-le", &Method::GET),
            Ok(None)
        ));
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for _ in 0..=MAX_RESPONSE_HEADERS {
            many.extend_from_slice(b"x-a: 1\r\n");
        }
        many.extend_from_slice(b"\r\n");
        assert!(matches!(
            parsed(&many, &Method::GET),
            Err(ClientError::MalformedHead(httparse::Error::TooManyHeaders))
        ));
    }

    #[test]
    fn headers_and_reason_are_kept_and_1xx_is_consumed() {
        let mut read = BytesMut::from(
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 299 Fine\r\nX-A: 1\r\nx-a: 2\r\nServer: s\r\ncontent-length: 2\r\n\r\nok"[..],
        );
        assert!(matches!(
            parse_head(&mut read, &Method::GET),
            Ok(Some(Parsed::Informational))
        ));
        let Ok(Some(Parsed::Final(response, Framing::Length(2), true))) =
            parse_head(&mut read, &Method::GET)
        else {
            panic!("final answer");
        };
        assert_eq!(&read[..], b"ok");
        assert_eq!(response.status(), 299);
        let values: Vec<_> = response.headers().get_all("x-a").iter().collect();
        assert_eq!(values, ["1", "2"]);
        assert_eq!(response.headers()["server"], "s");
        let phrase = response.extensions().get::<hyper::ext::ReasonPhrase>();
        assert_eq!(phrase.map(|p| p.as_bytes()), Some(&b"Fine"[..]));
    }

    #[test]
    fn chunked_bodies_are_decoded_across_reads() {
        let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n";
        // Fed one byte at a time, then all at once: the same body.
        for step in [1, wire.len()] {
            let mut read = BytesMut::new();
            let mut state = Chunk::Size;
            let mut body = Vec::new();
            let mut fed = 0;
            loop {
                match decode_chunked(&mut read, &mut state).unwrap() {
                    Decoded::Data(data) => body.extend_from_slice(&data),
                    Decoded::End => break,
                    Decoded::More => {
                        assert!(fed < wire.len(), "ran out at {}", body.len());
                        let to = (fed + step).min(wire.len());
                        read.extend_from_slice(&wire[fed..to]);
                        fed = to;
                    }
                }
            }
            assert_eq!(body, b"hello world");
            assert!(read.is_empty());
        }
        let mut read = BytesMut::from(&b"5\r\nhelloXX"[..]);
        let mut state = Chunk::Size;
        assert!(matches!(
            decode_chunked(&mut read, &mut state),
            Ok(Decoded::Data(_))
        ));
        assert!(matches!(
            decode_chunked(&mut read, &mut state),
            Err(ClientError::MalformedChunk)
        ));
        let mut read = BytesMut::from(&b"zz\r\n"[..]);
        assert!(matches!(
            decode_chunked(&mut read, &mut Chunk::Size),
            Err(ClientError::MalformedChunk)
        ));
    }

    #[test]
    fn numbers_are_written_without_formatting() {
        for n in [0u64, 1, 9, 10, 255, 4096, 123_456_789, u64::MAX] {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
            let (line, len) = chunk_line(n);
            assert_eq!(&line[..len as usize], format!("{n:x}\r\n").as_bytes());
        }
    }

    #[test]
    fn framing_headers_follow_the_body() {
        let conn_head =
            |method: &Method, body: Outgoing, headers: &[(&'static str, &'static str)]| {
                let mut map = HeaderMap::new();
                for (name, value) in headers {
                    map.append(*name, HeaderValue::from_static(value));
                }
                let mut head = Vec::new();
                let host = HeaderValue::from_static("h:1");
                let target = |dst: &mut Vec<u8>| dst.extend_from_slice(b"/p?q");
                write_head(&mut head, method, target, &host, &map, &body);
                String::from_utf8(head).unwrap()
            };
        let get = conn_head(&Method::GET, Outgoing::Whole(Bytes::new()), &[("x-a", "1")]);
        assert_eq!(get, "GET /p?q HTTP/1.1\r\nhost: h:1\r\nx-a: 1\r\n\r\n");
        let post = conn_head(&Method::POST, Outgoing::Whole(Bytes::new()), &[]);
        assert_eq!(
            post,
            "POST /p?q HTTP/1.1\r\nhost: h:1\r\ncontent-length: 0\r\n\r\n"
        );
        let put = conn_head(
            &Method::PUT,
            Outgoing::Whole(Bytes::from_static(b"abc")),
            &[
                ("content-length", "3"),
                ("transfer-encoding", "chunked"),
                ("host", "buyer"),
            ],
        );
        assert_eq!(
            put,
            "PUT /p?q HTTP/1.1\r\nhost: h:1\r\ncontent-length: 3\r\n\r\n"
        );
        let streamed = Outgoing::Stream {
            body: super::super::full(Bytes::new()),
            length: None,
            first: None,
        };
        let post = conn_head(&Method::POST, streamed, &[]);
        assert_eq!(
            post,
            "POST /p?q HTTP/1.1\r\nhost: h:1\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        let get = conn_head(
            &Method::GET,
            Outgoing::Whole(Bytes::new()),
            &[("content-length", "0")],
        );
        assert_eq!(
            get,
            "GET /p?q HTTP/1.1\r\nhost: h:1\r\ncontent-length: 0\r\n\r\n"
        );
    }
}
