//! Property tests (proptest) of the buyer-facing parsers and the canonical request: the
//! `Authorization` header, `X-Sdk-Date`, path and query canonicalisation, sign and verify.
//! Arbitrary input never panics (every one of these runs on bytes a stranger sent before any
//! secret is known), valid input round-trips (a header built from its parts parses back to
//! them, a date formats and parses back, a request signed is verified and any change to it
//! is not), and the canonical path is Huawei's (`unquote(path).split('/')`, each segment
//! quoted), so `%2F` paths signed by Huawei's SDK verify.

use proptest::collection::vec;
use proptest::prelude::*;

use super::*;
use crate::gateway::handler::routed_path;

/// Cases per property: enough to find the seams, few enough for a debug build on 2 cores.
const CASES: u32 = 256;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Text weighted to what the parsers split on, with any character mixed in.
fn text(max: usize) -> impl Strategy<Value = String> {
    vec(
        prop_oneof![
            3 => prop::sample::select(vec![
                ',', '=', ' ', ';', '%', '/', '&', '2', 'F', 'f', 'T', 'Z', '0', '9', 'a', 'é', '中',
            ]),
            1 => any::<char>(),
        ],
        0..max,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

/// A path as a client may send it: segments of unreserved, reserved, escaped and UTF-8 bytes.
fn wire_path() -> impl Strategy<Value = String> {
    vec(
        prop_oneof![
            Just("/".to_owned()),
            Just("%2F".to_owned()),
            Just("%2f".to_owned()),
            Just("%25".to_owned()),
            Just("%".to_owned()),
            Just("%E4%B8%AD".to_owned()),
            "[A-Za-z0-9._~-]{1,4}",
            "[ !$&'()*+,;=:@]",
            "[é中]",
        ],
        0..12,
    )
    .prop_map(|pieces| format!("/{}", pieces.concat()))
}

fn query_pairs() -> impl Strategy<Value = Vec<(String, String)>> {
    vec(("[a-z%2]{1,5}", "[a-zA-Z0-9 %/+=é]{0,6}"), 0..5)
}

/// The pairs as a client writes them on the wire: each name and value percent-encoded.
fn wire_query(pairs: &[(String, String)]) -> String {
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
    pairs
        .iter()
        .map(|(n, v)| {
            format!(
                "{}={}",
                utf8_percent_encode(n, NON_ALPHANUMERIC),
                utf8_percent_encode(v, NON_ALPHANUMERIC)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Huawei's canonical URI, written as its signer computes it: decode the whole path, split
/// on `/`, quote each segment keeping only unreserved bytes, join, end with `/`.
fn huawei_canonical_uri(path: &str) -> Vec<u8> {
    let decoded = percent_decode(path.as_bytes());
    let mut out = Vec::new();
    for (i, segment) in decoded.split(|&b| b == b'/').enumerate() {
        if i > 0 {
            out.push(b'/');
        }
        for &b in segment {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                out.push(b);
            } else {
                out.extend_from_slice(format!("%{b:02X}").as_bytes());
            }
        }
    }
    if out.last() != Some(&b'/') {
        out.push(b'/');
    }
    out
}

fn headers_with(date: &str, host: &str, extra: &[(String, String)]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("host", http::HeaderValue::from_str(host).unwrap());
    headers.insert(DATE_HEADER, http::HeaderValue::from_str(date).unwrap());
    for (name, value) in extra {
        headers.insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            http::HeaderValue::from_str(value).unwrap(),
        );
    }
    headers
}

const DATE: &str = "20261122T120000Z";

/// `chars` taken while they fit in `len` bytes, padded with `0` to exactly `len` bytes.
fn bytes_exactly(chars: &[char], len: usize) -> String {
    let mut out = String::new();
    for &c in chars {
        if out.len() + c.len_utf8() > len {
            break;
        }
        out.push(c);
    }
    while out.len() < len {
        out.push('0');
    }
    out
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_authorization_header_parses_or_is_refused(body in text(120)) {
        let _ = Authorization::parse(&body);
        let _ = Authorization::parse(&format!("{ALGORITHM} {body}"));
    }

    /// Parameters in any order, with any spacing, parse back to what was written.
    #[test]
    fn an_authorization_header_round_trips(
        access in "[A-Za-z0-9]{1,24}",
        names in vec("[a-z][a-z0-9-]{0,10}", 1..5),
        signature in "[0-9a-f]{64}",
        order in Just([0usize, 1, 2]).prop_shuffle(),
        spaces in vec(" {0,2}", 3),
    ) {
        let signed_headers = names.join(";");
        let params = [
            format!("Access={access}"),
            format!("SignedHeaders={signed_headers}"),
            format!("Signature={signature}"),
        ];
        let header = format!(
            "{ALGORITHM} {}",
            order
                .iter()
                .zip(&spaces)
                .map(|(&i, space)| format!("{space}{}", params[i]))
                .collect::<Vec<_>>()
                .join(",")
        );
        let parsed = Authorization::parse(&header).unwrap();
        prop_assert_eq!(parsed.access, access.as_str());
        prop_assert_eq!(parsed.signed_headers, signed_headers.as_str());
        prop_assert_eq!(parsed.signature, signature.as_str());
    }

    #[test]
    fn any_sdk_date_parses_or_is_refused(
        plain in text(20),
        date in vec(prop::sample::select(vec!['0', '1', '9', 'é', '中', ' ']), 0..8),
        clock in vec(prop::sample::select(vec!['0', '5', 'é', '+']), 0..6),
    ) {
        let _ = parse_sdk_date(&plain);
        // Sixteen bytes with `T` and `Z` in place, whatever lies between (multi-byte
        // characters across the field boundaries included).
        let value = format!("{}T{}Z", bytes_exactly(&date, 8), bytes_exactly(&clock, 6));
        prop_assert_eq!(value.len(), 16);
        let _ = parse_sdk_date(&value);
    }

    #[test]
    fn an_sdk_date_round_trips(secs in 0i64..253_402_300_799) {
        let at = OffsetDateTime::from_unix_timestamp(secs).unwrap();
        prop_assert_eq!(parse_sdk_date(&format_sdk_date(at)).unwrap(), at);
    }

    /// The canonical path is Huawei's, `%2F` included; and routing sees the same form.
    #[test]
    fn the_canonical_path_is_huaweis(path in wire_path()) {
        let mut ours = Sha256::new();
        write_canonical_uri(&mut ours, &path);
        let reference = huawei_canonical_uri(&path);
        prop_assert_eq!(
            <[u8; 32]>::from(ours.finalize()),
            <[u8; 32]>::from(Sha256::digest(&reference)),
            "{} -> {}", path, String::from_utf8_lossy(&reference)
        );
        let routed = routed_path(&path);
        prop_assert!(!routed.contains("%2F") && !routed.contains("%2f"));
        prop_assert_eq!(huawei_canonical_uri(&routed), reference);
    }

    /// Signed, then verified; and any change to the path's meaning, the query, the method or
    /// the body is refused. A query in another order or encoding is the same query.
    #[test]
    fn sign_then_verify_round_trips(
        method in prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH"]),
        path in wire_path(),
        pairs in query_pairs(),
        extra in vec(("x-[a-z]{1,6}", "[ -~]{0,12}"), 0..3),
        body in vec(any::<u8>(), 0..64),
        secret in vec(any::<u8>(), 1..40),
    ) {
        let headers = headers_with(DATE, "market.test", &extra);
        let query = wire_query(&pairs);
        let parts = RequestParts {
            method,
            path: &path,
            query: Some(&query),
            headers: &headers,
            authority: None,
            payload: Payload::Body(&body),
        };
        let mut names = vec!["host", DATE_HEADER];
        names.extend(headers.keys().map(|n| n.as_str()).filter(|n| n.starts_with("x-") && *n != DATE_HEADER));
        let header = sign("Key", &secret, &parts, &names).unwrap();
        let auth = Authorization::parse(&header).unwrap();
        let now = parse_sdk_date(DATE).unwrap();
        prop_assert_eq!(verify(&auth, &parts, &secret, now, 900), Ok(()));

        let mut reordered = pairs.clone();
        reordered.reverse();
        let reordered = wire_query(&reordered);
        prop_assert_eq!(
            verify(&auth, &RequestParts { query: Some(&reordered), ..parts }, &secret, now, 900),
            Ok(())
        );
        let routed = routed_path(&path);
        prop_assert_eq!(
            verify(&auth, &RequestParts { path: &routed, ..parts }, &secret, now, 900),
            Ok(())
        );

        let longer = format!("{path}x");
        prop_assert_eq!(
            verify(&auth, &RequestParts { path: &longer, ..parts }, &secret, now, 900),
            Err(SignatureError::Mismatch)
        );
        let other_query = format!("{query}&zz=1");
        prop_assert_eq!(
            verify(&auth, &RequestParts { query: Some(&other_query), ..parts }, &secret, now, 900),
            Err(SignatureError::Mismatch)
        );
        prop_assert_eq!(
            verify(&auth, &RequestParts { method: "HEAD", ..parts }, &secret, now, 900),
            Err(SignatureError::Mismatch)
        );
        let mut other_body = body.clone();
        other_body.push(0);
        prop_assert_eq!(
            verify(&auth, &RequestParts { payload: Payload::Body(&other_body), ..parts }, &secret, now, 900),
            Err(SignatureError::Mismatch)
        );
    }

    /// Whatever a stranger sends (header, path, query, headers), verification answers.
    #[test]
    fn verify_never_panics(
        header in text(160),
        path in text(40),
        query in text(40),
        extra in vec((prop::sample::select(vec!["host", "x-sdk-date", "x-a", "content-type"]), text(20)), 0..4),
        date in text(18),
    ) {
        let mut headers = HeaderMap::new();
        for (name, value) in &extra {
            if let Ok(value) = http::HeaderValue::from_str(value) {
                headers.append(*name, value);
            }
        }
        if let Ok(date) = http::HeaderValue::from_str(&date) {
            headers.append(DATE_HEADER, date);
        }
        let parts = RequestParts {
            method: "GET",
            path: &path,
            query: Some(&query),
            headers: &headers,
            authority: Some("market.test"),
            payload: Payload::Body(b""),
        };
        let now = parse_sdk_date(DATE).unwrap();
        for candidate in [header.clone(), format!("{ALGORITHM} {header}")] {
            if let Ok(auth) = Authorization::parse(&candidate) {
                let _ = check_head(&auth, &parts, now, 900);
                let _ = verify(&auth, &parts, b"secret", now, 900);
            }
        }
        let _ = routed_path(&path);
    }
}
