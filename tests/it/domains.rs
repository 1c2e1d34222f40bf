//! Sellers' domains and certificates end to end (issue 16): bound and attached through the
//! management API, published to a subscribed proxy, served by SNI over real sockets; the
//! certificate checks' refusals; rotation under an open connection; the minimum TLS version,
//! the HTTPS redirect and the expiry metric.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};

use crate::support::control::{
    expect_error, expect_status, mgmt, Api, SELLER_PROJECT, SELLER_TOKEN,
};
use crate::support::gateway::{admin_get, raw, request, signed_as, Backend};
use crate::support::planes::{Planes, Proxy};

/// A certificate made for the test: PEM chain and key, and the leaf's DER.
struct Made {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
    not_after: i64,
}

fn made(names: &[&str], not_after: i64) -> Made {
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
            .unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, names[0]);
    params.not_before =
        time::OffsetDateTime::from_unix_timestamp(not_after - 400 * 86_400).unwrap();
    params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Made {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().clone(),
        not_after,
    }
}

/// A year from now.
fn next_year() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp() + 365 * 86_400
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A TLS connection with `sni`, trusting only `trusted`, speaking only the `versions` given:
/// the stream and the leaf the server presented.
async fn connect(
    addr: SocketAddr,
    sni: &str,
    trusted: &CertificateDer<'static>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> std::io::Result<(Tls, CertificateDer<'static>)> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let stream = connector
        .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp)
        .await?;
    let leaf = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    Ok((stream, leaf))
}

const BOTH: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// One HTTP/1.1 keep-alive connection over TLS.
async fn keep_alive(stream: Tls) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// A signed `GET /v1/echo` on `host` over `sender`: (status, body).
async fn buy_call(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: &str,
    key: &str,
    secret: &str,
) -> Result<(u16, Bytes), hyper::Error> {
    sender.ready().await?;
    let response = sender
        .send_request(signed_as(
            key,
            secret,
            request("GET", host, "/v1/echo", Bytes::new()),
        ))
        .await?;
    let status = response.status().as_u16();
    Ok((status, response.into_body().collect().await?.to_bytes()))
}

/// A seller's group with one sellable API (`GET /v1/echo` → `backend`, over HTTP or HTTPS),
/// listed at `url_domain` and bought by the buyer: (group id, app key, app secret).
async fn bought_group(
    planes: &Planes,
    name: &str,
    url_domain: &str,
    backend: SocketAddr,
) -> (String, String, String) {
    let api = json!({"name": format!("{name}_api"), "type": 1, "req_protocol": "BOTH",
                     "req_method": "GET", "req_uri": "/v1/echo", "auth_type": "APP",
                     "backend_type": "HTTP",
                     "backend_api": {"req_protocol": "HTTP", "req_method": "GET",
                                     "req_uri": "/v1/echo", "url_domain": backend.to_string(),
                                     "timeout": 5000}});
    let gid = planes.listed_group_with(name, url_domain, api).await;
    let (key, secret) = planes.buy(&gid, &format!("order-{name}"), 100_000).await;
    (gid, key, secret)
}

fn domains_path(gid: &str) -> String {
    format!("{}/api-groups/{gid}/domains", mgmt(SELLER_PROJECT))
}

fn certificates_path() -> String {
    format!("/v2/{SELLER_PROJECT}/apigw/certificates")
}

async fn bind_domain(seller: &Api, gid: &str, domain: &str) -> String {
    let bound = seller
        .post(&domains_path(gid), json!({"url_domain": domain}))
        .await;
    expect_status("bind domain", &bound, 201);
    bound.1["id"].as_str().unwrap().to_owned()
}

fn form(name: &str, cert: &Made) -> Value {
    json!({"name": name, "cert_content": cert.cert_pem, "private_key": cert.key_pem})
}

/// A proxy with a TLS listener whose default certificate is `default`, subscribed to `planes`.
async fn tls_proxy(planes: &mut Planes, dir: &std::path::Path, default: &Made) -> usize {
    let cert = dir.join("default.pem");
    let key = dir.join("default.key");
    std::fs::write(&cert, &default.cert_pem).unwrap();
    std::fs::write(&key, &default.key_pem).unwrap();
    let gateway = format!(
        "tls_listen = '127.0.0.1:0'\ntls_cert = '{}'\ntls_key = '{}'",
        cert.display(),
        key.display()
    );
    let proxy = Proxy::start_with("proxy-tls", &[planes.admin], &gateway, "").await;
    planes.proxies.push(proxy);
    planes.proxies.len() - 1
}

#[tokio::test]
async fn bound_domains_are_served_their_own_certificates_by_sni_and_rotate_without_a_drop() {
    let backend = Backend::echo().await;
    let mut planes = Planes::start(0).await;
    let dir = tempfile::tempdir().unwrap();
    // The default certificate also names `unknown.test`, a name no snapshot serves.
    let default = made(&["default.test", "unknown.test"], next_year());
    let p = tls_proxy(&mut planes, dir.path(), &default).await;
    let seller = planes.client(SELLER_TOKEN);
    let (gid_a, key_a, secret_a) =
        bought_group(&planes, "shop_a", "a.market.test", backend.addr).await;
    let (gid_b, key_b, secret_b) =
        bought_group(&planes, "shop_b", "b.market.test", backend.addr).await;

    // Group A: a certificate resource, created then attached. Group B: bound inline.
    let domain_a = "api.seller-a.test";
    let domain_b = "api.seller-b.test";
    bind_domain(&seller, &gid_a, domain_a).await;
    let domain_b_id = bind_domain(&seller, &gid_b, domain_b).await;
    let cert_a = made(&[domain_a], next_year());
    let created = seller
        .post(&certificates_path(), form("cert_a", &cert_a))
        .await;
    expect_status("create certificate", &created, 201);
    assert!(created.1.get("private_key").is_none(), "{}", created.1);
    let expected_not_after = marketgate::control::state::rfc3339(cert_a.not_after);
    assert_eq!(created.1["not_after"], expected_not_after.as_str());
    assert_eq!(created.1["san"], json!([domain_a]));
    let cert_a_id = created.1["id"].as_str().unwrap().to_owned();
    let attach = seller
        .post(
            &format!("{}/{cert_a_id}/domains/attach", certificates_path()),
            json!({"domains": [{"domain": domain_a}]}),
        )
        .await;
    expect_status("attach", &attach, 204);
    let cert_b = made(&[domain_b], next_year());
    let inline = seller
        .post(
            &format!("{}/{domain_b_id}/certificate", domains_path(&gid_b)),
            form("cert_b", &cert_b),
        )
        .await;
    expect_status("bind inline", &inline, 201);
    assert_eq!(inline.1["url_domain"], domain_b);
    let shown = seller
        .get(&format!("{}/{cert_a_id}", certificates_path()))
        .await;
    expect_status("show", &shown, 200);
    assert!(!shown.1.to_string().contains("PRIVATE KEY"), "{}", shown.1);
    let group = seller
        .get(&format!("{}/api-groups/{gid_a}", mgmt(SELLER_PROJECT)))
        .await;
    assert_eq!(group.1["url_domains"][0]["domain"], domain_a);
    assert_eq!(group.1["url_domains"][0]["ssl_id"], cert_a_id.as_str());
    planes.converged().await;
    let tls = planes.proxies[p].buyers_tls.unwrap();

    // SNI = the bound domain: its certificate, and the call reaches the backend.
    let (stream, leaf) = connect(tls, domain_a, &cert_a.der, BOTH).await.unwrap();
    assert_eq!(leaf, cert_a.der, "{domain_a} is served its own certificate");
    let mut kept = keep_alive(stream).await;
    let hits = backend.hits();
    let (status, body) = buy_call(&mut kept, domain_a, &key_a, &secret_a)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body:?}");
    assert_eq!(backend.hits(), hits + 1, "the call reached the backend");
    // Another group's domain gets its own; an unknown name gets the default.
    let (stream_b, leaf_b) = connect(tls, domain_b, &cert_b.der, BOTH).await.unwrap();
    assert_eq!(leaf_b, cert_b.der);
    let (status, body) = buy_call(&mut keep_alive(stream_b).await, domain_b, &key_b, &secret_b)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body:?}");
    let (_, leaf) = connect(tls, "unknown.test", &default.der, BOTH)
        .await
        .unwrap();
    assert_eq!(
        leaf, default.der,
        "an unknown SNI gets the default certificate"
    );
    // The bound domain is group A's alone: B's buyer is refused there.
    let (status, _) = buy_call(&mut kept, domain_a, &key_b, &secret_b)
        .await
        .unwrap();
    assert_eq!(status, 403);

    // The expiry metric of each published certificate.
    let metrics = admin_get(planes.proxies[p].admin, "/metrics", true).await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    let line = format!(
        "marketgate_tls_certificate_expiry_timestamp_seconds{{domain=\"{domain_a}\"}} {}",
        cert_a.not_after
    );
    assert!(text.contains(&line), "no `{line}` in the metrics");

    // Rotation: the certificate is replaced in place while a client keeps calling on its
    // open connection; nothing is dropped, and new handshakes get the new certificate.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let caller = {
        let (stop, served) = (stop.clone(), served.clone());
        let (key, secret) = (key_a.clone(), secret_a.clone());
        tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match buy_call(&mut kept, domain_a, &key, &secret).await {
                    Ok((200, _)) => {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    other => failures.push(format!("{other:?}")),
                }
            }
            failures
        })
    };
    let rotated = made(&[domain_a], next_year() + 86_400);
    let replace = seller
        .put(
            &format!("{}/{cert_a_id}", certificates_path()),
            form("cert_a", &rotated),
        )
        .await;
    let acknowledged = Instant::now();
    expect_status("rotate", &replace, 200);
    let enforced = loop {
        let (_, leaf) = connect(tls, domain_a, &rotated.der, BOTH)
            .await
            .map_or((None, None), |(s, l)| (Some(s), Some(l)));
        if leaf.as_ref() == Some(&rotated.der) {
            break acknowledged.elapsed();
        }
        assert!(
            acknowledged.elapsed() < Duration::from_secs(10),
            "not rotated"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let before = served.load(Ordering::Relaxed);
    while served.load(Ordering::Relaxed) < before + 20 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let failures = caller.await.unwrap();
    assert!(failures.is_empty(), "dropped during rotation: {failures:?}");
    println!(
        "rotation: new certificate served {enforced:?} after the 2xx; {} calls on the open \
         connection, 0 failed",
        served.load(Ordering::Relaxed)
    );
    assert!(
        enforced < Duration::from_secs(1),
        "rotation enforced after {enforced:?}"
    );

    // The minimum TLS version: TLSv1.3 refuses a TLS 1.2-only client.
    let modify = seller
        .put(
            &format!("{}/{domain_b_id}", domains_path(&gid_b)),
            json!({"min_ssl_version": "TLSv1.3"}),
        )
        .await;
    expect_status("min_ssl_version", &modify, 200);
    planes.converged().await;
    let tls12 = [&rustls::version::TLS12];
    assert!(connect(tls, domain_b, &cert_b.der, &tls12).await.is_err());
    assert!(
        connect(tls, domain_b, &cert_b.der, &[&rustls::version::TLS13])
            .await
            .is_ok()
    );
    assert!(connect(tls, domain_a, &rotated.der, &tls12).await.is_ok());

    // HTTPS redirect where asked, plain HTTP only.
    let domain_a_id = group.1["url_domains"][0]["id"].as_str().unwrap().to_owned();
    let modify = seller
        .put(
            &format!("{}/{domain_a_id}", domains_path(&gid_a)),
            json!({"is_http_redirect_to_https": true}),
        )
        .await;
    expect_status("redirect", &modify, 200);
    planes.converged().await;
    let answer = raw(
        planes.proxies[p].buyers,
        format!("GET /v1/echo?x=1 HTTP/1.1\r\nHost: {domain_a}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    let location = format!("location: https://{domain_a}:{}/v1/echo?x=1", tls.port());
    assert!(answer.starts_with("HTTP/1.1 301"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains(&location), "{answer}");
}

#[tokio::test]
async fn bad_certificates_and_domains_are_refused_with_their_rule() {
    let backend = Backend::echo().await;
    let planes = Planes::start(0).await;
    let seller = planes.client(SELLER_TOKEN);
    let (gid, _, _) = bought_group(&planes, "shop_c", "c.market.test", backend.addr).await;
    let domain = "api.seller-c.test";
    let domain_id = bind_domain(&seller, &gid, domain).await;
    let good = made(&[domain], next_year());
    let other = made(&[domain], next_year());
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let refusals = [
        (
            json!({"name": "wrong_key", "cert_content": good.cert_pem, "private_key": other.key_pem}),
            "private_key must match the certificate's public key",
        ),
        (
            form("expired", &made(&[domain], now - 86_400)),
            "cert_content must not be expired",
        ),
        (
            json!({"name": "garbage", "cert_content": "not a certificate", "private_key": good.key_pem}),
            "cert_content must be a PEM X.509 certificate",
        ),
    ];
    for (body, rule) in refusals {
        let answer = seller.post(&certificates_path(), body).await;
        expect_error(rule, &answer, 400, "APIG.2012");
        let message = answer.1["error_msg"].as_str().unwrap();
        assert!(message.contains(rule), "{message}");
        assert!(!message.contains("PRIVATE KEY"), "{message}");
    }
    // Not covering the domain: refused at the inline bind and at attach.
    let elsewhere = made(&["elsewhere.test"], next_year());
    let inline = seller
        .post(
            &format!("{}/{domain_id}/certificate", domains_path(&gid)),
            form("elsewhere", &elsewhere),
        )
        .await;
    expect_error("not covering", &inline, 400, "APIG.2012");
    assert!(inline.1["error_msg"]
        .as_str()
        .unwrap()
        .contains("must cover the domain api.seller-c.test"));
    let created = seller
        .post(&certificates_path(), form("elsewhere", &elsewhere))
        .await;
    expect_status("create", &created, 201);
    let id = created.1["id"].as_str().unwrap();
    let attach = seller
        .post(
            &format!("{}/{id}/domains/attach", certificates_path()),
            json!({"domains": [{"domain": domain}]}),
        )
        .await;
    expect_error("attach not covering", &attach, 400, "APIG.2012");
    // A domain belongs to one group; five per group.
    let taken = seller
        .post(&domains_path(&gid), json!({"url_domain": domain}))
        .await;
    expect_error("taken", &taken, 400, "APIG.3305");
    let market = seller
        .post(&domains_path(&gid), json!({"url_domain": "c.market.test"}))
        .await;
    expect_error("the market domain", &market, 400, "APIG.3305");
    for i in 2..=5 {
        bind_domain(&seller, &gid, &format!("d{i}.seller-c.test")).await;
    }
    let sixth = seller
        .post(
            &domains_path(&gid),
            json!({"url_domain": "d6.seller-c.test"}),
        )
        .await;
    expect_error("sixth", &sixth, 400, "APIG.2012");
    let bad = seller
        .post(
            &domains_path(&gid),
            json!({"url_domain": "x.seller-c.test", "min_ssl_version": "SSLv3"}),
        )
        .await;
    expect_error("min_ssl_version", &bad, 400, "APIG.2012");
    // Deleting a certificate in use is refused.
    let bound = seller
        .post(
            &format!("{}/{domain_id}/certificate", domains_path(&gid)),
            form("good_one", &good),
        )
        .await;
    expect_status("bind", &bound, 201);
    let ssl_id = bound.1["ssl_id"].as_str().unwrap();
    let delete = seller
        .delete(&format!("{}/{ssl_id}", certificates_path()))
        .await;
    expect_error("delete in use", &delete, 409, "APIG.2000");
}
