"""Buyer calls signed by Huawei's own client, through the real `marketgate proxy` binary.

Starts `$MARKETGATE_BIN proxy --config <tmp>` (default `target/debug/marketgate`) on
127.0.0.1:0, learns its addresses from its JSON log, pushes a snapshot over the admin API,
and checks that calls signed with `huaweicloudsdkcore`'s `Signer` pass and that any one-byte
change to what was signed is refused with 401 APIG.0303.
"""

import http.client
import http.server
import json
import os
import subprocess
import tempfile
import threading
import time

import pytest
from huaweicloudsdkcore.sdk_request import SdkRequest
from huaweicloudsdkcore.signer.signer import Signer

ADMIN_TOKEN = "python-admin-token"
MARKET = "market.python.test"
KEY = "PythonBuyerKey0001"
SECRET = "python-buyer-secret-0001"


class Credentials:
    def __init__(self, ak, sk):
        self.ak = ak
        self.sk = sk


class Backend(http.server.BaseHTTPRequestHandler):
    seen = []

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        Backend.seen.append((self.command, self.path, dict(self.headers), body))
        self.send_response(200)
        self.send_header("Content-Length", "4")
        self.end_headers()
        self.wfile.write(b"echo")

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def backend():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address
    server.shutdown()


@pytest.fixture(scope="module")
def proxy(backend):
    binary = os.environ.get("MARKETGATE_BIN", "target/debug/marketgate")
    with tempfile.TemporaryDirectory() as data_dir:
        config = os.path.join(data_dir, "proxy.toml")
        with open(config, "w") as f:
            f.write(
                f"""data_dir = '{data_dir}'
[gateway]
listen = '127.0.0.1:0'
[admin]
listen = '127.0.0.1:0'
token = '{ADMIN_TOKEN}'
[log]
format = 'json'
level = 'info'
"""
            )
        process = subprocess.Popen(
            [binary, "proxy", "--config", config],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # MARKETGATE_* variables are config overrides to the binary (MARKETGATE_BIN
            # would be an unknown key `bin`): the child gets none of them.
            env={k: v for k, v in os.environ.items() if not k.startswith("MARKETGATE_")},
        )
        addresses = None
        lines = []
        deadline = time.monotonic() + 30
        while addresses is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            lines.append(line)
            if not line:
                break
            try:
                record = json.loads(line)
            except ValueError:
                continue
            fields = record.get("fields", {})
            if fields.get("message") == "proxy listening":
                addresses = (fields["buyers"], fields["admin"])
        assert addresses, f"the proxy did not report its listeners: {lines!r}"
        threading.Thread(target=lambda: process.stdout.read(), daemon=True).start()
        push_snapshot(addresses[1], backend)
        yield addresses
        process.terminate()
        assert process.wait(timeout=30) == 0


def split(address):
    host, port = address.rsplit(":", 1)
    return host, int(port)


def push_snapshot(admin, backend):
    snapshot = {
        "version": 1,
        "groups": [
            {
                "id": "g1",
                "name": "python",
                "sl_domain": "g1.sl.python.test",
                "url_domain": MARKET,
                "market_state": "on_sale",
                "apis": [
                    {
                        "id": "api-echo",
                        "type": 1,
                        "req_protocol": "BOTH",
                        "req_method": "ANY",
                        "req_uri": "/v1/echo/{id}",
                        "match_mode": "NORMAL",
                        "auth_type": "APP",
                        "backend": {
                            "type": "HTTP",
                            "req_protocol": "HTTP",
                            "req_method": "ANY",
                            "req_uri": "/echo/{id}",
                            "url_domain": f"{backend[0]}:{backend[1]}",
                            "timeout_ms": 5000,
                        },
                    },
                    {
                        "id": "api-files",
                        "type": 1,
                        "req_protocol": "BOTH",
                        "req_method": "GET",
                        "req_uri": "/v1/files/{key+}",
                        "match_mode": "NORMAL",
                        "auth_type": "APP",
                        "backend": {
                            "type": "HTTP",
                            "req_protocol": "HTTP",
                            "req_method": "GET",
                            "req_uri": "/files/{key+}",
                            "url_domain": f"{backend[0]}:{backend[1]}",
                            "timeout_ms": 5000,
                        },
                    },
                ],
            }
        ],
        "apps": [{"id": "a1", "app_key": KEY, "app_secret": SECRET, "creator": "MARKET"}],
        "purchases": [
            {
                "id": "p1",
                "group_id": "g1",
                "app_id": "a1",
                "state": "active",
                "start_time": 0,
                "expire_time": 4000000000,
                "quota_limit": 1000,
            }
        ],
    }
    conn = http.client.HTTPConnection(*split(admin), timeout=10)
    conn.request(
        "PUT",
        "/v1/snapshot",
        body=json.dumps(snapshot),
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
    )
    response = conn.getresponse()
    assert response.status == 200, response.read()
    response.read()


def signed(method, path, query=None, body=b"", content_type="application/json"):
    request = SdkRequest(
        method=method,
        schema="http",
        host=MARKET,
        resource_path=path,
        query_params=list(query or []),
        header_params={"Content-Type": content_type},
        body=body,
    )
    return Signer(Credentials(KEY, SECRET)).sign(request)


def send(buyers, method, uri, headers, body):
    conn = http.client.HTTPConnection(*split(buyers), timeout=10)
    conn.request(method, uri, body=body or None, headers=headers)
    response = conn.getresponse()
    data = response.read()
    return response.status, data


def call(buyers, request):
    return send(buyers, request.method, request.uri, dict(request.header_params), request.body)


CASES = [
    ("GET", "/v1/echo/beijing", [("lang", "zh"), ("unit", "c")], b""),
    ("POST", "/v1/echo/orders", [], b'{"item":"book","qty":2}'),
    ("GET", "/v1/echo/search", [("q", "a b"), ("empty", ""), ("tag", ["z", "a"])], b""),
    ("PUT", "/v1/echo/%E4%B8%AD%E6%96%87", [], b'{"x":"\xe4\xb8\xad"}'),
]


@pytest.mark.parametrize("method,path,query,body", CASES)
def test_sdk_signed_calls_pass(proxy, method, path, query, body):
    status, data = call(proxy[0], signed(method, path, query, body))
    assert status == 200, data
    assert data == b"echo"


def test_unsigned_payload_streams(proxy):
    request = signed("PUT", "/v1/echo/blob", [], b"raw-bytes", content_type="application/octet-stream")
    assert request.header_params.get("X-Sdk-Content-Sha256") == "UNSIGNED-PAYLOAD"
    status, data = call(proxy[0], request)
    assert status == 200, data


def flip(text, index):
    """Changes one character (one byte for ASCII) of text."""
    c = text[index]
    replacement = "b" if c != "b" else "c"
    return text[:index] + replacement + text[index + 1 :]


def test_any_one_byte_change_is_refused(proxy):
    buyers = proxy[0]
    request = signed("POST", "/v1/echo/orders", [("lang", "zh")], b'{"item":"book","qty":2}')
    headers = dict(request.header_params)
    assert call(buyers, request)[0] == 200

    variants = []
    # The path, byte by byte in the parameter segment (still routed to the same API).
    for i in range(len("/v1/echo/"), len("/v1/echo/orders")):
        variants.append(("POST", flip("/v1/echo/orders", i) + "?lang=zh", headers, request.body))
    # The query, the method, the body.
    variants.append(("POST", "/v1/echo/orders?lang=zi", headers, request.body))
    variants.append(("POST", "/v1/echo/orders?lanh=zh", headers, request.body))
    variants.append(("PUT", request.uri, headers, request.body))
    body = request.body
    for i in range(len(body)):
        changed = bytearray(body)
        changed[i] ^= 0x01
        variants.append(("POST", request.uri, headers, bytes(changed)))
    # Each signed header and the signature itself.
    for name in ("X-Sdk-Date", "Content-Type"):
        value = headers[name]
        for i in (0, len(value) - 2):
            changed = dict(headers)
            changed[name] = flip(value, i) if name != "X-Sdk-Date" else value[:i] + ("1" if value[i] != "1" else "2") + value[i + 1 :]
            variants.append(("POST", request.uri, changed, request.body))
    auth = headers["Authorization"]
    for i in (len(auth) - 1, len(auth) - 30, auth.index("Access=") + 7):
        changed = dict(headers)
        changed["Authorization"] = flip(auth, i)
        variants.append(("POST", request.uri, changed, request.body))

    for method, uri, hdrs, data in variants:
        status, answer = send(buyers, method, uri, hdrs, data)
        assert status == 401, (method, uri, hdrs, data, answer)
        assert json.loads(answer)["error_code"] == "APIG.0303"


def test_sdk_signed_encoded_slash_paths_are_served_as_signed(proxy):
    """Huawei's signer decodes the whole path before splitting it (`unquote(path).split('/')`),
    so `%2F` separates segments in what it signs. The gateway routes that same form
    (docs/request-lifecycle.md, "Encoded slashes"): a `%2F` path is served on the API its
    slash form names, and a signature never reaches a second API by a re-encoded slash."""
    buyers = proxy[0]
    for path in ("/v1/files/dir%2Freport.txt", "/v1/files/dir%2freport.txt"):
        Backend.seen.clear()
        status, data = call(buyers, signed("GET", path))
        assert status == 200, (path, data)
        assert Backend.seen[-1][1] == "/files/dir/report.txt", Backend.seen
    # One segment parameter: the slash form `/v1/echo/a/b` names no API, so neither does
    # the encoded one (as nginx matches locations on the decoded path).
    status, data = call(buyers, signed("GET", "/v1/echo/a%2Fb"))
    assert status == 404, data
    assert json.loads(data)["error_code"] == "APIG.0101"
    # The signature of the slash form is the signature of the encoded form: both reach the
    # same API with the same backend path, never another.
    request = signed("GET", "/v1/files/x/y")
    headers = dict(request.header_params)
    for uri in ("/v1/files/x/y", "/v1/files/x%2Fy"):
        Backend.seen.clear()
        status, data = send(buyers, "GET", uri, headers, b"")
        assert status == 200, (uri, data)
        assert Backend.seen[-1][1] == "/files/x/y"
