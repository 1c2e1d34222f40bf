//! The two planes together: what the market sells through the control plane is exactly what
//! the data plane lets through, once the control plane's snapshot is applied.

use bytes::Bytes;
use serde_json::json;

use crate::support::control::*;
use crate::support::gateway::{request, signed_as, Buyer, TestGateway};

#[tokio::test]
async fn control_snapshot_sells_exactly_what_was_bought_through_the_gateway() {
    let control = Control::start(&Backend::Sqlite).await;
    let seller = control.client(SELLER_TOKEN);
    let base = mgmt(SELLER_PROJECT);
    let group = seller
        .post(&format!("{base}/api-groups"), json!({"name": "e2e_group"}))
        .await;
    expect_status("group", &group, 201);
    let gid = group.1["id"].as_str().unwrap().to_owned();
    let api = seller
        .post(
            &format!("{base}/apis"),
            json!({"group_id": gid, "name": "hello_api", "type": 1, "req_protocol": "HTTP",
                   "req_method": "GET", "req_uri": "/hello", "auth_type": "APP",
                   "backend_type": "MOCK", "mock_info": {"result_content": "mocked"}}),
        )
        .await;
    expect_status("api", &api, 201);
    let publish = seller
        .post(
            &format!("{base}/apis/action"),
            json!({"action": "online", "env_id": "DEFAULT_ENVIRONMENT_RELEASE_ID",
                   "api_id": api.1["id"]}),
        )
        .await;
    expect_status("publish", &publish, 201);
    let market = control.client(MARKET_TOKEN);
    let onsell = market
        .as_domain(SELLER_DOMAIN)
        .put(
            &format!("{}/api-groups/onsell/{gid}", market_base(SELLER_PROJECT)),
            json!({"url_domain": "shop.example.com"}),
        )
        .await;
    expect_status("onsell", &onsell, 201);
    let bought = market
        .as_domain(BUYER_DOMAIN)
        .post(
            &format!("{}/api-groups/purchase", market_base(BUYER_PROJECT)),
            json!({"order_id": "e2e-order", "group_id": gid, "start_time": "1700000000",
                   "expire_time": "4102444800", "req_quota": "2", "order_type": "1"}),
        )
        .await;
    expect_status("purchase", &bought, 201);
    let key = bought.1["app_key"].as_str().unwrap().to_owned();
    let secret = bought.1["app_secret"].as_str().unwrap().to_owned();

    let gateway = TestGateway::with(served(&control).await).await;
    let buyer = Buyer::new(gateway.buyers);
    let call = || {
        signed_as(
            &key,
            &secret,
            request("GET", "shop.example.com", "/hello", Bytes::new()),
        )
    };
    for n in 0..2 {
        let answer = buyer.send(call()).await;
        assert_eq!(answer.status, 200, "call {n}: {:?}", answer.body);
        assert_eq!(&answer.body[..], b"mocked");
    }
    let third = buyer.send(call()).await;
    assert_eq!(
        (third.status.as_u16(), third.code()),
        (405, "APIG.0501".to_owned()),
        "two calls bought"
    );

    let delist = market
        .as_domain(SELLER_DOMAIN)
        .delete(&format!(
            "{}/api-groups/delist/{gid}",
            market_base(SELLER_PROJECT)
        ))
        .await;
    expect_status("delist", &delist, 204);
    gateway
        .gateway
        .apply_snapshot(served(&control).await)
        .unwrap();
    let refused = buyer.send(call()).await;
    assert_eq!(
        (refused.status.as_u16(), refused.code()),
        (403, "APIG.0306".to_owned()),
        "delisted"
    );
}
