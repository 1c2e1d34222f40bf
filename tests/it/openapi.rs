//! `GET /openapi.json` on the control listener: served without credentials, and every
//! operation of the document reaches a handler of the running router (the other direction,
//! every route documented, is `control::openapi`'s unit test over the route table).

use crate::support::control::*;

/// A value for a path parameter: the caller's own project and instance, else an id that
/// exists nowhere (so that the handler answers its own 404, not the router's).
fn fill(template: &str) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}').expect("closed parameter") + open;
        out.push_str(match &rest[open + 1..close] {
            "project_id" => SELLER_PROJECT,
            "instance_id" => INSTANCE,
            _ => "no-such-id",
        });
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out
}

#[tokio::test]
async fn openapi_document_is_served_and_every_operation_is_routed() {
    let control = Control::start(&Backend::Sqlite).await;
    let anonymous = Api::new(control.addr, Auth::None);
    let (status, document) = anonymous.send("GET", "/openapi.json", None).await;
    assert_eq!(status, 200, "GET /openapi.json needs no credentials");
    assert_eq!(document["openapi"], "3.0.3");
    assert_eq!(
        document,
        serde_json::from_str::<serde_json::Value>(marketgate::control::openapi::DOCUMENT).unwrap()
    );

    let seller = control.client(SELLER_TOKEN).as_domain(SELLER_DOMAIN);
    let operations =
        marketgate::control::openapi::document_operations(marketgate::control::openapi::DOCUMENT);
    assert!(operations.len() > 30);
    for (method, template) in operations {
        let path = fill(&template);
        let body = matches!(method.as_str(), "POST" | "PUT").then(|| serde_json::json!({}));
        let (status, answer) = seller.send(&method, &path, body).await;
        assert!(
            !(status == 404 && answer["error_code"] == "APIG.0101"),
            "{method} {template} is documented but not routed: {answer}"
        );
        assert!(status < 500, "{method} {path}: {status} {answer}");
    }
    // And the router still refuses what is not documented.
    let (status, answer) = seller
        .send(
            "PATCH",
            &fill("/v2/{project_id}/apigw/instances/{instance_id}/apis"),
            None,
        )
        .await;
    assert_eq!(
        (status, answer["error_code"].as_str()),
        (404, Some("APIG.0101"))
    );
}
