//! Certificates the gateway serves: PEM chains and keys parsed into what rustls serves
//! ([`certified_key_pem`], used by snapshot validation and the default certificate), and
//! their notAfter time ([`not_after`]), exported as
//! `marketgate_tls_certificate_expiry_timestamp_seconds` so that an alert fires before a
//! market domain's certificate (or the default one) expires. The management API's checks of
//! a seller's certificate live here too ([`inspect`]: it parses, its key matches, it is not
//! expired; [`covers`]: it is valid for a host name), with what its answers show about it
//! ([`Inspected`]). A leaf: it depends on nothing in the crate.
//!
//! The fields are read by a minimal DER walk over RFC 5280's `Certificate` →
//! `tbsCertificate`; it only reads, never verifies a signature (a seller's certificate is
//! the seller's to have signed), and answers `None` for anything it does not understand
//! rather than guessing. Errors never carry key material: they name the rule broken.

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
    #[error("the certificate is not a readable X.509 certificate")]
    NotX509,
    #[error("the private key does not match the certificate's public key")]
    KeyMismatch,
    #[error("the certificate expired at {not_after} (unix seconds)")]
    Expired { not_after: i64 },
}

impl CertificateError {
    /// The field and the rule a refused certificate broke: what the management API's
    /// refusal names.
    pub fn rule(&self) -> (&'static str, &'static str) {
        match self {
            CertificateError::NoCertificate
            | CertificateError::Pem(_)
            | CertificateError::NotX509 => ("cert_content", "must be a PEM X.509 certificate"),
            CertificateError::NoKey | CertificateError::Key(_) => (
                "private_key",
                "must be a PEM RSA, ECDSA or Ed25519 private key",
            ),
            CertificateError::KeyMismatch => {
                ("private_key", "must match the certificate's public key")
            }
            CertificateError::Expired { .. } => ("cert_content", "must not be expired"),
        }
    }
}

/// What a seller's certificate shows (the management API's `common_name`, `san`,
/// `not_after`, …): read from its leaf.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Inspected {
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    pub common_name: String,
    /// DNS subject alternative names.
    pub san: Vec<String>,
    /// The issuer's common names.
    pub issuer: Vec<String>,
    pub organization: Vec<String>,
    pub organizational_unit: Vec<String>,
    pub locality: Vec<String>,
    pub state: Vec<String>,
    pub country: Vec<String>,
    /// Lower-case hex.
    pub serial_number: String,
    /// `SHA256-RSA`, `ECDSA-SHA256`, `Ed25519`, … (`UNKNOWN` otherwise).
    pub signature_algorithm: String,
    /// `RSA`, `ECC` or `Ed25519` (`UNKNOWN` otherwise).
    pub algorithm_type: String,
}

/// Checks a seller's certificate and key as the management API accepts them: the chain
/// parses, the key parses and matches the leaf's public key, and the leaf is not expired at
/// `now` (unix seconds). Returns what the leaf shows.
pub fn inspect(cert_pem: &[u8], key_pem: &[u8], now: i64) -> Result<Inspected, CertificateError> {
    let key = certified_key_pem(cert_pem, key_pem)?;
    match key.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(CertificateError::KeyMismatch)
        }
        // ring's keys always know their public key; an end-entity certificate webpki cannot
        // read is not one we can serve.
        Err(_) => return Err(CertificateError::NotX509),
    }
    let leaf = key.cert.first().ok_or(CertificateError::NoCertificate)?;
    let inspected = read_fields(leaf).ok_or(CertificateError::NotX509)?;
    if inspected.not_after <= now {
        return Err(CertificateError::Expired {
            not_after: inspected.not_after,
        });
    }
    Ok(inspected)
}

/// Is the leaf of `cert_pem` valid for `host` (its SANs, wildcards as RFC 6125 has them)?
pub fn covers(cert_pem: &[u8], host: &str) -> bool {
    let Some(Ok(leaf)) = rustls_pemfile::certs(&mut &cert_pem[..]).next() else {
        return false;
    };
    let Ok(name) = rustls::pki_types::ServerName::try_from(host) else {
        return false;
    };
    let Ok(parsed) = rustls::server::ParsedCertificate::try_from(&leaf) else {
        return false;
    };
    rustls::client::verify_server_name(&parsed, &name).is_ok()
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

/// DER tags met in a certificate.
const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const INTEGER: u8 = 0x02;
const OID: u8 = 0x06;
const OCTET_STRING: u8 = 0x04;
const VERSION: u8 = 0xA0;
const EXTENSIONS: u8 = 0xA3;
const DNS_NAME: u8 = 0x82;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// Attribute types of a Name (2.5.4.x) and the SAN extension (2.5.29.17), as DER contents.
const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
const OID_C: &[u8] = &[0x55, 0x04, 0x06];
const OID_L: &[u8] = &[0x55, 0x04, 0x07];
const OID_ST: &[u8] = &[0x55, 0x04, 0x08];
const OID_O: &[u8] = &[0x55, 0x04, 0x0a];
const OID_OU: &[u8] = &[0x55, 0x04, 0x0b];
const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];

/// Signature algorithms by OID contents: (name, key algorithm).
const SIGNATURE_ALGORITHMS: &[(&[u8], &str, &str)] = &[
    (
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b],
        "SHA256-RSA",
        "RSA",
    ),
    (
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c],
        "SHA384-RSA",
        "RSA",
    ),
    (
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d],
        "SHA512-RSA",
        "RSA",
    ),
    (
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a],
        "RSA-PSS",
        "RSA",
    ),
    (
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02],
        "ECDSA-SHA256",
        "ECC",
    ),
    (
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],
        "ECDSA-SHA384",
        "ECC",
    ),
    (
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04],
        "ECDSA-SHA512",
        "ECC",
    ),
    (&[0x2b, 0x65, 0x70], "Ed25519", "Ed25519"),
];

/// Everything [`Inspected`] holds, from a DER certificate.
fn read_fields(der: &[u8]) -> Option<Inspected> {
    let (tag, certificate, _) = element(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, after_tbs) = element(certificate)?;
    if tag != SEQUENCE {
        return None;
    }
    let (_, signature_algorithm, _) = element(after_tbs)?;
    let (_, algorithm_oid, _) = element(signature_algorithm)?;
    let (signature_algorithm, algorithm_type) = SIGNATURE_ALGORITHMS
        .iter()
        .find(|(oid, _, _)| *oid == algorithm_oid)
        .map_or(("UNKNOWN", "UNKNOWN"), |(_, name, kind)| (*name, *kind));
    let mut rest = tbs;
    let (tag, _, after) = element(rest)?;
    if tag == VERSION {
        rest = after;
    }
    let (tag, serial, rest) = element(rest)?;
    if tag != INTEGER {
        return None;
    }
    let (_, _, rest) = element(rest)?; // signature
    let (tag, issuer, rest) = element(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, validity, rest) = element(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, not_before, after_not_before) = element(validity)?;
    let not_before = parse_time(tag, not_before)?;
    let (tag, not_after, _) = element(after_not_before)?;
    let not_after = parse_time(tag, not_after)?;
    let (tag, subject, rest) = element(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    let (_, _, mut rest) = element(rest)?; // subjectPublicKeyInfo
    let mut san = Vec::new();
    while !rest.is_empty() {
        let (tag, contents, after) = element(rest)?;
        rest = after;
        if tag == EXTENSIONS {
            san = subject_alt_dns_names(contents)?;
        }
    }
    let attribute = |oid: &[u8]| name_attribute(subject, oid).unwrap_or_default();
    Some(Inspected {
        not_before,
        not_after,
        common_name: attribute(OID_CN).into_iter().next().unwrap_or_default(),
        san,
        issuer: name_attribute(issuer, OID_CN).unwrap_or_default(),
        organization: attribute(OID_O),
        organizational_unit: attribute(OID_OU),
        locality: attribute(OID_L),
        state: attribute(OID_ST),
        country: attribute(OID_C),
        serial_number: hex::encode(serial.strip_prefix(&[0]).unwrap_or(serial)),
        signature_algorithm: signature_algorithm.to_owned(),
        algorithm_type: algorithm_type.to_owned(),
    })
}

/// The values of attribute `oid` in a Name (`SEQUENCE OF SET OF {type, value}`).
fn name_attribute(name: &[u8], oid: &[u8]) -> Option<Vec<String>> {
    let mut values = Vec::new();
    let mut rdns = name;
    while !rdns.is_empty() {
        let (tag, set, after) = element(rdns)?;
        rdns = after;
        if tag != SET {
            return None;
        }
        let mut attributes = set;
        while !attributes.is_empty() {
            let (_, attribute, after) = element(attributes)?;
            attributes = after;
            let (tag, kind, value) = element(attribute)?;
            if tag == OID && kind == oid {
                let (_, text, _) = element(value)?;
                values.push(String::from_utf8_lossy(text).into_owned());
            }
        }
    }
    Some(values)
}

/// The dNSNames of the subjectAltName extension in `[3] Extensions`.
fn subject_alt_dns_names(extensions: &[u8]) -> Option<Vec<String>> {
    let (tag, mut list, _) = element(extensions)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut names = Vec::new();
    while !list.is_empty() {
        let (_, extension, after) = element(list)?;
        list = after;
        let (tag, oid, mut rest) = element(extension)?;
        if tag != OID || oid != OID_SAN {
            continue;
        }
        // critical BOOLEAN DEFAULT FALSE, then the OCTET STRING.
        let (mut tag, mut value, after) = element(rest)?;
        if tag != OCTET_STRING {
            rest = after;
            (tag, value, _) = element(rest)?;
        }
        if tag != OCTET_STRING {
            return None;
        }
        let (_, mut general_names, _) = element(value)?;
        while !general_names.is_empty() {
            let (tag, name, after) = element(general_names)?;
            general_names = after;
            if tag == DNS_NAME {
                names.push(String::from_utf8_lossy(name).into_owned());
            }
        }
    }
    Some(names)
}

/// The notAfter of a DER certificate, as unix seconds.
pub fn not_after(der: &[u8]) -> Option<i64> {
    read_fields(der).map(|fields| fields.not_after)
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

    fn made(names: &[&str], not_after: i64) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0]);
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Seller Ltd");
        params.not_before =
            time::OffsetDateTime::from_unix_timestamp(not_after - 86_400 * 90).unwrap();
        params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn inspect_reads_what_the_answers_show() {
        let not_after = 1_900_000_000;
        let (cert, key) = made(&["api.seller.example", "*.v2.seller.example"], not_after);
        let seen = inspect(cert.as_bytes(), key.as_bytes(), 1_800_000_000).unwrap();
        assert_eq!(seen.not_after, not_after);
        assert_eq!(seen.not_before, not_after - 86_400 * 90);
        assert_eq!(seen.common_name, "api.seller.example");
        assert_eq!(seen.san, ["api.seller.example", "*.v2.seller.example"]);
        assert_eq!(seen.organization, ["Seller Ltd"]);
        assert_eq!(seen.signature_algorithm, "ECDSA-SHA256");
        assert_eq!(seen.algorithm_type, "ECC");
        assert!(!seen.serial_number.is_empty());
    }

    #[test]
    fn inspect_refuses_each_rule_by_name() {
        let (cert, key) = made(&["api.seller.example"], 1_900_000_000);
        let (_, other_key) = made(&["api.seller.example"], 1_900_000_000);
        let refused = |cert: &str, key: &str, now| inspect(cert.as_bytes(), key.as_bytes(), now);
        assert!(matches!(
            refused(&cert, &other_key, 1_800_000_000),
            Err(CertificateError::KeyMismatch)
        ));
        let expired = refused(&cert, &key, 1_900_000_001).unwrap_err();
        assert_eq!(expired.rule(), ("cert_content", "must not be expired"));
        assert!(matches!(
            refused("not a pem", &key, 0),
            Err(CertificateError::NoCertificate)
        ));
        assert!(matches!(
            refused(&cert, "", 0),
            Err(CertificateError::NoKey)
        ));
        // No rule's text carries key material.
        assert!(!expired.to_string().contains("PRIVATE"));
    }

    #[test]
    fn covers_names_and_one_wildcard_label() {
        let (cert, _) = made(
            &["api.seller.example", "*.v2.seller.example"],
            1_900_000_000,
        );
        assert!(covers(cert.as_bytes(), "api.seller.example"));
        assert!(covers(cert.as_bytes(), "eu.v2.seller.example"));
        assert!(!covers(cert.as_bytes(), "a.b.v2.seller.example"));
        assert!(!covers(cert.as_bytes(), "other.example"));
    }

    #[test]
    fn refuses_what_is_not_a_certificate() {
        assert_eq!(not_after(b""), None);
        assert_eq!(not_after(&[0x30, 0x82, 0xff]), None);
        assert_eq!(not_after(&[0x02, 0x01, 0x00]), None);
    }
}
