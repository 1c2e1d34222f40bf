//! Control plane over real sockets: management API, market API rows 1–12 with their status
//! tables and the §3.2 state machine, order_id idempotency under concurrency, snapshot build,
//! durability across restarts. Every scenario runs on SQLite and on PostgreSQL (when
//! reachable; otherwise the PostgreSQL half says it was skipped).

use serde_json::json;

use crate::support::control::*;

const RELEASE: &str = "DEFAULT_ENVIRONMENT_RELEASE_ID";

#[tokio::test]
async fn control_authentication_and_scoping() {
    for backend in Backend::all().await {
        let control = Control::start(&backend).await;
        let groups = format!("{}/api-groups", mgmt(SELLER_PROJECT));
        let anonymous = Api::new(control.addr, Auth::None);
        expect_error(
            "no credentials",
            &anonymous.get(&groups).await,
            401,
            "APIG.1002",
        );
        let wrong = control.client("nope");
        expect_error("unknown token", &wrong.get(&groups).await, 401, "APIG.1002");
        let bad_sk = control.signed_client(SELLER_AK, "wrong-secret");
        expect_error(
            "bad signature",
            &bad_sk.get(&groups).await,
            401,
            "APIG.1002",
        );
        let unknown_ak = control.signed_client("NOSUCHAK", SELLER_SK);
        expect_error(
            "unknown AK",
            &unknown_ak.get(&groups).await,
            401,
            "APIG.1002",
        );

        let signed = control.signed_client(SELLER_AK, SELLER_SK);
        let created = signed.post(&groups, json!({"name": "signed_group"})).await;
        expect_status("signed create", &created, 201);
        let listed = signed
            .get(&format!("{groups}?limit=10&name=signed&offset=0"))
            .await;
        expect_status("signed list with query", &listed, 200);
        assert_eq!(listed.1["total"], 1);

        let seller = control.client(SELLER_TOKEN);
        expect_error(
            "another project",
            &seller
                .get(&format!("{}/api-groups", mgmt(BUYER_PROJECT)))
                .await,
            403,
            "APIG.1005",
        );
        expect_error(
            "unknown instance",
            &seller
                .get(&format!(
                    "/v2/{SELLER_PROJECT}/apigw/instances/other/api-groups"
                ))
                .await,
            404,
            "APIG.3030",
        );
        // A buyer does not see the seller's group.
        let buyer = control.client(BUYER_TOKEN);
        let id = created.1["id"].as_str().unwrap();
        expect_error(
            "other tenant's group",
            &buyer
                .get(&format!("{}/api-groups/{id}", mgmt(BUYER_PROJECT)))
                .await,
            404,
            "APIG.3001",
        );
    }
}

#[tokio::test]
async fn control_management_groups_apis_publish() {
    for backend in Backend::all().await {
        let control = Control::start(&backend).await;
        let seller = control.client(SELLER_TOKEN);
        let base = mgmt(SELLER_PROJECT);
        let groups = format!("{base}/api-groups");

        expect_error(
            "short name",
            &seller.post(&groups, json!({"name": "ab"})).await,
            400,
            "APIG.2012",
        );
        expect_error(
            "no name",
            &seller.post(&groups, json!({})).await,
            400,
            "APIG.2012",
        );
        let not_json = seller.send("POST", &groups, None).await;
        expect_error("empty body", &not_json, 400, "APIG.2012");
        let g = seller
            .post(&groups, json!({"name": "market_group01", "remark": "demo"}))
            .await;
        expect_status("create group", &g, 201);
        assert_eq!(g.1["status"], 1);
        assert!(g.1["sl_domain"]
            .as_str()
            .unwrap()
            .ends_with(".apic.inst-1.marketgate.local"));
        let gid = g.1["id"].as_str().unwrap().to_owned();
        expect_error(
            "same name",
            &seller
                .post(&groups, json!({"name": "market_group01"}))
                .await,
            400,
            "APIG.3201",
        );
        for i in 0..3 {
            expect_status(
                "more groups",
                &seller
                    .post(&groups, json!({"name": format!("paged_{i}")}))
                    .await,
                201,
            );
        }
        let page = seller.get(&format!("{groups}?offset=1&limit=2")).await;
        expect_status("page", &page, 200);
        assert_eq!(
            (page.1["total"].as_u64(), page.1["size"].as_u64()),
            (Some(4), Some(2))
        );
        let precise = seller
            .get(&format!("{groups}?name=paged&precise_search=name"))
            .await;
        assert_eq!(
            precise.1["total"], 0,
            "precise search matches whole names only"
        );
        let fuzzy = seller.get(&format!("{groups}?name=paged")).await;
        assert_eq!(fuzzy.1["total"], 3);
        let updated = seller
            .put(
                &format!("{groups}/{gid}"),
                json!({"name": "market_group02"}),
            )
            .await;
        expect_status("update", &updated, 200);
        assert_eq!(updated.1["name"], "market_group02");
        expect_error(
            "missing group",
            &seller.get(&format!("{groups}/nope")).await,
            404,
            "APIG.3001",
        );

        let apis = format!("{base}/apis");
        let api = |name: &str, uri: &str| {
            json!({"group_id": gid, "name": name, "type": 1, "req_protocol": "HTTP",
                   "req_method": "GET", "req_uri": uri, "auth_type": "APP",
                   "backend_type": "HTTP",
                   "backend_api": {"url_domain": "10.0.0.1:8080", "req_protocol": "HTTP",
                                   "req_method": "GET", "req_uri": "/b/{id}", "timeout": 5000}})
        };
        let mut bad = api("bad_uri", "no-slash");
        expect_error(
            "bad req_uri",
            &seller.post(&apis, bad.clone()).await,
            400,
            "APIG.2012",
        );
        bad["req_uri"] = json!("/a/{rest+}/b");
        expect_error(
            "greedy not last",
            &seller.post(&apis, bad.clone()).await,
            400,
            "APIG.2012",
        );
        let mut function = api("func_api", "/f/{id}");
        function["backend_type"] = json!("FUNCTION");
        expect_error(
            "FUNCTION backend",
            &seller.post(&apis, function).await,
            400,
            "APIG.2012",
        );
        let mut https_backend = api("https_api", "/h/{id}");
        https_backend["backend_api"]["req_protocol"] = json!("HTTPS");
        expect_error(
            "HTTPS backend",
            &seller.post(&apis, https_backend).await,
            400,
            "APIG.2012",
        );
        let mut bad_host = api("host_api", "/h/{id}");
        bad_host["backend_api"]["url_domain"] = json!("user@host:80");
        expect_error(
            "bad backend host",
            &seller.post(&apis, bad_host).await,
            400,
            "APIG.2012",
        );
        let mut wrong_type = api("typed_api", "/t/{id}");
        wrong_type["type"] = json!(3);
        expect_error(
            "type 3",
            &seller.post(&apis, wrong_type).await,
            400,
            "APIG.2012",
        );
        let mut other_group = api("lost_api", "/l/{id}");
        other_group["group_id"] = json!("nope");
        expect_error(
            "unknown group",
            &seller.post(&apis, other_group).await,
            404,
            "APIG.3001",
        );

        let a = seller.post(&apis, api("user_api", "/users/{id}")).await;
        expect_status("create API", &a, 201);
        assert_eq!(a.1["match_mode"], "NORMAL");
        assert_eq!(a.1["auth_opt"]["app_code_auth_type"], "DISABLE");
        let aid = a.1["id"].as_str().unwrap().to_owned();
        expect_error(
            "same name",
            &seller.post(&apis, api("user_api", "/other/{id}")).await,
            400,
            "APIG.3202",
        );
        expect_error(
            "same method+uri",
            &seller.post(&apis, api("user_api2", "/users/{id}")).await,
            400,
            "APIG.3301",
        );
        let mock = seller
            .post(&apis, json!({"group_id": gid, "name": "mock_api", "type": 1, "req_protocol": "HTTPS",
                "req_method": "ANY", "req_uri": "/mock/{path+}", "match_mode": "SWA", "auth_type": "NONE",
                "backend_type": "MOCK", "mock_info": {"result_content": "hello"}}))
            .await;
        expect_status("create MOCK", &mock, 201);
        let mid = mock.1["id"].as_str().unwrap().to_owned();

        let listed = seller.get(&format!("{apis}?group_id={gid}")).await;
        assert_eq!(listed.1["total"], 2);
        expect_error(
            "bad action",
            &seller
                .post(
                    &format!("{base}/apis/action"),
                    json!({"action": "up", "env_id": RELEASE, "api_id": aid}),
                )
                .await,
            400,
            "APIG.2012",
        );
        expect_error(
            "unknown API",
            &seller
                .post(
                    &format!("{base}/apis/action"),
                    json!({"action": "online", "env_id": RELEASE, "api_id": "nope"}),
                )
                .await,
            404,
            "APIG.3002",
        );
        let published = seller
            .post(
                &format!("{base}/apis/action"),
                json!({"action": "online", "env_id": RELEASE, "api_id": aid}),
            )
            .await;
        expect_status("publish", &published, 201);
        assert!(!published.1["publish_id"].as_str().unwrap().is_empty());
        let batch = seller
            .post(
                &format!("{base}/apis/publish?action=online"),
                json!({"env_id": RELEASE, "apis": [mid, "nope"]}),
            )
            .await;
        expect_status("batch publish", &batch, 200);
        assert_eq!(batch.1["success"].as_array().unwrap().len(), 1);
        assert_eq!(batch.1["failure"][0]["error_code"], "APIG.3002");
        let in_release = seller.get(&format!("{apis}?env_id={RELEASE}")).await;
        assert_eq!(in_release.1["total"], 2);

        // The RELEASE copy is frozen: editing the draft does not change what is served.
        let mut edited = api("user_api", "/users/{id}");
        edited["backend_api"]["url_domain"] = json!("10.9.9.9:80");
        expect_status(
            "edit draft",
            &seller.put(&format!("{apis}/{aid}"), edited).await,
            200,
        );
        let snapshot = served(&control).await;
        let served = snapshot.groups.iter().find(|g| g.id == gid).unwrap();
        let served_api = served.apis.iter().find(|x| x.id == aid).unwrap();
        match &served_api.backend {
            marketgate::snapshot::Backend::Http { url_domain, .. } => {
                assert_eq!(url_domain, "10.0.0.1:8080")
            }
            other => panic!("{other:?}"),
        }
        let served_mock = served.apis.iter().find(|x| x.id == mid).unwrap();
        assert_eq!(
            served_mock.backend,
            marketgate::snapshot::Backend::Mock {
                status: 200,
                body: "hello".into()
            }
        );

        expect_error(
            "delete published API",
            &seller.delete(&format!("{apis}/{aid}")).await,
            403,
            "APIG.3416",
        );
        expect_error(
            "delete group with APIs",
            &seller.delete(&format!("{groups}/{gid}")).await,
            403,
            "APIG.3415",
        );
        let offline = seller
            .post(
                &format!("{base}/apis/publish?action=offline"),
                json!({"env_id": RELEASE, "group_id": gid}),
            )
            .await;
        expect_status("batch offline", &offline, 200);
        assert_eq!(offline.1["success"].as_array().unwrap().len(), 2);
        expect_status(
            "delete API",
            &seller.delete(&format!("{apis}/{aid}")).await,
            204,
        );
        expect_status(
            "delete mock",
            &seller.delete(&format!("{apis}/{mid}")).await,
            204,
        );
        expect_error(
            "deleted API",
            &seller.get(&format!("{apis}/{aid}")).await,
            404,
            "APIG.3002",
        );
        expect_status(
            "delete group",
            &seller.delete(&format!("{groups}/{gid}")).await,
            204,
        );

        let envs = seller.get(&format!("{base}/envs")).await;
        assert_eq!(envs.1["envs"][0]["id"], RELEASE);
        assert_eq!(envs.1["envs"][0]["name"], "RELEASE");
    }
}

#[tokio::test]
async fn control_management_apps_codes_auths() {
    for backend in Backend::all().await {
        let control = Control::start(&backend).await;
        let seller = control.client(SELLER_TOKEN);
        let base = mgmt(SELLER_PROJECT);
        let (_gid, api_id) = sellable_group(&seller, "apps_group").await;
        let apps = format!("{base}/apps");
        expect_error(
            "bad app name",
            &seller.post(&apps, json!({"name": "1x"})).await,
            400,
            "APIG.2012",
        );
        let app = seller.post(&apps, json!({"name": "app_one"})).await;
        expect_status("create app", &app, 201);
        assert_eq!(app.1["app_key"].as_str().unwrap().len(), 32);
        assert_eq!(app.1["creator"], "USER");
        let app_id = app.1["id"].as_str().unwrap().to_owned();
        expect_error(
            "same app name",
            &seller.post(&apps, json!({"name": "app_one"})).await,
            400,
            "APIG.3203",
        );
        let given = seller.post(&apps, json!({"name": "app_two", "app_key": "my_key_0001", "app_secret": "my_secret_0001"})).await;
        expect_status("given key", &given, 201);
        assert_eq!(given.1["app_key"], "my_key_0001");
        expect_error(
            "same key",
            &seller
                .post(
                    &apps,
                    json!({"name": "app_three", "app_key": "my_key_0001"}),
                )
                .await,
            400,
            "APIG.3310",
        );
        let old_secret = app.1["app_secret"].as_str().unwrap().to_owned();
        let reset = seller
            .send("PUT", &format!("{apps}/secret/{app_id}"), None)
            .await;
        expect_status("reset secret", &reset, 200);
        assert_ne!(reset.1["app_secret"].as_str().unwrap(), old_secret);

        let codes = format!("{apps}/{app_id}/app-codes");
        expect_error(
            "short code",
            &seller.post(&codes, json!({"app_code": "short"})).await,
            400,
            "APIG.2012",
        );
        let given_code = "A".repeat(64);
        expect_status(
            "given code",
            &seller.post(&codes, json!({"app_code": given_code})).await,
            201,
        );
        let mut last = None;
        for _ in 0..4 {
            let code = seller.send("PUT", &codes, None).await;
            expect_status("generated code", &code, 201);
            assert!(code.1["app_code"].as_str().unwrap().len() >= 64);
            last = Some(code.1["id"].as_str().unwrap().to_owned());
        }
        expect_error(
            "sixth code",
            &seller.send("PUT", &codes, None).await,
            400,
            "APIG.2012",
        );
        let listed = seller.get(&codes).await;
        assert_eq!(
            (listed.1["total"].as_u64(), listed.1["size"].as_u64()),
            (Some(5), Some(5))
        );
        expect_status(
            "delete code",
            &seller.delete(&format!("{codes}/{}", last.unwrap())).await,
            204,
        );
        expect_error(
            "missing code",
            &seller.delete(&format!("{codes}/nope")).await,
            404,
            "APIG.3004",
        );

        let auths = format!("{base}/app-auths");
        expect_error(
            "unknown app",
            &seller
                .post(
                    &auths,
                    json!({"env_id": RELEASE, "app_ids": ["nope"], "api_ids": [api_id]}),
                )
                .await,
            404,
            "APIG.3004",
        );
        expect_error(
            "unknown api",
            &seller
                .post(
                    &auths,
                    json!({"env_id": RELEASE, "app_ids": [app_id], "api_ids": ["nope"]}),
                )
                .await,
            404,
            "APIG.3002",
        );
        let auth = seller
            .post(
                &auths,
                json!({"env_id": RELEASE, "app_ids": [app_id], "api_ids": [api_id]}),
            )
            .await;
        expect_status("authorize", &auth, 201);
        assert_eq!(auth.1["auths"][0]["auth_result"]["status"], "SUCCESS");
        let auth_id = auth.1["auths"][0]["id"].as_str().unwrap().to_owned();
        expect_error(
            "again",
            &seller
                .post(
                    &auths,
                    json!({"env_id": RELEASE, "app_ids": [app_id], "api_ids": [api_id]}),
                )
                .await,
            400,
            "APIG.3316",
        );
        let bound = seller
            .get(&format!("{auths}/binded-apps?api_id={api_id}"))
            .await;
        assert_eq!(bound.1["total"], 1);
        assert_eq!(bound.1["auths"][0]["app_name"], "app_one");

        let snapshot = served(&control).await;
        assert!(snapshot
            .app_auths
            .iter()
            .any(|a| a.app_id == app_id && a.api_id == api_id));
        let served_app = snapshot
            .apps
            .iter()
            .find(|a| a.id == app_id)
            .expect("authorized app is served");
        assert_eq!(served_app.app_codes.len(), 4);
        assert!(
            !snapshot.apps.iter().any(|a| a.app_key == "my_key_0001"),
            "unauthorized USER apps stay out"
        );

        expect_status(
            "cancel",
            &seller.delete(&format!("{auths}/{auth_id}")).await,
            204,
        );
        expect_error(
            "cancel again",
            &seller.delete(&format!("{auths}/{auth_id}")).await,
            404,
            "APIG.3009",
        );
        expect_status(
            "delete app",
            &seller.delete(&format!("{apps}/{app_id}")).await,
            204,
        );
        expect_error(
            "deleted app",
            &seller.get(&format!("{apps}/{app_id}")).await,
            404,
            "APIG.3004",
        );
    }
}

/// Issue 12 item 4: a refused value's message states the rule (length and characters,
/// allowed values, epoch seconds and the order of times), and an `order_id` replayed with
/// other content says what differs. Messages do not depend on the store: SQLite only.
#[tokio::test]
async fn refusals_state_the_rule_they_apply() {
    let control = Control::start(&Backend::Sqlite).await;
    let seller = control.client(SELLER_TOKEN);
    let groups = format!("{}/api-groups", mgmt(SELLER_PROJECT));
    expect_rule(
        "group name too short",
        &seller.post(&groups, json!({"name": "ab"})).await,
        "name",
        "name must be 3 to 255 characters of letters, digits, Chinese characters and \
         - _ . / ( ) : 、, starting with a letter, a digit or a Chinese character (got 2)",
    );
    expect_rule(
        "group name with a space",
        &seller.post(&groups, json!({"name": "my group"})).await,
        "name",
        "(' ' is not allowed)",
    );
    let apps = format!("{}/apps", mgmt(SELLER_PROJECT));
    expect_rule(
        "app name too long",
        &seller.post(&apps, json!({"name": "a".repeat(65)})).await,
        "name",
        "must be 3 to 64 characters of letters, digits, _ and Chinese characters, starting \
         with a letter or a Chinese character (got 65)",
    );
    let (gid, _) = sellable_group(&seller, "ruled_group").await;
    let api = json!({"group_id": gid, "name": "ruled_api", "type": 1, "req_protocol": "HTTP",
                     "req_method": "FETCH", "req_uri": "/r", "auth_type": "APP",
                     "backend_type": "MOCK"});
    expect_rule(
        "unknown method",
        &seller
            .post(&format!("{}/apis", mgmt(SELLER_PROJECT)), api)
            .await,
        "req_method",
        "must be one of GET, POST, PUT, DELETE, HEAD, PATCH, OPTIONS, ANY (got \"FETCH\")",
    );

    let market = control.client(MARKET_TOKEN);
    let sm = market.as_domain(SELLER_DOMAIN);
    let bm = market.as_domain(BUYER_DOMAIN);
    let sbase = market_base(SELLER_PROJECT);
    expect_rule(
        "lock status",
        &sm.put(
            &format!("{sbase}/api-groups/status/{gid}"),
            json!({"status": 7}),
        )
        .await,
        "status",
        "must be one of 3 (lock), 2 (unlock) (got 7)",
    );
    let listed = sm
        .put(
            &format!("{sbase}/api-groups/onsell/{gid}"),
            json!({"url_domain": "ruled.example.com"}),
        )
        .await;
    expect_status("onsell", &listed, 201);
    let purchase = format!("{}/api-groups/purchase", market_base(BUYER_PROJECT));
    let buy = json!({"order_id": "ruled-order", "group_id": gid, "start_time": "1700000000",
                     "expire_time": "4102444800", "req_quota": "100", "order_type": "1"});
    let mut iso = buy.clone();
    iso["start_time"] = json!("2026-01-01T00:00:00Z");
    expect_rule(
        "ISO start_time",
        &bm.post(&purchase, iso).await,
        "start_time",
        "must be a time in epoch seconds",
    );
    let mut backwards = buy.clone();
    backwards["expire_time"] = json!(1600000000);
    expect_rule(
        "expire before start",
        &bm.post(&purchase, backwards).await,
        "expire_time",
        "expire_time must be after start_time",
    );
    let mut order_type = buy.clone();
    order_type["order_type"] = json!(4);
    expect_rule(
        "order_type",
        &bm.post(&purchase, order_type).await,
        "order_type",
        "must be one of 1 (prepaid package), 2 (postpaid period), 3 (postpaid on-demand) (got 4)",
    );
    let bought = bm.post(&purchase, buy.clone()).await;
    expect_status("purchase", &bought, 201);
    assert_eq!(
        bm.post(&purchase, buy.clone()).await,
        bought,
        "the same order_id with the same content answers the same purchase"
    );
    let mut more = buy.clone();
    more["req_quota"] = json!(200);
    let replay = bm.post(&purchase, more).await;
    expect_error("order_id with another req_quota", &replay, 409, "APIG.2000");
    let msg = replay.1["error_msg"].as_str().unwrap();
    assert!(
        msg.contains("order_id ruled-order was already bought")
            && msg.contains("req_quota 100 (this request: 200)"),
        "{msg}"
    );
    let view = bm
        .get(&format!(
            "{}/purchases/{}",
            market_base(BUYER_PROJECT),
            bought.1["purchase_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(
        view.1["quota_limit"], 100,
        "the refused replay changed nothing"
    );
}

/// A record only the proxies' snapshot validator refuses is a 400 naming it, never a stored
/// row that makes every later push fail. The case: a market domain of 254 characters (labels
/// of at most 63), which the market API's own `url_domain` rule admits (255) and the
/// proxies' host-name rule does not (253).
#[tokio::test]
async fn a_write_the_proxies_would_refuse_is_a_400_naming_the_record_and_is_not_stored() {
    let control = Control::start(&Backend::Sqlite).await;
    let seller = control.client(SELLER_TOKEN);
    let (gid, _) = sellable_group(&seller, "unpublishable").await;
    let before = served(&control).await;
    let sm = control.client(MARKET_TOKEN).as_domain(SELLER_DOMAIN);
    let onsell = format!("{}/api-groups/onsell/{gid}", market_base(SELLER_PROJECT));
    let too_long = format!(
        "{}.{}.{}.{}.com",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(58)
    );
    assert_eq!(too_long.len(), 254);
    let refused = sm.put(&onsell, json!({ "url_domain": too_long })).await;
    expect_error("a 254-character url_domain", &refused, 400, "APIG.2012");
    let msg = refused.1["error_msg"].as_str().unwrap();
    assert!(
        msg.contains(&format!("group {gid}: url_domain"))
            && msg.contains("not a lower-case host name"),
        "names the record and the rule: {msg}"
    );
    let after = served(&control).await;
    assert_eq!(after.version, before.version, "nothing was committed");
    let group = after.groups.iter().find(|g| g.id == gid).unwrap();
    assert_eq!(group.url_domain, None);
    let shown = seller
        .get(&format!("{}/api-groups/{gid}", mgmt(SELLER_PROJECT)))
        .await;
    assert_eq!(shown.1["market_state"], "unlisted", "{}", shown.1);
    let fits = &too_long[1..];
    let listed = sm.put(&onsell, json!({ "url_domain": fits })).await;
    expect_status("a 253-character url_domain", &listed, 201);
    assert_eq!(served(&control).await.version, before.version + 1);
}

#[tokio::test]
async fn control_market_rows_follow_the_seeds_and_the_state_machine() {
    for backend in Backend::all().await {
        let control = Control::start(&backend).await;
        let seller = control.client(SELLER_TOKEN);
        let market = control.client(MARKET_TOKEN);
        let (gid, _) = sellable_group(&seller, "sold_group").await;
        let sm = market.as_domain(SELLER_DOMAIN);
        let bm = market.as_domain(BUYER_DOMAIN);
        let sbase = market_base(SELLER_PROJECT);
        let bbase = market_base(BUYER_PROJECT);
        let onsell = format!("{sbase}/api-groups/onsell/{gid}");

        // Seed 003 reserve: 409 while not on sale.
        expect_error(
            "reserve unlisted",
            &bm.post(
                &format!("{bbase}/api-groups/reserve"),
                json!({"group_id": gid}),
            )
            .await,
            409,
            "APIG.3016",
        );
        // Row 7: lock / unlock.
        let lock = format!("{sbase}/api-groups/status/{gid}");
        let locked = sm.put(&lock, json!({"status": 3})).await;
        expect_status("lock", &locked, 201);
        assert_eq!(locked.1["status"], 3);
        expect_status("unlock", &sm.put(&lock, json!({"status": 2})).await, 201);
        expect_error(
            "bad status",
            &sm.put(&lock, json!({"status": 7})).await,
            400,
            "APIG.2012",
        );

        // Seed 002 onsell.
        expect_error(
            "no X-Domain-Id",
            &market
                .put(&onsell, json!({"url_domain": "api.market.example.com"}))
                .await,
            400,
            "APIG.2000",
        );
        expect_error(
            "not owner",
            &bm.put(&onsell, json!({"url_domain": "api.market.example.com"}))
                .await,
            403,
            "APIG.1005",
        );
        expect_error(
            "missing group",
            &sm.put(
                &format!("{sbase}/api-groups/onsell/nope"),
                json!({"url_domain": "x.example.com"}),
            )
            .await,
            404,
            "APIG.3001",
        );
        expect_error(
            "bad domain",
            &sm.put(&onsell, json!({"url_domain": "not a domain"})).await,
            400,
            "APIG.2012",
        );
        expect_error(
            "unauthenticated",
            &Api::new(control.addr, Auth::None)
                .as_domain(SELLER_DOMAIN)
                .put(&onsell, json!({"url_domain": "api.market.example.com"}))
                .await,
            401,
            "APIG.1002",
        );
        expect_error(
            "unknown instance",
            &sm.put(
                &format!("/v1/{SELLER_PROJECT}/apigw/instances/zzz/market/api-groups/onsell/{gid}"),
                json!({"url_domain": "api.market.example.com"}),
            )
            .await,
            404,
            "APIG.3030",
        );
        let (empty_gid, _) = {
            let g = seller
                .post(
                    &format!("{}/api-groups", mgmt(SELLER_PROJECT)),
                    json!({"name": "empty_group"}),
                )
                .await;
            (g.1["id"].as_str().unwrap().to_owned(), ())
        };
        expect_error(
            "no sellable API",
            &sm.put(
                &format!("{sbase}/api-groups/onsell/{empty_gid}"),
                json!({"url_domain": "empty.example.com"}),
            )
            .await,
            400,
            "APIG.3403",
        );
        let listed = sm
            .put(&onsell, json!({"url_domain": "api.market.example.com"}))
            .await;
        expect_status("onsell", &listed, 201);
        assert_eq!(listed.1["url_domain"], "api.market.example.com");
        assert_eq!(listed.1["id"], gid.as_str());
        let (other_gid, _) = sellable_group(&seller, "other_group").await;
        expect_error(
            "url_domain taken",
            &sm.put(
                &format!("{sbase}/api-groups/onsell/{other_gid}"),
                json!({"url_domain": "api.market.example.com"}),
            )
            .await,
            400,
            "APIG.3305",
        );
        expect_error(
            "lock while on sale",
            &sm.put(&lock, json!({"status": 3})).await,
            409,
            "APIG.2000",
        );

        // Rows 8 and 9.
        let onsale = sm.get(&format!("{sbase}/api-groups/onsell")).await;
        assert_eq!(onsale.1["total"], 1);
        let tosell = sm
            .get(&format!("{sbase}/api-groups/tosell?page_size=10&page_no=1"))
            .await;
        assert_eq!(
            tosell.1["total"], 1,
            "other_group could be listed: {}",
            tosell.1
        );

        // Seed 003 reserve and row 5 purchase.
        expect_error(
            "reserve own group",
            &sm.post(
                &format!("{sbase}/api-groups/reserve"),
                json!({"group_id": gid}),
            )
            .await,
            403,
            "APIG.3406",
        );
        expect_error(
            "reserve without domain",
            &market
                .post(
                    &format!("{bbase}/api-groups/reserve"),
                    json!({"group_id": gid}),
                )
                .await,
            400,
            "APIG.2000",
        );
        expect_error(
            "reserve missing group",
            &bm.post(
                &format!("{bbase}/api-groups/reserve"),
                json!({"group_id": "nope"}),
            )
            .await,
            400,
            "APIG.3001",
        );
        let reserved = bm
            .post(
                &format!("{bbase}/api-groups/reserve"),
                json!({"group_id": gid}),
            )
            .await;
        expect_status("reserve", &reserved, 201);
        let pid = reserved.1["purchase_id"].as_str().unwrap().to_owned();
        let buy = json!({"order_id": "order-1", "group_id": gid, "start_time": "1700000000",
                         "expire_time": "4102444800", "req_quota": "100", "order_type": "1",
                         "purchase_id": pid});
        let purchase_path = format!("{bbase}/api-groups/purchase");
        let mut bad = buy.clone();
        bad["order_type"] = json!("9");
        expect_error(
            "bad order_type",
            &bm.post(&purchase_path, bad).await,
            400,
            "APIG.2012",
        );
        let bought = bm.post(&purchase_path, buy.clone()).await;
        expect_status("purchase", &bought, 201);
        assert_eq!(bought.1["purchase_id"], pid.as_str());
        assert_eq!(bought.1["start_time"], "2023-11-14T22:13:20Z");
        assert_eq!(bought.1["req_quota"], 100);
        let app_key = bought.1["app_key"].as_str().unwrap().to_owned();
        assert!(!bought.1["app_secret"].as_str().unwrap().is_empty());
        let again = bm.post(&purchase_path, buy.clone()).await;
        assert_eq!(again, bought, "the same order_id answers the same purchase");

        let snapshot = served(&control).await;
        let served_purchase = snapshot.purchases.iter().find(|p| p.id == pid).unwrap();
        assert_eq!(
            (served_purchase.quota_limit, served_purchase.state),
            (Some(100), marketgate::snapshot::PurchaseState::Active)
        );
        let app = snapshot
            .apps
            .iter()
            .find(|a| a.id == served_purchase.app_id)
            .unwrap();
        assert_eq!(app.app_key, app_key);
        assert_eq!(app.creator, "MARKET");
        assert!(app.app_codes[0].len() >= 64);

        // Row 12 buyer views, with usage.
        control.cp.record_usage(&pid, 30).await.unwrap();
        let view = bm.get(&format!("{bbase}/purchases/{pid}")).await;
        expect_status("buyer view", &view, 200);
        assert_eq!(
            (view.1["quota_used"].as_u64(), view.1["quota_left"].as_u64()),
            (Some(30), Some(70))
        );
        assert_eq!(view.1["url_domain"], "api.market.example.com");
        assert_eq!(view.1["app_key"], app_key.as_str());
        let buyer = control.client(BUYER_TOKEN);
        let mine = buyer.get(&format!("{bbase}/purchases")).await;
        assert_eq!(mine.1["total"], 1);
        expect_error(
            "seller cannot see",
            &sm.get(&format!("{bbase}/purchases/{pid}")).await,
            403,
            "APIG.1005",
        );

        // Row 6: unused.
        let status_path = format!("{bbase}/api-groups/status");
        let frozen = bm
            .post(
                &status_path,
                json!({"group_id": gid, "project_id": BUYER_PROJECT, "unused": 0}),
            )
            .await;
        expect_status("freeze by unused", &frozen, 200);
        assert_eq!(frozen.1["state"], "frozen");
        let thawed = bm
            .post(&status_path, json!({"purchase_id": pid, "unused": "50"}))
            .await;
        expect_status("unfreeze by unused", &thawed, 200);
        assert_eq!(
            (
                thawed.1["state"].as_str(),
                thawed.1["quota_left"].as_u64(),
                thawed.1["quota_limit"].as_u64()
            ),
            (Some("active"), Some(50), Some(80))
        );

        // Row 10: freeze / unfreeze by list.
        let project = format!("{bbase}/project");
        let res = market
            .put(
                &project,
                json!({"status": 3, "purchase_ids": [pid, "nope"]}),
            )
            .await;
        expect_status("freeze list", &res, 200);
        assert_eq!(res.1["results"][0]["result"], "success");
        assert_eq!(res.1["results"][1]["result"], "failed");
        assert_eq!(
            control
                .cp
                .snapshot()
                .await
                .purchases
                .iter()
                .find(|p| p.id == pid)
                .unwrap()
                .state,
            marketgate::snapshot::PurchaseState::Frozen
        );
        let res = market
            .put(&project, json!({"status": 1, "purchase_ids": [pid]}))
            .await;
        assert_eq!(res.1["results"][0]["state"], "active");

        // Seed 001 off-sell: buyers keep calling, no new purchases; listed again works.
        expect_error(
            "offsell not owner",
            &bm.delete(&onsell).await,
            403,
            "APIG.1005",
        );
        expect_status("offsell", &sm.delete(&onsell).await, 204);
        expect_error("offsell again", &sm.delete(&onsell).await, 404, "APIG.3016");
        let mut second = buy.clone();
        second["order_id"] = json!("order-2");
        second.as_object_mut().unwrap().remove("purchase_id");
        expect_error(
            "buy off sale",
            &bm.post(&purchase_path, second.clone()).await,
            409,
            "APIG.3016",
        );
        expect_status(
            "unused off sale",
            &bm.post(&status_path, json!({"purchase_id": pid, "unused": 10}))
                .await,
            200,
        );
        expect_status(
            "list again",
            &sm.put(&onsell, json!({"url_domain": "api.market.example.com"}))
                .await,
            201,
        );
        let second_bought = bm.post(&purchase_path, second).await;
        expect_status("buy without reservation", &second_bought, 201);
        let second_pid = second_bought.1["purchase_id"].as_str().unwrap().to_owned();

        // Row 11.
        expect_status(
            "unsubscribe",
            &bm.delete(&format!("{bbase}/unsubscribe/{second_pid}"))
                .await,
            204,
        );
        expect_error(
            "unsubscribe unknown",
            &bm.delete(&format!("{bbase}/unsubscribe/nope")).await,
            404,
            "APIG.3016",
        );
        let view = bm.get(&format!("{bbase}/purchases/{second_pid}")).await;
        assert_eq!(view.1["state"], "unsubscribed");

        // Seed 000 delist: final, buyers frozen, purchases kept.
        expect_error(
            "delist never listed",
            &sm.delete(&format!("{sbase}/api-groups/delist/{other_gid}"))
                .await,
            400,
            "APIG.3016",
        );
        expect_error(
            "delist missing group",
            &sm.delete(&format!("{sbase}/api-groups/delist/nope")).await,
            400,
            "APIG.3001",
        );
        expect_error(
            "delist not owner",
            &bm.delete(&format!("{sbase}/api-groups/delist/{gid}")).await,
            403,
            "APIG.1005",
        );
        expect_status(
            "delist",
            &sm.delete(&format!("{sbase}/api-groups/delist/{gid}")).await,
            204,
        );
        expect_status(
            "delist again",
            &sm.delete(&format!("{sbase}/api-groups/delist/{gid}")).await,
            204,
        );
        expect_error(
            "onsell delisted",
            &sm.put(&onsell, json!({"url_domain": "api.market.example.com"}))
                .await,
            400,
            "APIG.3420",
        );
        expect_error(
            "reserve delisted",
            &bm.post(
                &format!("{bbase}/api-groups/reserve"),
                json!({"group_id": gid}),
            )
            .await,
            409,
            "APIG.3016",
        );
        let snapshot = served(&control).await;
        let group = snapshot.groups.iter().find(|g| g.id == gid).unwrap();
        assert_eq!(
            group.market_state,
            marketgate::snapshot::MarketState::Delisted
        );
        assert_eq!(
            snapshot
                .purchases
                .iter()
                .find(|p| p.id == pid)
                .unwrap()
                .state,
            marketgate::snapshot::PurchaseState::Frozen
        );
        // The owner still has the group and its API.
        expect_status(
            "owner still sees group",
            &seller
                .get(&format!("{}/api-groups/{gid}", mgmt(SELLER_PROJECT)))
                .await,
            200,
        );
    }
}

#[tokio::test]
async fn control_purchase_is_idempotent_under_50_concurrent_duplicates() {
    for backend in Backend::all().await {
        let control = Control::start(&backend).await;
        let seller = control.client(SELLER_TOKEN);
        let (gid, _) = sellable_group(&seller, "busy_group").await;
        let market = control.client(MARKET_TOKEN);
        expect_status(
            "onsell",
            &market
                .as_domain(SELLER_DOMAIN)
                .put(
                    &format!("{}/api-groups/onsell/{gid}", market_base(SELLER_PROJECT)),
                    json!({"url_domain": "busy.example.com"}),
                )
                .await,
            201,
        );
        let bm = market.as_domain(BUYER_DOMAIN);
        let path = format!("{}/api-groups/purchase", market_base(BUYER_PROJECT));
        let body = json!({"order_id": "dup-order", "group_id": gid, "start_time": "1700000000",
                          "expire_time": "4102444800", "req_quota": "10", "order_type": "1"});
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (bm, path, body) = (bm.clone(), path.clone(), body.clone());
                tokio::spawn(async move { bm.post(&path, body).await })
            })
            .collect();
        let mut answers = Vec::new();
        for task in tasks {
            answers.push(task.await.unwrap());
        }
        assert!(answers.iter().all(|a| a.0 == 201), "{answers:?}");
        assert!(
            answers.iter().all(|a| a == &answers[0]),
            "one answer for one order"
        );
        let snapshot = served(&control).await;
        assert_eq!(snapshot.purchases.len(), 1, "one purchase");
        assert_eq!(snapshot.apps.len(), 1, "one MARKET app");
    }
}

#[tokio::test]
async fn control_snapshot_version_grows_and_survives_restart() {
    for backend in Backend::all().await {
        let control = Control::start(&backend).await;
        let mut versions = control.cp.subscribe();
        let v0 = served(&control).await.version;
        let seller = control.client(SELLER_TOKEN);
        let (gid, api_id) = sellable_group(&seller, "durable_group").await;
        versions.changed().await.unwrap();
        let v1 = served(&control).await.version;
        assert!(v1 > v0 && *versions.borrow() == v1, "{v0} -> {v1}");
        let control = control.restart().await;
        let after = served(&control).await;
        assert_eq!(after.version, v1, "the version is stored");
        let group = after
            .groups
            .iter()
            .find(|g| g.id == gid)
            .expect("group survives restart");
        assert!(
            group.apis.iter().any(|a| a.id == api_id),
            "publication survives restart"
        );
        let seller = control.client(SELLER_TOKEN);
        expect_status(
            "write after restart",
            &seller
                .post(
                    &format!("{}/api-groups", mgmt(SELLER_PROJECT)),
                    json!({"name": "after_restart"}),
                )
                .await,
            201,
        );
        assert!(
            served(&control).await.version > v1,
            "the version only grows"
        );
    }
}

#[tokio::test]
async fn control_every_market_row_refuses_the_unauthenticated() {
    let control = Control::start(&Backend::Sqlite).await;
    let anonymous = Api::new(control.addr, Auth::None).as_domain(SELLER_DOMAIN);
    let base = market_base(SELLER_PROJECT);
    let rows = [
        ("PUT", "api-groups/onsell/g"),
        ("DELETE", "api-groups/onsell/g"),
        ("DELETE", "api-groups/delist/g"),
        ("POST", "api-groups/reserve"),
        ("POST", "api-groups/purchase"),
        ("POST", "api-groups/status"),
        ("PUT", "api-groups/status/g"),
        ("GET", "api-groups/tosell"),
        ("GET", "api-groups/onsell"),
        ("PUT", "project"),
        ("DELETE", "unsubscribe/p"),
        ("GET", "purchases"),
        ("GET", "purchases/p"),
    ];
    for (method, path) in rows {
        let answer = anonymous
            .send(method, &format!("{base}/{path}"), Some(json!({})))
            .await;
        expect_error(&format!("{method} {path}"), &answer, 401, "APIG.1002");
    }
    // And an authenticated call to a route that does not exist is a JSON 404.
    let market = control.client(MARKET_TOKEN);
    expect_error(
        "no route",
        &market.get(&format!("{base}/nowhere")).await,
        404,
        "APIG.0101",
    );
}
