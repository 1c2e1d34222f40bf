//! The buyer's tool behind `marketgate sign` and `marketgate call`: sign a request with an
//! APP's key and secret the way Huawei's SDKs do, then print it as a curl command or send it.
//!
//! It owns turning a URL, method, headers and body into a signed request. It does not decide
//! anything about purchases; the gateway does. Secrets never appear in what it prints other
//! than inside the signature they produce.

use std::fmt::Write as _;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use time::OffsetDateTime;

use crate::signing::{self, Payload, RequestParts};

/// Why a request could not be signed or sent.
#[derive(Debug, thiserror::Error)]
pub enum BuyerError {
    #[error("'{0}' is not an absolute http(s) URL")]
    BadUrl(String),
    #[error("header '{0}' is not 'Name: value'")]
    BadHeader(String),
    #[error("method '{0}' is not valid")]
    BadMethod(String),
    #[error("signing failed: {0}")]
    Signing(#[from] signing::SignatureError),
    #[error("only http:// URLs can be sent by `marketgate call`; use `marketgate sign` and curl for https")]
    HttpsUnsupported,
    #[error("request failed: {0}")]
    Send(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// A request ready to send: every header, the signature's included.
#[derive(Debug, Clone)]
pub struct SignedRequest {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// What to sign.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    pub method: String,
    pub url: String,
    /// `Name: value` lines.
    pub headers: Vec<String>,
    pub body: Vec<u8>,
    /// Sign with `X-Sdk-Content-Sha256: UNSIGNED-PAYLOAD` instead of the body hash.
    pub unsigned_payload: bool,
}

/// Signs `spec` with `key`/`secret` at `now`. Signs `host`, `x-sdk-date` and every header
/// given, as Huawei's SDK signer does.
pub fn sign_request(
    spec: &RequestSpec,
    key: &str,
    secret: &str,
    now: OffsetDateTime,
) -> Result<SignedRequest, BuyerError> {
    let uri: Uri = spec
        .url
        .parse()
        .map_err(|_| BuyerError::BadUrl(spec.url.clone()))?;
    let authority = match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(authority)) => authority.as_str().to_owned(),
        _ => return Err(BuyerError::BadUrl(spec.url.clone())),
    };
    let method = Method::from_bytes(spec.method.to_ascii_uppercase().as_bytes())
        .map_err(|_| BuyerError::BadMethod(spec.method.clone()))?;

    let mut headers = HeaderMap::new();
    let mut signed: Vec<String> = vec!["host".into(), signing::DATE_HEADER.into()];
    for line in &spec.headers {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| BuyerError::BadHeader(line.clone()))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| BuyerError::BadHeader(line.clone()))?;
        let value =
            HeaderValue::from_str(value.trim()).map_err(|_| BuyerError::BadHeader(line.clone()))?;
        signed.push(name.as_str().to_owned());
        headers.append(name, value);
    }
    if spec.unsigned_payload {
        headers.insert(
            signing::CONTENT_SHA256_HEADER,
            HeaderValue::from_static(signing::UNSIGNED_PAYLOAD),
        );
        signed.push(signing::CONTENT_SHA256_HEADER.into());
    }
    // A `Host` given with -H wins over the URL's authority: buyers reach a market domain
    // through an address that is not (yet) in DNS.
    if !headers.contains_key(http::header::HOST) {
        headers.insert(
            http::header::HOST,
            HeaderValue::from_str(&authority).map_err(|_| BuyerError::BadUrl(spec.url.clone()))?,
        );
    }
    headers.insert(
        signing::DATE_HEADER,
        HeaderValue::from_str(&signing::format_sdk_date(now)).expect("a date is a valid header"),
    );
    let signed: Vec<&str> = signed.iter().map(String::as_str).collect();
    let parts = RequestParts {
        method: method.as_str(),
        path: uri.path(),
        query: uri.query(),
        headers: &headers,
        authority: None,
        payload: Payload::Body(&spec.body),
    };
    let authorization = signing::sign(key, secret.as_bytes(), &parts, &signed)?;
    headers.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&authorization).expect("a signature is a valid header"),
    );
    Ok(SignedRequest {
        method,
        uri,
        headers,
        body: Bytes::from(spec.body.clone()),
    })
}

/// The request as a curl command line that a shell can paste.
pub fn to_curl(request: &SignedRequest) -> String {
    let mut out = format!("curl -sS -i -X {}", request.method);
    for (name, value) in &request.headers {
        let from_url = request.uri.authority().map(|a| a.as_str().as_bytes());
        if name == http::header::HOST && Some(value.as_bytes()) == from_url {
            continue; // curl derives it from the URL; the signed value is the same
        }
        let _ = write!(
            out,
            " -H {}",
            shell_quote(&format!("{}: {}", name, value.to_str().unwrap_or_default()))
        );
    }
    if !request.body.is_empty() {
        let _ = write!(
            out,
            " --data-binary {}",
            shell_quote(&String::from_utf8_lossy(&request.body))
        );
    }
    let _ = write!(out, " {}", shell_quote(&request.uri.to_string()));
    out
}

/// The response of a sent request.
#[derive(Debug)]
pub struct CallResponse {
    pub status: http::StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Sends a signed request over plain HTTP.
pub async fn send(request: SignedRequest) -> Result<CallResponse, BuyerError> {
    if request.uri.scheme_str() != Some("http") {
        return Err(BuyerError::HttpsUnsupported);
    }
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut builder = http::Request::builder()
        .method(request.method)
        .uri(request.uri);
    if let Some(headers) = builder.headers_mut() {
        *headers = request.headers;
    }
    let req = builder
        .body(Full::new(request.body))
        .map_err(|e| BuyerError::Send(Box::new(e)))?;
    let response = client
        .request(req)
        .await
        .map_err(|e| BuyerError::Send(Box::new(e)))?;
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| BuyerError::Send(Box::new(e)))?
        .to_bytes();
    Ok(CallResponse {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::{parse_sdk_date, verify, Authorization};

    #[test]
    fn signed_request_verifies_and_matches_the_sdk_vector() {
        let spec = RequestSpec {
            method: "get".into(),
            url: "https://market.example.com/v1/weather/beijing?lang=zh&unit=c".into(),
            headers: vec![],
            body: vec![],
            unsigned_payload: false,
        };
        let now = parse_sdk_date("20261122T120000Z").unwrap();
        let request =
            sign_request(&spec, "AppKeyExample0001", "AppSecretExample0001xyz", now).unwrap();
        let header = request.headers["authorization"].to_str().unwrap();
        let auth = Authorization::parse(header).unwrap();
        assert_eq!(
            auth.signature,
            "0173081367c0fe7542b7b289f17ac840b94e5f140e9598fb76a27847218c5447"
        );
        let parts = RequestParts {
            method: "GET",
            path: request.uri.path(),
            query: request.uri.query(),
            headers: &request.headers,
            authority: None,
            payload: Payload::Body(b""),
        };
        verify(&auth, &parts, b"AppSecretExample0001xyz", now, 900).unwrap();
    }

    #[test]
    fn curl_line_quotes_and_keeps_the_signature() {
        let spec = RequestSpec {
            method: "POST".into(),
            url: "http://127.0.0.1:8080/orders".into(),
            headers: vec!["Content-Type: application/json".into()],
            body: br#"{"it's":1}"#.to_vec(),
            unsigned_payload: false,
        };
        let request = sign_request(&spec, "k", "s", OffsetDateTime::now_utc()).unwrap();
        let curl = to_curl(&request);
        assert!(curl.starts_with("curl -sS -i -X POST"));
        assert!(curl.contains("SignedHeaders=content-type;host;x-sdk-date"));
        assert!(curl.contains(r#"'{"it'\''s":1}'"#));
    }

    #[test]
    fn host_header_overrides_the_url_authority() {
        let spec = RequestSpec {
            method: "GET".into(),
            url: "http://127.0.0.1:8080/v1/hello".into(),
            headers: vec!["Host: shop.market.example.com".into()],
            body: vec![],
            unsigned_payload: false,
        };
        let request = sign_request(&spec, "k", "s", OffsetDateTime::now_utc()).unwrap();
        assert_eq!(request.headers["host"], "shop.market.example.com");
        assert_eq!(request.headers.get_all("host").iter().count(), 1);
        assert!(to_curl(&request).contains("-H 'host: shop.market.example.com'"));
    }

    #[test]
    fn relative_url_is_refused() {
        let spec = RequestSpec {
            method: "GET".into(),
            url: "/nohost".into(),
            headers: vec![],
            body: vec![],
            unsigned_payload: false,
        };
        assert!(matches!(
            sign_request(&spec, "k", "s", OffsetDateTime::now_utc()),
            Err(BuyerError::BadUrl(_))
        ));
    }
}
