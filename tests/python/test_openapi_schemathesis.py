"""docs/openapi.json against the server that serves it: Schemathesis (pinned in
requirements.txt) generates requests from `GET /openapi.json` of a running `marketgate serve`
and checks that no response is a 5xx and that every response conforms to the document.

The seller's token (a tenant of `seller-project`, instance `default`) authenticates every
request; the path's `project_id` and `instance_id` are pinned to the seller's so that the
requests reach the handlers rather than stopping at the ownership check. Examples per
operation are capped to keep the run under about three minutes.
"""

import os
import subprocess
import sys

from marketgate_process import Serve, request

SELLER_TOKEN = "schemathesis-seller-token"
# Examples per operation: 42 operations, a few requests each, well under three minutes.
MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "25"))

CONFIG = """instance_id = "default"
data_dir = "{data_dir}"
[gateway]
listen = "{gateway}"
[control]
listen = "{control}"
[[control.tokens]]
token = "%s"
domain_id = "seller-domain"
project_id = "seller-project"
role = "tenant"
[admin]
listen = "{admin}"
token = "schemathesis-admin-token"
[log]
format = "json"
level = "info"
""" % SELLER_TOKEN


def schemathesis_cli():
    return os.path.join(os.path.dirname(sys.executable), "st")


def test_openapi_document_holds_against_the_server(tmp_path):
    serve = Serve(CONFIG, command=os.environ.get("SCHEMATHESIS_COMMAND", "serve"))
    try:
        status, headers, body = request(serve.control_port, "GET", "/openapi.json")
        assert status == 200 and body.startswith(b"{"), (status, body[:200])
        assert headers.get("content-type") == "application/json"
        junit = tmp_path / "schemathesis.xml"
        result = subprocess.run(
            [
                schemathesis_cli(), "run", f"{serve.control_url}/openapi.json",
                "--base-url", serve.control_url,
                # not_a_server_error, status code / content type / headers / schema
                # conformance, negative data rejected, auth not ignored.
                "--checks", "all",
                "--header", f"X-Auth-Token: {SELLER_TOKEN}",
                # The token authenticates; generated Authorization values would only be
                # refused (401) before reaching a handler.
                "--generation-with-security-parameters", "false",
                "--generation-codec", "ascii",
                "--set-path", "project_id=seller-project",
                "--set-path", "instance_id=default",
                "--set-header", "X-Project-Id=seller-project",
                "--set-header", "X-Domain-Id=seller-domain",
                "--hypothesis-max-examples", str(MAX_EXAMPLES),
                "--hypothesis-seed", "6",
                "--generation-allow-x00", "false",
                "--request-timeout", "10000",
                "--workers", "2",
                "--junit-xml", str(junit),
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=240,
            env={k: v for k, v in os.environ.items() if not k.startswith("MARKETGATE_")}
            | {"SCHEMATHESIS_TELEMETRY": "false"},
        )
    finally:
        serve.stop()
    output = result.stdout + result.stderr
    server_errors = [line for line in serve.lines if '"level":"ERROR"' in line]
    assert result.returncode == 0, output[-20000:] + "\n--- server errors:\n" + "".join(server_errors[-20:])
