//! TLS between the planes and admin tokens with roles (issue 12 item 7), with real binaries:
//! one `marketgate control` whose admin listener serves HTTPS with a certificate of a test CA
//! and asks for client certificates (mutual TLS), and `marketgate proxy` processes that
//! subscribe and lease quota over it.
//!
//! - a proxy trusting the test CA follows the control plane and serves a bought call (its
//!   lease exchanged over HTTPS), presenting a proxy-role token;
//! - a proxy pinning the control plane's certificate follows too, with the *new* proxy token
//!   while the first still presents the old one (rotation: both accepted at once);
//! - a proxy trusting another CA is refused, and says why once while it keeps retrying;
//! - a proxy without a client certificate is refused by the mutual TLS, and says so;
//! - an old and a new operator token both read the proxy list; a proxy token is refused there
//!   (403), and on a proxy's `PUT /v1/snapshot` (403, the body naming the rule).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::support::control::{self as ctl, bought_group, config_toml};
use crate::support::gateway::{request, signed_as, Backend, Buyer};
use crate::support::process::Process;

const OPERATOR_OLD: &str = "operator-token-old";
const OPERATOR_NEW: &str = "operator-token-new";
const PROXY_OLD: &str = "proxy-token-old";
const PROXY_NEW: &str = "proxy-token-new";
const DOMAIN: &str = "tls-planes.example.com";
const FOLLOWING: &str = "following the control plane's snapshots";
const FAILING: &str = "no control plane answers; serving the snapshot held, retrying with backoff";

/// A test CA: its certificate (PEM and parsed) and key.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A certificate for 127.0.0.1 and localhost, for a server or a client.
    fn issue(&self, server: bool) -> (rcgen::Certificate, KeyPair) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![
            SanType::IpAddress("127.0.0.1".parse().unwrap()),
            SanType::DnsName("localhost".try_into().unwrap()),
        ];
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert, key)
    }
}

/// Writes `text` to `dir/name`; returns the path.
fn file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A TCP relay to `to` that counts the connections made through it: how often a proxy tried.
async fn counting_relay(to: SocketAddr) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (addr, count)
}

/// Starts `marketgate proxy` named `node` with `[proxy]` lines `proxy` (control URL, trust,
/// token) and an admin listener that knows the fleet's admin tokens (as a config template
/// shared by every plane would).
async fn proxy(dir: &Path, node: &str, proxy: &str) -> Process {
    let data_dir = dir.join(node);
    std::fs::create_dir_all(&data_dir).unwrap();
    let config = file(
        dir,
        &format!("{node}.toml"),
        &format!(
            "data_dir = '{}'\n\
             [gateway]\nlisten = '127.0.0.1:0'\n\
             [admin]\nlisten = '127.0.0.1:0'\n\
             [[admin.tokens]]\ntoken = '{OPERATOR_NEW}'\nrole = 'operator'\n\
             [[admin.tokens]]\ntoken = '{PROXY_OLD}'\nrole = 'proxy'\n\
             [proxy]\nnode_id = '{node}'\n{proxy}\n\
             [log]\nformat = 'json'\n",
            data_dir.display()
        ),
    );
    Process::start("proxy", &config, "proxy listening").await
}

/// The first `FAILING` record's reason, once there is one.
async fn failing_reason(process: &Process) -> String {
    process.logged(FAILING).await;
    process
        .records()
        .iter()
        .find(|r| r["fields"]["message"] == FAILING)
        .and_then(|r| r["fields"]["reason"].as_str().map(str::to_owned))
        .expect("the failure says why")
}

/// `method path` on an admin listener with `token`, over `tls` when given.
async fn admin_call(
    admin: SocketAddr,
    tls: Option<&rustls::ClientConfig>,
    method: &str,
    path: &str,
    token: &str,
) -> (StatusCode, String) {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let scheme = if tls.is_some() { "https" } else { "http" };
    let request = Request::builder()
        .method(method)
        .uri(format!("{scheme}://{admin}{path}"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let response = match tls {
        Some(tls) => {
            let connector = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls.clone())
                .https_only()
                .enable_http1()
                .wrap_connector(http);
            Client::builder(TokioExecutor::new())
                .build(connector)
                .request(request)
                .await
        }
        None => {
            Client::builder(TokioExecutor::new())
                .build(http)
                .request(request)
                .await
        }
    }
    .unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The test's own HTTPS client: trusts `ca`, presents `client`.
fn test_client(ca: &Ca, client: &rcgen::Certificate, key: &KeyPair) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![client.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap()
}

/// Waits until `proxy` serves `version` (its admin listener says so).
async fn serves(proxy: &Process, version: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = admin_call(
            proxy.addr("admin"),
            None,
            "GET",
            "/v1/snapshot/version",
            OPERATOR_NEW,
        )
        .await;
        let served: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if served["version"].as_u64() >= Some(version) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never served version {version}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn planes_speak_https_with_rotated_tokens_and_roles() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("marketgate test CA");
    let other_ca = Ca::new("another CA");
    let (server, server_key) = ca.issue(true);
    let (client, client_key) = ca.issue(false);
    let ca_pem = file(d, "ca.pem", &ca.cert.pem());
    let other_ca_pem = file(d, "other-ca.pem", &other_ca.cert.pem());
    let server_pem = file(d, "control.pem", &server.pem());
    let server_key_pem = file(d, "control-key.pem", &server_key.serialize_pem());
    let client_pem = file(d, "proxy.pem", &client.pem());
    let client_key_pem = file(d, "proxy-key.pem", &client_key.serialize_pem());

    // The control plane: HTTPS admin listener, client certificates of the test CA required,
    // the operator and proxy tokens of a rotation in progress (old and new of each).
    let backend = Backend::echo().await;
    let database_url = ctl::Backend::Sqlite.fresh_database(d).await;
    let toml = format!(
        "data_dir = '{}'\n{}\
         [[admin.tokens]]\ntoken = '{OPERATOR_NEW}'\nrole = 'operator'\n\
         [[admin.tokens]]\ntoken = '{PROXY_OLD}'\nrole = 'proxy'\n\
         [[admin.tokens]]\ntoken = '{PROXY_NEW}'\nrole = 'proxy'\n",
        d.join("control-data").display(),
        config_toml(&database_url, "127.0.0.1:0").replace(
            "token = \"admin-token\"\n",
            &format!(
                "token = \"{OPERATOR_OLD}\"\ntls_cert = '{}'\ntls_key = '{}'\ntls_client_ca = '{}'\n",
                server_pem.display(),
                server_key_pem.display(),
                ca_pem.display()
            ),
        )
    );
    let config = file(d, "control.toml", &toml);
    let control = Process::start("control", &config, "control plane listening").await;
    let control_admin = control.addr("admin");
    let bought = bought_group(control.addr("listen"), backend.addr, DOMAIN, 10).await;

    let identity = format!(
        "control_client_cert = '{}'\ncontrol_client_key = '{}'",
        client_pem.display(),
        client_key_pem.display()
    );
    let url = format!("control_url = 'https://{control_admin}'");
    // Trusts the test CA, presents the old proxy token.
    let by_ca = proxy(
        d,
        "by-ca",
        &format!(
            "{url}\ncontrol_ca = '{}'\ncontrol_token = '{PROXY_OLD}'\n{identity}",
            ca_pem.display()
        ),
    )
    .await;
    // Pins the control plane's certificate, presents the new proxy token.
    let pin = marketgate::plane_tls::certificate_sha256(server.der());
    let pinned = proxy(
        d,
        "pinned",
        &format!(
            "{url}\ncontrol_cert_sha256 = ['{pin}']\ncontrol_token = '{PROXY_NEW}'\n{identity}"
        ),
    )
    .await;
    let tls = test_client(&ca, &client, &client_key);
    let (_, version) = admin_call(
        control_admin,
        Some(&tls),
        "GET",
        "/v1/snapshot/version",
        OPERATOR_NEW,
    )
    .await;
    let version: serde_json::Value = serde_json::from_str(&version).unwrap();
    for follower in [&by_ca, &pinned] {
        serves(follower, version["version"].as_u64().unwrap()).await;
    }
    // A call bought on the control plane is served: the lease came over HTTPS.
    let answer = Buyer::new(by_ca.addr("buyers"))
        .send(signed_as(
            &bought.key,
            &bought.secret,
            request("GET", DOMAIN, "/call", Bytes::new()),
        ))
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);

    // Another CA: refused, and said once although it keeps trying (counted at a relay).
    let (relay, attempts) = counting_relay(control_admin).await;
    let wrong_ca = proxy(
        d,
        "wrong-ca",
        &format!(
            "control_url = 'https://{relay}'\ncontrol_ca = '{}'\ncontrol_token = '{PROXY_OLD}'\n{identity}",
            other_ca_pem.display()
        ),
    )
    .await;
    let why = failing_reason(&wrong_ca).await;
    assert!(
        why.contains("invalid peer certificate") && why.contains("UnknownIssuer"),
        "the proxy says why: {why}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while attempts.load(Ordering::SeqCst) < 4 {
        assert!(Instant::now() < deadline, "the proxy stopped retrying");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        wrong_ca.count_logged(FAILING),
        1,
        "said once over {} attempts",
        attempts.load(Ordering::SeqCst)
    );
    assert_eq!(wrong_ca.count_logged(FOLLOWING), 0);

    // No client certificate: the mutual TLS refuses it.
    let anonymous = proxy(
        d,
        "anonymous",
        &format!(
            "{url}\ncontrol_ca = '{}'\ncontrol_token = '{PROXY_OLD}'",
            ca_pem.display()
        ),
    )
    .await;
    let why = failing_reason(&anonymous).await;
    assert!(why.contains("CertificateRequired"), "{why}");

    // Tokens and roles on the control plane's admin listener (HTTPS, with a client cert).
    for token in [OPERATOR_OLD, OPERATOR_NEW] {
        let (status, body) =
            admin_call(control_admin, Some(&tls), "GET", "/v1/proxies", token).await;
        assert_eq!(status, StatusCode::OK, "{token}: {body}");
    }
    let (status, body) =
        admin_call(control_admin, Some(&tls), "GET", "/v1/proxies", PROXY_NEW).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body.contains("GET /v1/proxies needs an operator token"),
        "{body}"
    );

    // On a proxy's admin listener: a proxy token cannot push a snapshot.
    let (status, body) =
        admin_call(by_ca.addr("admin"), None, "PUT", "/v1/snapshot", PROXY_OLD).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body.contains("PUT /v1/snapshot needs an operator token")
            && body
                .contains("role proxy, which may only subscribe to snapshots and exchange leases"),
        "{body}"
    );
    // An operator's token passes the check (the empty body is refused then, for itself).
    let (status, body) = admin_call(
        by_ca.addr("admin"),
        None,
        "PUT",
        "/v1/snapshot",
        OPERATOR_NEW,
    )
    .await;
    assert!(
        status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
        "{status}: {body}"
    );
}
