//! SDK-HMAC-SHA256 request signing, shared by both planes.
//!
//! Buyers sign gateway calls with their APP's key and secret; control-API callers sign with
//! AK/SK. The algorithm is Huawei Cloud's (`shared/spec/signing.md`, `huaweicloudsdkcore`'s
//! `Signer`): a canonical request is hashed, the hash is wrapped in a string to sign with the
//! `X-Sdk-Date`, and that string is HMAC-ed with the secret.
//!
//! This module owns canonicalisation, signing and verification. It does not look up secrets,
//! read bodies or decide HTTP answers: callers hand it the parts of a request and a secret
//! and map [`SignatureError`] to their own error codes. The verifier streams the canonical
//! request straight into SHA-256, so verifying a request without a query string allocates
//! nothing (hot path of the data plane).

use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;

/// The scheme name at the start of the `Authorization` header and of the string to sign.
pub const ALGORITHM: &str = "SDK-HMAC-SHA256";
/// Header carrying the signing time, `YYYYMMDDTHHMMSSZ` UTC.
pub const DATE_HEADER: &str = "x-sdk-date";
/// Header whose value `UNSIGNED-PAYLOAD` replaces the body hash.
pub const CONTENT_SHA256_HEADER: &str = "x-sdk-content-sha256";
/// The two as header names, for lookups on the served path (a `&str` name is parsed and
/// checked again on every lookup).
const DATE_HEADER_NAME: HeaderName = HeaderName::from_static(DATE_HEADER);
const CONTENT_SHA256_HEADER_NAME: HeaderName = HeaderName::from_static(CONTENT_SHA256_HEADER);
/// The literal that stands for the body hash when the body is not signed.
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";
/// How far a request's `X-Sdk-Date` may be from the server clock, either way, in seconds.
pub const DEFAULT_MAX_CLOCK_SKEW_SECS: i64 = 15 * 60;
/// Largest body the verifier will hash (Huawei's limit for signed bodies), in bytes.
pub const MAX_SIGNED_BODY_BYTES: usize = 12 * 1024 * 1024;

/// SHA-256 of the empty string, the payload hash of a request without a body.
const EMPTY_BODY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

type HmacSha256 = Hmac<Sha256>;

/// Why a signature was not accepted. Callers answer every variant alike to the client
/// (an unknown key and a bad signature must be indistinguishable); the variants exist for
/// logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the Authorization header is not SDK-HMAC-SHA256")]
    NotSdkHmac,
    #[error("the Authorization header is malformed: {0}")]
    Malformed(&'static str),
    #[error("X-Sdk-Date is missing")]
    DateMissing,
    #[error("X-Sdk-Date is not YYYYMMDDTHHMMSSZ")]
    DateMalformed,
    #[error("X-Sdk-Date is more than the allowed skew from the server clock")]
    DateSkewed,
    #[error("the signed headers must include {0}")]
    RequiredHeaderUnsigned(&'static str),
    #[error("a signed header is absent from the request")]
    SignedHeaderAbsent,
    /// A header named in SignedHeaders appears more than once: the signature covers one
    /// value, the backend would get both (a buyer-side fault: 400, not 401).
    #[error("a signed header appears more than once in the request")]
    SignedHeaderRepeated,
    #[error("the signature does not match")]
    Mismatch,
}

/// The parts of `Authorization: SDK-HMAC-SHA256 Access=…, SignedHeaders=…, Signature=…`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Authorization<'a> {
    pub access: &'a str,
    /// Lower-case names joined with `;`, as sent.
    pub signed_headers: &'a str,
    /// Lower-case hex.
    pub signature: &'a str,
}

impl<'a> Authorization<'a> {
    /// Parses the header value. Parameter order is free; all three are required.
    pub fn parse(value: &'a str) -> Result<Self, SignatureError> {
        let rest = value
            .strip_prefix(ALGORITHM)
            .ok_or(SignatureError::NotSdkHmac)?;
        if !rest.starts_with(' ') {
            return Err(SignatureError::NotSdkHmac);
        }
        let (mut access, mut signed_headers, mut signature) = (None, None, None);
        for part in rest.split(',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (name, val) = part
                .split_once('=')
                .ok_or(SignatureError::Malformed("a parameter has no '='"))?;
            match name.trim() {
                "Access" => access = Some(val.trim()),
                "SignedHeaders" => signed_headers = Some(val.trim()),
                "Signature" => signature = Some(val.trim()),
                _ => return Err(SignatureError::Malformed("unknown parameter")),
            }
        }
        let access = access
            .filter(|a| !a.is_empty())
            .ok_or(SignatureError::Malformed("Access is missing"))?;
        let signed_headers = signed_headers
            .filter(|h| !h.is_empty())
            .ok_or(SignatureError::Malformed("SignedHeaders is missing"))?;
        let signature = signature
            .filter(|s| s.len() == 64)
            .ok_or(SignatureError::Malformed(
                "Signature is missing or not 64 hex digits",
            ))?;
        Ok(Self {
            access,
            signed_headers,
            signature,
        })
    }

    fn signs(&self, header: &str) -> bool {
        self.signed_headers.split(';').any(|h| h == header)
    }
}

/// What stands for the body in the canonical request.
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a> {
    /// The body itself; it is hashed.
    Body(&'a [u8]),
    /// The body is not signed (`X-Sdk-Content-Sha256: UNSIGNED-PAYLOAD`).
    Unsigned,
}

/// The parts of a request that a signature covers.
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a> {
    pub method: &'a str,
    /// The path as sent on the wire (possibly percent-encoded), without the query.
    pub path: &'a str,
    /// The raw query string, without `?`.
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// Used for the `host` header when the request has none (HTTP/2 `:authority`).
    pub authority: Option<&'a str>,
    pub payload: Payload<'a>,
}

impl RequestParts<'_> {
    /// The payload as the signer treats it: `UNSIGNED-PAYLOAD` wins over the body when the
    /// request says so.
    fn effective_payload(&self) -> Payload<'_> {
        let unsigned = self
            .headers
            .get(CONTENT_SHA256_HEADER_NAME)
            .is_some_and(|v| v.as_bytes() == UNSIGNED_PAYLOAD.as_bytes());
        if unsigned {
            Payload::Unsigned
        } else {
            self.payload
        }
    }

    /// The `X-Sdk-Date` value.
    fn date(&self) -> Option<&str> {
        self.headers
            .get(DATE_HEADER_NAME)
            .and_then(|v| v.to_str().ok())
    }

    fn header_value(&self, name: &str) -> Option<&str> {
        match signed_values(self.headers, name).iter().next() {
            Some(v) => v.to_str().ok(),
            None if name == "host" => self.authority,
            None => None,
        }
    }
}

/// The values of the signed header `name`. Hot path: the two names every signature covers
/// are looked up by their `HeaderName`; a `&str` name is parsed, validated and lower-cased
/// again on every lookup, and each signed name is looked up twice per request (`check_head`,
/// then the canonical request).
fn signed_values<'h>(
    headers: &'h HeaderMap,
    name: &str,
) -> http::header::GetAll<'h, http::HeaderValue> {
    match name {
        "host" => headers.get_all(http::header::HOST),
        DATE_HEADER => headers.get_all(DATE_HEADER_NAME),
        _ => headers.get_all(name),
    }
}

/// Does the request's payload need its body to be verified? `false` for `UNSIGNED-PAYLOAD`,
/// which lets the data plane stream such bodies without buffering them.
pub fn needs_body(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_SHA256_HEADER_NAME)
        .is_none_or(|v| v.as_bytes() != UNSIGNED_PAYLOAD.as_bytes())
}

/// Verifies a request signed with `secret`. `auth` comes from [`Authorization::parse`];
/// the caller looked up `secret` by `auth.access`.
///
/// Requires `host` and `x-sdk-date` among the signed headers, the date within
/// `max_skew_secs` of `now`, and compares signatures in constant time.
pub fn verify(
    auth: &Authorization<'_>,
    request: &RequestParts<'_>,
    secret: &[u8],
    now: OffsetDateTime,
    max_skew_secs: i64,
) -> Result<(), SignatureError> {
    check_head(auth, request, now, max_skew_secs)?;
    verify_checked(auth, request, secret)
}

/// [`verify`] for a request whose head [`check_head`] passed already (same `auth`, same
/// request): the signature alone. The data plane checks the head before it reads a body and
/// must not pay for those checks twice (hot path).
pub fn verify_checked(
    auth: &Authorization<'_>,
    request: &RequestParts<'_>,
    secret: &[u8],
) -> Result<(), SignatureError> {
    let date = request.date().ok_or(SignatureError::DateMissing)?;
    let canonical = canonical_request_hash(request, auth.signed_headers)?;
    let expected = signature_bytes(secret, date, &canonical);
    let mut given = [0u8; 32];
    hex::decode_to_slice(auth.signature, &mut given)
        .map_err(|_| SignatureError::Malformed("Signature is not hex"))?;
    if bool::from(expected.ct_eq(&given)) {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// Every check of [`verify`] that needs neither the secret nor the body: `host` and
/// `x-sdk-date` signed, the date well-formed and within `max_skew_secs` of `now`, every
/// signed header present exactly once, the signature hex. The data plane runs it before it
/// reads a body, so that a request that can never verify costs no buffering.
pub fn check_head(
    auth: &Authorization<'_>,
    request: &RequestParts<'_>,
    now: OffsetDateTime,
    max_skew_secs: i64,
) -> Result<(), SignatureError> {
    if !auth.signs(DATE_HEADER) {
        return Err(SignatureError::RequiredHeaderUnsigned(DATE_HEADER));
    }
    if !auth.signs("host") {
        return Err(SignatureError::RequiredHeaderUnsigned("host"));
    }
    let date = request.date().ok_or(SignatureError::DateMissing)?;
    let signed_at = parse_sdk_date(date)?;
    if (now - signed_at).whole_seconds().abs() > max_skew_secs {
        return Err(SignatureError::DateSkewed);
    }
    for name in auth.signed_headers.split(';') {
        let mut values = signed_values(request.headers, name).iter();
        match (values.next(), values.next()) {
            (_, Some(_)) => return Err(SignatureError::SignedHeaderRepeated),
            (None, None) if !(name == "host" && request.authority.is_some()) => {
                return Err(SignatureError::SignedHeaderAbsent)
            }
            _ => {}
        }
    }
    if !auth.signature.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SignatureError::Malformed("Signature is not hex"));
    }
    Ok(())
}

/// Signs a request: returns the `Authorization` header value. `headers` must already hold
/// every header to sign, `X-Sdk-Date` and `Host` included; `signed_headers` names them
/// (any case, any order).
pub fn sign(
    key: &str,
    secret: &[u8],
    request: &RequestParts<'_>,
    signed_headers: &[&str],
) -> Result<String, SignatureError> {
    let mut names: Vec<String> = signed_headers
        .iter()
        .map(|h| h.to_ascii_lowercase())
        .collect();
    names.sort();
    names.dedup();
    let names = names.join(";");
    let date = request.date().ok_or(SignatureError::DateMissing)?;
    let canonical = canonical_request_hash(request, &names)?;
    let signature = signature_bytes(secret, date, &canonical);
    Ok(format!(
        "{ALGORITHM} Access={key}, SignedHeaders={names}, Signature={}",
        hex::encode(signature)
    ))
}

/// `X-Sdk-Date` for a point in time.
pub fn format_sdk_date(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    )
}

/// Parses `YYYYMMDDTHHMMSSZ`.
pub fn parse_sdk_date(value: &str) -> Result<OffsetDateTime, SignatureError> {
    let b = value.as_bytes();
    // ASCII first: the fields below are sliced by byte offsets (found by the property test
    // `any_sdk_date_parses_or_is_refused`: `10中100T000000Z` split a character).
    if b.len() != 16 || !b.is_ascii() || b[8] != b'T' || b[15] != b'Z' {
        return Err(SignatureError::DateMalformed);
    }
    let num = |range: std::ops::Range<usize>| -> Result<u32, SignatureError> {
        let digits = &value[range];
        if !digits.bytes().all(|c| c.is_ascii_digit()) {
            return Err(SignatureError::DateMalformed);
        }
        digits.parse().map_err(|_| SignatureError::DateMalformed)
    };
    let month =
        time::Month::try_from(num(4..6)? as u8).map_err(|_| SignatureError::DateMalformed)?;
    let date = time::Date::from_calendar_date(num(0..4)? as i32, month, num(6..8)? as u8)
        .map_err(|_| SignatureError::DateMalformed)?;
    let clock = time::Time::from_hms(num(9..11)? as u8, num(11..13)? as u8, num(13..15)? as u8)
        .map_err(|_| SignatureError::DateMalformed)?;
    Ok(date.with_time(clock).assume_utc())
}

/// Slots of each thread's cache of keyed HMAC states (a power of two).
const KEYED_MACS_PER_THREAD: usize = 256;
/// Secrets longer than this are keyed afresh on every call rather than cached (an AppSecret
/// is 32 bytes; HMAC hashes a key longer than a block anyway).
const MAX_CACHED_SECRET_BYTES: usize = 64;

/// A secret and HMAC-SHA256 keyed with it: its inner and outer padded key blocks already
/// compressed, so that a signature costs the message's blocks only.
struct KeyedMac {
    secret: Box<[u8]>,
    mac: HmacSha256,
}

thread_local! {
    /// Direct-mapped by a hash of the secret; a slot holds the secret itself, and is used
    /// only when it equals the one asked for (so a rotated secret, a new snapshot or two
    /// apps that share a slot can never sign with each other's key).
    static KEYED_MACS: std::cell::RefCell<Vec<Option<KeyedMac>>> =
        std::cell::RefCell::new((0..KEYED_MACS_PER_THREAD).map(|_| None).collect());
}

/// HMAC-SHA256 keyed with `secret`. Hot path: keying costs two SHA-256 compressions (the
/// padded key's inner and outer blocks), a third or more of what verifying a short request
/// costs; a thread-local cache, keyed by the secret's bytes, keeps them per AppSecret, so
/// that a verification after the first from this thread only clones the keyed state. The
/// cache lives outside the compiled snapshot (which stays at its size per app) and is
/// filled on first use: an app that never calls costs nothing.
fn keyed_mac(secret: &[u8]) -> HmacSha256 {
    let fresh = || HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
    if secret.len() > MAX_CACHED_SECRET_BYTES {
        return fresh();
    }
    // FNV-1a: the slot only, never trusted for equality.
    let hash = secret.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let slot = (hash as usize) & (KEYED_MACS_PER_THREAD - 1);
    KEYED_MACS.with_borrow_mut(|slots| match &slots[slot] {
        Some(keyed) if *keyed.secret == *secret => keyed.mac.clone(),
        _ => {
            let mac = fresh();
            slots[slot] = Some(KeyedMac {
                secret: secret.into(),
                mac: mac.clone(),
            });
            mac
        }
    })
}

/// The signature for a string to sign built from `date` and the canonical request's hash.
fn signature_bytes(secret: &[u8], date: &str, canonical_hash: &[u8; 32]) -> [u8; 32] {
    let mut mac = keyed_mac(secret);
    mac.update(ALGORITHM.as_bytes());
    mac.update(b"\n");
    mac.update(date.as_bytes());
    mac.update(b"\n");
    let mut hex_hash = [0u8; 64];
    hex::encode_to_slice(canonical_hash, &mut hex_hash).expect("64 bytes hold 32 in hex");
    mac.update(&hex_hash);
    mac.finalize().into_bytes().into()
}

/// SHA-256 of the canonical request, fed part by part without building the string.
fn canonical_request_hash(
    request: &RequestParts<'_>,
    signed_headers: &str,
) -> Result<[u8; 32], SignatureError> {
    let mut hasher = Sha256::new();
    hasher.update(request.method.as_bytes());
    hasher.update(b"\n");
    write_canonical_uri(&mut hasher, request.path);
    hasher.update(b"\n");
    if let Some(query) = request.query.filter(|q| !q.is_empty()) {
        write_canonical_query(&mut hasher, query);
    }
    hasher.update(b"\n");
    for name in signed_headers.split(';') {
        let value = request
            .header_value(name)
            .ok_or(SignatureError::SignedHeaderAbsent)?;
        hasher.update(name.as_bytes());
        hasher.update(b":");
        hasher.update(value.trim().as_bytes());
        hasher.update(b"\n");
    }
    hasher.update(b"\n");
    hasher.update(signed_headers.as_bytes());
    hasher.update(b"\n");
    match request.effective_payload() {
        Payload::Unsigned => hasher.update(UNSIGNED_PAYLOAD.as_bytes()),
        Payload::Body([]) => hasher.update(EMPTY_BODY_SHA256.as_bytes()),
        Payload::Body(body) => {
            let mut hex_hash = [0u8; 64];
            hex::encode_to_slice(Sha256::digest(body), &mut hex_hash)
                .expect("64 bytes hold 32 in hex");
            hasher.update(hex_hash);
        }
    }
    Ok(hasher.finalize().into())
}

/// The path percent-decoded, split on `/`, each segment re-encoded, always ending in `/`.
///
/// Decoded, then split, as Huawei's signer does (`unquote(path).split('/')`): a `%2F` in the
/// path separates segments exactly as `/` does, so `/a%2Fb` and `/a/b` have one canonical
/// form. The data plane routes on that same form (`gateway::handler::routed_path`), so one
/// signature never reaches two APIs.
fn write_canonical_uri(hasher: &mut Sha256, path: &str) {
    let path = if path.is_empty() { "/" } else { path };
    if !write_encoded(hasher, path.as_bytes(), Encode::Path) {
        hasher.update(b"/");
    }
}

/// Every `name=value` pair decoded and re-encoded, sorted by name then value.
fn write_canonical_query(hasher: &mut Sha256, query: &str) {
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (
                percent_decode(name.as_bytes()),
                percent_decode(value.as_bytes()),
            )
        })
        .collect();
    pairs.sort();
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            hasher.update(b"&");
        }
        write_encoded(hasher, name, Encode::Component);
        hasher.update(b"=");
        write_encoded(hasher, value, Encode::Component);
    }
}

/// How [`write_encoded`] reads its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encode {
    /// A path as sent on the wire: `%XY` escapes are decoded first, and `/` (sent or
    /// decoded) is kept as the segment separator.
    Path,
    /// A decoded query name or value: every byte but the unreserved ones is encoded.
    Component,
}

/// Percent-encodes `raw` into the hasher, keeping RFC 3986 unreserved bytes (and, for a
/// path, the `/` separators). Returns whether the last byte written was a `/`.
fn write_encoded(hasher: &mut Sha256, raw: &[u8], mode: Encode) -> bool {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut buf = [0u8; 96];
    let mut len = 0;
    let mut i = 0;
    let mut slash_last = false;
    while i < raw.len() {
        let mut byte = raw[i];
        if mode == Encode::Path && byte == b'%' && i + 2 < raw.len() {
            if let (Some(hi), Some(lo)) = (hex_value(raw[i + 1]), hex_value(raw[i + 2])) {
                byte = hi << 4 | lo;
                i += 2;
            }
        }
        i += 1;
        if len + 3 > buf.len() {
            hasher.update(&buf[..len]);
            len = 0;
        }
        slash_last = false;
        if byte.is_ascii_alphanumeric()
            || matches!(byte, b'-' | b'_' | b'.' | b'~')
            || (mode == Encode::Path && byte == b'/')
        {
            buf[len] = byte;
            len += 1;
            slash_last = byte == b'/';
        } else {
            buf[len] = b'%';
            buf[len + 1] = HEX[(byte >> 4) as usize];
            buf[len + 2] = HEX[(byte & 0xf) as usize];
            len += 3;
        }
    }
    hasher.update(&buf[..len]);
    slash_last
}

fn percent_decode(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' && i + 2 < raw.len() {
            if let (Some(hi), Some(lo)) = (hex_value(raw[i + 1]), hex_value(raw[i + 2])) {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
        }
        out.push(raw[i]);
        i += 1;
    }
    out
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod properties;

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const KEY: &str = "AppKeyExample0001";
    const SECRET: &[u8] = b"AppSecretExample0001xyz";
    const DATE: &str = "20261122T120000Z";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn signature_of(parts: &RequestParts<'_>, signed: &[&str]) -> String {
        let header = sign(KEY, SECRET, parts, signed).unwrap();
        Authorization::parse(&header).unwrap().signature.to_owned()
    }

    #[test]
    fn string_to_sign_vector_from_huawei_guide() {
        let mut hash = [0u8; 32];
        hex::decode_to_slice(
            "b25362e603ee30f4f25e7858e8a7160fd36e803bb2dfe206278659d71a9bcd7a",
            &mut hash,
        )
        .unwrap();
        let sig = signature_bytes(
            b"MFyfvK41ba2giqM7Uio6PznpdUKGpownRZlmVmHc",
            "20191115T033655Z",
            &hash,
        );
        assert_eq!(
            hex::encode(sig),
            "7be6668032f70418fcc22abc52071e57aff61b84a1d2381bb430d6870f4f6ebe"
        );
    }

    #[test]
    fn sdk_vector_get_with_query() {
        let h = headers(&[("host", "market.example.com"), ("x-sdk-date", DATE)]);
        let parts = RequestParts {
            method: "GET",
            path: "/v1/weather/beijing",
            query: Some("lang=zh&unit=c"),
            headers: &h,
            authority: None,
            payload: Payload::Body(b""),
        };
        assert_eq!(
            signature_of(&parts, &["host", "x-sdk-date"]),
            "0173081367c0fe7542b7b289f17ac840b94e5f140e9598fb76a27847218c5447"
        );
    }

    #[test]
    fn sdk_vector_post_json_body() {
        let h = headers(&[
            ("host", "api.shop.example.com"),
            ("x-sdk-date", DATE),
            ("content-type", "application/json"),
        ]);
        let parts = RequestParts {
            method: "POST",
            path: "/orders/",
            query: None,
            headers: &h,
            authority: None,
            payload: Payload::Body(br#"{"item":"book","qty":2}"#),
        };
        assert_eq!(
            signature_of(&parts, &["content-type", "host", "x-sdk-date"]),
            "f333e340486184dd499373752abda55d1608f6a10bf6d143b1cee59f230f9ad1"
        );
    }

    #[test]
    fn sdk_vector_query_encoding_and_repeats() {
        let h = headers(&[("host", "q.example.com"), ("x-sdk-date", DATE)]);
        let parts = RequestParts {
            method: "GET",
            path: "/search",
            query: Some("q=a%20b&empty=&tag=z&tag=a"),
            headers: &h,
            authority: None,
            payload: Payload::Body(b""),
        };
        assert_eq!(
            signature_of(&parts, &["host", "x-sdk-date"]),
            "32d5327aa69fe0e2984aa282189cf395893f626e502602569655b3ae970bbaa7"
        );
    }

    #[test]
    fn sdk_vector_unsigned_payload_and_utf8_path() {
        let h = headers(&[
            ("host", "u.example.com"),
            ("x-sdk-date", DATE),
            ("content-type", "application/octet-stream"),
            ("x-sdk-content-sha256", "UNSIGNED-PAYLOAD"),
        ]);
        let parts = RequestParts {
            method: "PUT",
            path: "/files/%E4%B8%AD%E6%96%87/x",
            query: None,
            headers: &h,
            authority: None,
            payload: Payload::Body(b"raw-bytes"),
        };
        assert_eq!(
            signature_of(
                &parts,
                &["content-type", "host", "x-sdk-content-sha256", "x-sdk-date"]
            ),
            "2353ed075a626e00b1beabd85c26e0d176568985833a40fec24ce6f464f84806"
        );
    }

    #[test]
    fn verify_accepts_then_refuses_any_change() {
        let h = headers(&[("host", "market.example.com"), ("x-sdk-date", DATE)]);
        let parts = RequestParts {
            method: "GET",
            path: "/v1/weather/beijing",
            query: Some("lang=zh&unit=c"),
            headers: &h,
            authority: None,
            payload: Payload::Body(b""),
        };
        let header = sign(KEY, SECRET, &parts, &["host", "x-sdk-date"]).unwrap();
        let auth = Authorization::parse(&header).unwrap();
        let now = parse_sdk_date(DATE).unwrap();
        assert_eq!(verify(&auth, &parts, SECRET, now, 900), Ok(()));

        let tampered = RequestParts {
            query: Some("lang=zh&unit=f"),
            ..parts
        };
        assert_eq!(
            verify(&auth, &tampered, SECRET, now, 900),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(&auth, &parts, b"other-secret", now, 900),
            Err(SignatureError::Mismatch)
        );
        let late = now + time::Duration::minutes(16);
        assert_eq!(
            verify(&auth, &parts, SECRET, late, 900),
            Err(SignatureError::DateSkewed)
        );
    }

    #[test]
    fn verify_requires_host_and_date_signed() {
        let h = headers(&[("host", "market.example.com"), ("x-sdk-date", DATE)]);
        let parts = RequestParts {
            method: "GET",
            path: "/",
            query: None,
            headers: &h,
            authority: None,
            payload: Payload::Body(b""),
        };
        let header = sign(KEY, SECRET, &parts, &["x-sdk-date"]).unwrap();
        let auth = Authorization::parse(&header).unwrap();
        let now = parse_sdk_date(DATE).unwrap();
        assert_eq!(
            verify(&auth, &parts, SECRET, now, 900),
            Err(SignatureError::RequiredHeaderUnsigned("host"))
        );
    }

    #[test]
    fn a_repeated_signed_header_is_refused_before_the_signature() {
        let mut h = headers(&[("host", "market.example.com"), ("x-sdk-date", DATE)]);
        h.insert("x-amount", HeaderValue::from_static("1"));
        let parts = RequestParts {
            method: "GET",
            path: "/",
            query: None,
            headers: &h,
            authority: None,
            payload: Payload::Body(b""),
        };
        let header = sign(KEY, SECRET, &parts, &["host", "x-amount", "x-sdk-date"]).unwrap();
        let now = parse_sdk_date(DATE).unwrap();
        let auth = Authorization::parse(&header).unwrap();
        assert_eq!(verify(&auth, &parts, SECRET, now, 900), Ok(()));
        let mut injected = h.clone();
        injected.append("x-amount", HeaderValue::from_static("1000"));
        let parts = RequestParts {
            headers: &injected,
            ..parts
        };
        assert_eq!(
            verify(&auth, &parts, SECRET, now, 900),
            Err(SignatureError::SignedHeaderRepeated)
        );
    }

    #[test]
    fn authorization_parse_rejects_garbage() {
        assert!(Authorization::parse("Bearer x").is_err());
        assert!(Authorization::parse("SDK-HMAC-SHA256 Access=a").is_err());
        assert!(
            Authorization::parse("SDK-HMAC-SHA256Access=a, SignedHeaders=host, Signature=00")
                .is_err()
        );
        let ok = format!(
            "SDK-HMAC-SHA256 Signature={}, Access=k, SignedHeaders=host;x-sdk-date",
            "0".repeat(64)
        );
        assert_eq!(Authorization::parse(&ok).unwrap().access, "k");
    }

    /// The cached keyed state signs as a freshly keyed HMAC does, for more secrets than the
    /// cache has slots (so slots are shared and replaced), each asked for twice.
    #[test]
    fn cached_keyed_macs_sign_as_fresh_ones() {
        let hash = [7u8; 32];
        let secrets: Vec<Vec<u8>> = (0..3 * KEYED_MACS_PER_THREAD)
            .map(|i| format!("secret-{i}").into_bytes())
            .chain([vec![b'k'; MAX_CACHED_SECRET_BYTES + 1], Vec::new()])
            .collect();
        for round in 0..2 {
            for secret in &secrets {
                let mut fresh = HmacSha256::new_from_slice(secret).unwrap();
                fresh.update(ALGORITHM.as_bytes());
                fresh.update(b"\n");
                fresh.update(DATE.as_bytes());
                fresh.update(b"\n");
                fresh.update(hex::encode(hash).as_bytes());
                let fresh: [u8; 32] = fresh.finalize().into_bytes().into();
                assert_eq!(signature_bytes(secret, DATE, &hash), fresh, "round {round}");
            }
        }
    }

    #[test]
    fn sdk_date_round_trip() {
        let at = parse_sdk_date("20261122T120000Z").unwrap();
        assert_eq!(format_sdk_date(at), "20261122T120000Z");
        assert!(parse_sdk_date("2026-11-22T12:00:00Z").is_err());
        assert!(parse_sdk_date("20261322T120000Z").is_err());
    }
}
