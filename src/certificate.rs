//! Certificates the gateway serves: PEM chains and keys parsed into what rustls serves
//! ([`certified_key_pem`], used by snapshot validation and the default certificate), and
//! their notAfter time ([`not_after`]), exported as
//! `marketgate_tls_certificate_expiry_timestamp_seconds` so that an alert fires before a
//! market domain's certificate (or the default one) expires. A leaf: it depends on nothing
//! in the crate.
//!
//! The notAfter is read by a minimal DER walk over RFC 5280's `Certificate` → `tbsCertificate` → `validity`; it only
//! reads, never verifies (rustls and the snapshot's producer own that), and answers `None`
//! for anything it does not understand rather than guessing.

use rustls::sign::CertifiedKey;
use time::{Date, Month, PrimitiveDateTime, Time};

#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("the certificate PEM holds no certificate")]
    NoCertificate,
    #[error("the key PEM holds no private key")]
    NoKey,
    #[error("PEM does not parse")]
    Pem(#[source] std::io::Error),
    #[error("the key is of an unsupported type")]
    Key(#[source] rustls::Error),
}

/// Parses PEM bytes (a chain and a private key) into what rustls serves.
pub fn certified_key_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<CertifiedKey, CertificateError> {
    let chain = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(CertificateError::Pem)?;
    if chain.is_empty() {
        return Err(CertificateError::NoCertificate);
    }
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(CertificateError::Pem)?
        .ok_or(CertificateError::NoKey)?;
    let signing_key =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(CertificateError::Key)?;
    Ok(CertifiedKey::new(chain, signing_key))
}

/// DER tags met on the way to `validity.notAfter`.
const SEQUENCE: u8 = 0x30;
const VERSION: u8 = 0xA0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// The notAfter of a DER certificate, as unix seconds.
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (tag, certificate, _) = element(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = element(certificate)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut rest = tbs;
    let (tag, _, after) = element(rest)?;
    if tag == VERSION {
        rest = after;
    }
    // serialNumber, signature, issuer, then validity.
    for _ in 0..3 {
        rest = element(rest)?.2;
    }
    let (tag, validity, _) = element(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    let (_, _, after_not_before) = element(validity)?;
    let (tag, not_after, _) = element(after_not_before)?;
    parse_time(tag, not_after)
}

/// One DER element: (tag, contents, what follows).
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// UTCTime `YYMMDDHHMMSSZ` (years 1950–2049) or GeneralizedTime `YYYYMMDDHHMMSSZ`.
fn parse_time(tag: u8, text: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(text).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        UTC_TIME => {
            let yy: i32 = text.get(..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, text.get(2..)?)
        }
        GENERALIZED_TIME => (text.get(..4)?.parse().ok()?, text.get(4..)?),
        _ => return None,
    };
    if rest.len() != 10 || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let field = |i: usize| -> Option<u8> { rest.get(i..i + 2)?.parse().ok() };
    let date = Date::from_calendar_date(year, Month::try_from(field(0)?).ok()?, field(2)?).ok()?;
    let time = Time::from_hms(field(4)?, field(6)?, field(8)?).ok()?;
    Some(
        PrimitiveDateTime::new(date, time)
            .assume_utc()
            .unix_timestamp(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der_with_not_after(unix: i64) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["a.example".to_owned()]).unwrap();
        params.not_after = time::OffsetDateTime::from_unix_timestamp(unix).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_utc_time_and_generalized_time() {
        // rcgen writes UTCTime before 2050 and GeneralizedTime from 2050 on (RFC 5280).
        for unix in [1_900_000_000, 2_600_000_000] {
            assert_eq!(not_after(&der_with_not_after(unix)), Some(unix));
        }
    }

    #[test]
    fn refuses_what_is_not_a_certificate() {
        assert_eq!(not_after(b""), None);
        assert_eq!(not_after(&[0x30, 0x82, 0xff]), None);
        assert_eq!(not_after(&[0x02, 0x01, 0x00]), None);
    }
}
