"""No secret in any log line or error body (issue 6), and the access-log fields that
docs/operations.md promises.

Runs a full market scenario against the real `marketgate serve` binary with JSON logs at
debug level and per-run random secrets: a seller builds and publishes a group (token and
AK/SK-signed calls), the market lists it and sells it, the buyer finds its AppCode, and the
buyer calls through the gateway: signed, with the AppCode, and failing ones (bad signature,
unknown AppKey, bad AppCode, calls used up, backend down). Wrong tokens, a bad control-API
signature and a wrong admin token are tried too. Then it greps every line the process printed
and every error body it answered for every secret used, and finds none. The seller's TLS
private keys are secrets too: it binds a domain, creates a certificate, attaches it, rotates
it to a new key, binds one inline, and has one refused for a key that does not match; a line
of each key's base64 is grepped for (a JSON log escapes a PEM's newlines).
"""

import secrets
import time

import pytest
from huaweicloudsdkcore.sdk_request import SdkRequest
from huaweicloudsdkcore.signer.signer import Signer

from certificates import made
from marketgate_process import Serve, free_ports, request

INSTANCE = "default"
MARKET_DOMAIN = "secrets.market.test"
SELLER_AK = "SECRETSSELLERAK0001"
RELEASE = "DEFAULT_ENVIRONMENT_RELEASE_ID"


def rand(prefix):
    return f"{prefix}-{secrets.token_hex(12)}"


class Credentials:
    def __init__(self, ak, sk):
        self.ak = ak
        self.sk = sk


def sign(ak, sk, method, host, path, body=b""):
    """(uri, headers) of a request signed SDK-HMAC-SHA256 by Huawei's own signer."""
    req = SdkRequest(
        method=method,
        schema="http",
        host=host,
        resource_path=path,
        query_params=[],
        header_params={"Content-Type": "application/json"},
        body=body,
    )
    signed = Signer(Credentials(ak, sk)).sign(req)
    return signed.uri, dict(signed.header_params)


def flip_signature(headers):
    out = dict(headers)
    auth = out["Authorization"]
    last = auth[-1]
    out["Authorization"] = auth[:-1] + ("0" if last != "0" else "1")
    return out


class Run:
    """The scenario's state: what was sent that must never come back in a log or error."""

    def __init__(self):
        self.secrets = {}
        self.error_bodies = []
        self.admin_token = self.secret("admin token", rand("admin"))
        self.market_token = self.secret("market token", rand("market"))
        self.seller_token = self.secret("seller token", rand("seller"))
        self.buyer_token = self.secret("buyer token", rand("buyer"))
        self.seller_sk = self.secret("seller secret key", rand("sk"))

    def secret(self, what, value):
        assert len(value) >= 8, what
        self.secrets[what] = value
        return value

    def call(self, port, method, path, body=None, headers=None, expect=None):
        status, response_headers, data = request(port, method, path, body, headers)
        if status >= 400:
            self.error_bodies.append((method, path, status, data.decode("utf-8", "replace")))
        if expect is not None:
            assert status == expect, (method, path, status, data)
        return status, response_headers, data


CONFIG = """instance_id = "default"
data_dir = "{{data_dir}}"
[gateway]
listen = "{{gateway}}"
appcode_over_http = true
[control]
listen = "{{control}}"
[[control.tokens]]
token = "{market}"
domain_id = "market"
project_id = "market"
role = "market"
[[control.tokens]]
token = "{seller}"
domain_id = "seller-domain"
project_id = "seller-project"
role = "tenant"
[[control.tokens]]
token = "{buyer}"
domain_id = "buyer-domain"
project_id = "buyer-project"
role = "tenant"
[[control.credentials]]
access_key = "{ak}"
secret_key = "{sk}"
domain_id = "seller-domain"
project_id = "seller-project"
role = "tenant"
[admin]
listen = "{{admin}}"
token = "{admin}"
[proxy]
node_id = "secrets-node"
[log]
format = "json"
level = "debug"
"""


@pytest.fixture(scope="module")
def scenario():
    run = Run()
    serve = Serve(
        CONFIG.format(
            market=run.market_token,
            seller=run.seller_token,
            buyer=run.buyer_token,
            ak=SELLER_AK,
            sk=run.seller_sk,
            admin=run.admin_token,
        )
    )
    try:
        play(run, serve)
    finally:
        status = serve.stop()
    run.exit_status = status
    run.lines = serve.lines
    run.records = serve.log_records()
    return run


def play(run, serve):
    c = serve.control_port
    g = serve.gateway_port
    seller = {"X-Auth-Token": run.seller_token}
    market = {"X-Auth-Token": run.market_token}
    buyer = {"X-Auth-Token": run.buyer_token}
    v2 = f"/v2/seller-project/apigw/instances/{INSTANCE}"
    mk = f"/v1/seller-project/apigw/instances/{INSTANCE}/market"
    buyer_mk = f"/v1/buyer-project/apigw/instances/{INSTANCE}/market"
    buyer_v2 = f"/v2/buyer-project/apigw/instances/{INSTANCE}"

    # The seller: a group with a MOCK API (AppCode enabled) and an API whose backend is down.
    _, _, body = run.call(c, "POST", f"{v2}/api-groups", {"name": "secrets_group"}, seller, 201)
    group = json_of(body)["id"]
    dead = free_ports(1)[0]
    apis = []
    for name, uri, backend in [
        ("secrets_mock", "/today", {"backend_type": "MOCK", "mock_info": {"result_content": "sunny"}}),
        ("secrets_dead", "/dead", {"backend_type": "HTTP", "backend_api": {
            "req_protocol": "HTTP", "req_method": "GET", "req_uri": "/dead",
            "url_domain": f"127.0.0.1:{dead}", "timeout": 2000}}),
    ]:
        api = {"name": name, "group_id": group, "type": 1, "req_protocol": "HTTP", "req_method": "GET",
               "req_uri": uri, "auth_type": "APP", "auth_opt": {"app_code_auth_type": "HEADER"}} | backend
        _, _, body = run.call(c, "POST", f"{v2}/apis", api, seller, 201)
        api_id = json_of(body)["id"]
        apis.append(api_id)
        run.call(c, "POST", f"{v2}/apis/action",
                 {"action": "online", "api_id": api_id, "env_id": RELEASE}, seller, 201)

    # The seller's domain and TLS keys: created, attached, rotated, bound inline, one refused.
    domain = "api.secrets-seller.test"
    _, _, body = run.call(c, "POST", f"{v2}/api-groups/{group}/domains", {"url_domain": domain}, seller, 201)
    domain_id = json_of(body)["id"]
    certs = "/v2/seller-project/apigw/certificates"
    first, rotated, inline, stranger = (made([domain]) for _ in range(4))
    for what, cert in [("first", first), ("rotated", rotated), ("inline", inline), ("stranger", stranger)]:
        run.secret(f"TLS private key, {what}", cert.key_needle())
    form = lambda cert, key=None: {"name": "secrets_cert", "cert_content": cert.cert_pem,
                                   "private_key": key or cert.key_pem}
    _, _, body = run.call(c, "POST", certs, form(first), seller, 201)
    cert_id = json_of(body)["id"]
    run.call(c, "POST", f"{certs}/{cert_id}/domains/attach", {"domains": [{"domain": domain}]}, seller, 204)
    run.call(c, "PUT", f"{certs}/{cert_id}", form(rotated), seller, 200)
    run.call(c, "PUT", f"{certs}/{cert_id}", form(rotated, stranger.key_pem), seller, 400)
    _, _, body = run.call(c, "GET", f"{certs}/{cert_id}", None, seller, 200)
    assert rotated.key_needle() not in body.decode(), "a certificate's answer carries its key"
    run.call(c, "POST", f"{v2}/api-groups/{group}/domains/{domain_id}/certificate",
             form(inline) | {"name": "secrets_inline"}, seller, 201)

    # The seller's own app: a chosen secret, a reset one, a chosen and a generated AppCode.
    own_secret = run.secret("seller app secret", rand("ownsecret"))
    _, _, body = run.call(c, "POST", f"{v2}/apps", {"name": "secrets_app", "app_secret": own_secret}, seller, 201)
    own_app = json_of(body)["id"]
    _, _, body = run.call(c, "PUT", f"{v2}/apps/secret/{own_app}", None, seller, 200)
    run.secret("seller app secret, reset", json_of(body)["app_secret"])
    own_code = run.secret("seller app code", secrets.token_hex(40))
    run.call(c, "POST", f"{v2}/apps/{own_app}/app-codes", {"app_code": own_code}, seller, 201)
    _, _, body = run.call(c, "PUT", f"{v2}/apps/{own_app}/app-codes", None, seller, 201)
    run.secret("seller app code, generated", json_of(body)["app_code"])
    # An AppCode that is too short is a parameter error: the error must not echo it.
    short_code = run.secret("rejected app code", rand("short"))
    run.call(c, "POST", f"{v2}/apps/{own_app}/app-codes", {"app_code": short_code}, seller, 400)

    # AK/SK-signed control calls: one good, one with a broken signature.
    host = f"127.0.0.1:{c}"
    uri, headers = sign(SELLER_AK, run.seller_sk, "GET", host, f"{v2}/api-groups")
    run.secret("control Authorization", headers["Authorization"])
    run.call(c, "GET", uri, None, headers, 200)
    bad = flip_signature(headers)
    run.secret("control Authorization, bad", bad["Authorization"])
    run.call(c, "GET", uri, None, bad, 401)
    # Wrong tokens, both ways of sending one.
    wrong = run.secret("wrong token", rand("wrongtoken"))
    run.call(c, "GET", f"{v2}/api-groups", None, {"X-Auth-Token": wrong}, 401)
    run.call(c, "GET", f"{v2}/api-groups", None, {"Authorization": f"Bearer {wrong}"}, 401)
    run.call(c, "GET", f"{v2}/api-groups", None, {"Authorization": f"Bearer {run.seller_token}"}, 200)

    # The market lists the group and sells 2 calls to the buyer.
    run.call(c, "PUT", f"{mk}/api-groups/onsell/{group}", {"url_domain": MARKET_DOMAIN},
             market | {"X-Domain-Id": "seller-domain"}, 201)
    now = int(time.time())
    order = {"order_id": rand("order"), "group_id": group, "order_type": 1, "req_quota": 2,
             "start_time": str(now - 60), "expire_time": str(now + 86400)}
    _, _, body = run.call(c, "POST", f"{buyer_mk}/api-groups/purchase", order,
                          market | {"X-Domain-Id": "buyer-domain"}, 201)
    purchase = json_of(body)
    app_key = run.app_key = purchase["app_key"]
    app_secret = run.secret("buyer AppSecret", purchase["app_secret"])

    # The buyer finds its APP's AppCode through the management API.
    _, _, body = run.call(c, "GET", f"{buyer_v2}/apps", None, buyer, 200)
    app = next(a for a in json_of(body)["apps"] if a.get("app_key") == app_key)
    _, _, body = run.call(c, "GET", f"{buyer_v2}/apps/{app['id']}/app-codes", None, buyer, 200)
    app_code = run.secret("buyer AppCode", json_of(body)["app_codes"][0]["app_code"])

    # Buyer calls through the gateway. The first waits for the snapshot to arrive.
    uri, headers = sign(app_key, app_secret, "GET", MARKET_DOMAIN, "/today")
    run.secret("buyer Authorization", headers["Authorization"])
    deadline = time.monotonic() + 10
    while True:
        status, _, data = request(g, "GET", uri, None, headers)
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert status == 200, (status, data)
    bad = flip_signature(headers)
    run.secret("buyer Authorization, bad signature", bad["Authorization"])
    run.call(g, "GET", uri, None, bad, 401)
    uri_u, unknown = sign(rand("UNKNOWNKEY"), app_secret, "GET", MARKET_DOMAIN, "/today")
    run.secret("buyer Authorization, unknown key", unknown["Authorization"])
    run.call(g, "GET", uri_u, None, unknown, 401)
    bad_code = run.secret("bad AppCode", secrets.token_hex(40))
    run.call(g, "GET", "/today", None, {"Host": MARKET_DOMAIN, "X-Apig-AppCode": bad_code}, 401)
    run.call(g, "GET", "/today", None,
             {"Host": MARKET_DOMAIN, "X-Apig-AppCode": app_code, "X-Apig-Mode": "debug"}, 200)
    # Two calls bought, two served: the next is refused, signed or with the AppCode.
    uri, headers = sign(app_key, app_secret, "GET", MARKET_DOMAIN, "/dead")
    run.secret("buyer Authorization, /dead", headers["Authorization"])
    run.call(g, "GET", uri, None, headers, 405)
    run.call(g, "GET", "/today", None, {"Host": MARKET_DOMAIN, "X-Apig-AppCode": app_code}, 405)
    # More calls: then the backend is down (502, the call is given back).
    run.call(c, "POST", f"{mk}/api-groups/status",
             {"group_id": group, "project_id": "buyer-project", "unused": 5}, market | {"X-Domain-Id": "buyer-domain"}, 200)
    deadline = time.monotonic() + 10
    while True:
        status, _, data = request(g, "GET", uri, None, headers)
        if status != 405 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
        uri, headers = sign(app_key, app_secret, "GET", MARKET_DOMAIN, "/dead")
        run.secret(f"buyer Authorization, retry {len(run.secrets)}", headers["Authorization"])
    assert status == 502, (status, data)
    run.error_bodies.append(("GET", "/dead", status, data.decode("utf-8", "replace")))

    # The admin listener: a wrong admin token, then the right one.
    wrong_admin = run.secret("wrong admin token", rand("wrongadmin"))
    a = serve.admin_port
    run.call(a, "GET", "/metrics", None, {"Authorization": f"Bearer {wrong_admin}"}, 401)
    run.call(a, "GET", "/v1/usage", None, {"Authorization": f"Bearer {wrong_admin}"}, 401)
    run.call(a, "GET", "/metrics", None, {"Authorization": f"Bearer {run.admin_token}"}, 200)
    run.call(a, "GET", "/v1/usage", None, {"Authorization": f"Bearer {run.admin_token}"}, 200)


def json_of(body):
    import json

    return json.loads(body)


def signature_of(authorization):
    return authorization.rsplit("Signature=", 1)[1].strip()


def test_no_secret_in_any_log_line_or_error_body(scenario):
    assert scenario.records, "the run logged nothing as JSON"
    assert any(r.get("level") == "DEBUG" for r in scenario.records), "debug level was not on"
    needles = dict(scenario.secrets)
    for what, value in scenario.secrets.items():
        if "Authorization" in what:
            needles[what + " (signature)"] = signature_of(value)
    leaks = []
    for what, value in needles.items():
        for line in scenario.lines:
            if value in line:
                leaks.append(f"{what} in log line: {line.strip()[:300]}")
        for method, path, status, body in scenario.error_bodies:
            if value in body:
                leaks.append(f"{what} in the {status} body of {method} {path}: {body[:300]}")
    assert not leaks, "\n".join(leaks)
    # The grep sees what is logged: the AppKey (an identifier, not a secret) is in the access log.
    assert any(scenario.app_key in line for line in scenario.lines)
    # The errors were really answered with APIG bodies (the grep above had something to read).
    assert len(scenario.error_bodies) >= 10
    assert all('"error_code"' in body for _, _, _, body in scenario.error_bodies), scenario.error_bodies


ACCESS_FIELDS = {
    "request_id", "node_id", "remote_addr", "host", "method", "path", "group_id", "api_id",
    "app_key", "purchase_id", "status", "outcome", "duration_ms", "quota_left",
}


def test_access_log_lines_carry_the_documented_fields(scenario):
    access = [r for r in scenario.records if r.get("target") == "access"]
    assert access, "no access log line"
    served = [r["fields"] for r in access if r["fields"].get("status") == 200]
    assert served, "no access line for a served call"
    for fields in served:
        missing = ACCESS_FIELDS - set(fields)
        assert not missing, (missing, fields)
        assert fields["node_id"] == "secrets-node"
        assert fields["host"] == MARKET_DOMAIN
        assert fields["path"] == "/today"
        assert fields["outcome"] == "ok"
    failed = [r["fields"] for r in access if r["fields"].get("status") == 401]
    assert failed and all(f.get("error_code") == "APIG.0303" for f in failed), failed
    forwarded = [r["fields"] for r in access if r["fields"].get("status") == 502]
    assert forwarded and all("upstream_ms" in f for f in forwarded), forwarded
    for record in access:
        assert {"timestamp", "level", "target"} <= set(record), record


def test_serve_stops_cleanly(scenario):
    assert scenario.exit_status == 0, "".join(scenario.lines[-30:])
