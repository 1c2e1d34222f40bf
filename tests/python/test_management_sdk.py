"""The management API driven by Huawei's own SDK (`huaweicloudsdkapig`), against the real
`marketgate control` binary.

Starts `$MARKETGATE_BIN control --config <tmp>` (default `target/debug/marketgate`) on
127.0.0.1:0 over a fresh SQLite file and, when PostgreSQL is reachable (`psql` on
127.0.0.1:5432, trust auth), over a fresh PostgreSQL database; learns the address from the
JSON log; builds an `ApigClient` with an endpoint override and AK/SK from the temp config
(spec §0.1). Creates a group, APIs, publishes them, creates an app and app codes,
authorizes it, lists everything, and checks that errors arrive as `ClientRequestException`
with the right `error_code`.
"""

import json
import os
import shutil
import subprocess
import tempfile
import uuid

import pytest
from huaweicloudsdkapig.v2 import (
    ApiActionInfo,
    ApiAuthCreate,
    ApiBatchPublish,
    ApiCreate,
    ApiGroupCreate,
    ApigClient,
    AppCodeCreate,
    AppCreate,
    AuthOpt,
    BackendApiCreate,
    BatchPublishOrOfflineApiV2Request,
    CreateAnAppV2Request,
    CreateApiGroupV2Request,
    CreateApiV2Request,
    CreateAppCodeAutoV2Request,
    CreateAppCodeV2Request,
    CreateAuthorizingAppsV2Request,
    CreateOrDeletePublishRecordForApiV2Request,
    DeleteApiGroupV2Request,
    DeleteApiV2Request,
    ListApiGroupsV2Request,
    ListApisV2Request,
    ListAppCodesV2Request,
    ListAppsBindedToApiV2Request,
    ListAppsV2Request,
    ListEnvironmentsV2Request,
    ResettingAppSecretV2Request,
    ShowDetailsOfApiGroupV2Request,
)
from huaweicloudsdkapig.v2.model.api_mock_create import ApiMockCreate
from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.exceptions import exceptions
from huaweicloudsdkcore.http.http_config import HttpConfig

INSTANCE = "inst-sdk"
AK = "SDKSELLERAK000001"
SK = "sdk-seller-secret-key"
PROJECT = "sdk-seller-project"
RELEASE = "DEFAULT_ENVIRONMENT_RELEASE_ID"
POSTGRES = "postgres://postgres@127.0.0.1:5432"

CONFIG = """instance_id = "{instance}"
database_url = "{database_url}"
[control]
listen = "127.0.0.1:0"
[[control.credentials]]
access_key = "{ak}"
secret_key = "{sk}"
domain_id = "sdk-seller-domain"
project_id = "{project}"
role = "tenant"
[admin]
listen = "127.0.0.1:0"
token = "sdk-admin-token"
[log]
format = "json"
"""


def marketgate_binary():
    return os.environ.get("MARKETGATE_BIN", "target/debug/marketgate")


def psql(sql):
    return subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-c", sql],
        capture_output=True,
        timeout=20,
    )


def fresh_postgres_database():
    """A new database's name, or None when PostgreSQL is not reachable."""
    if shutil.which("psql") is None:
        return None
    name = "mg_sdk_" + uuid.uuid4().hex
    return name if psql(f"CREATE DATABASE {name}").returncode == 0 else None


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def marketgate_control(request):
    """The real control binary on 127.0.0.1:0: yields its base URL."""
    database = None
    if request.param == "postgres":
        database = fresh_postgres_database()
        if database is None:
            pytest.skip("PostgreSQL not reachable: the PostgreSQL half of the SDK suite was SKIPPED")
    workdir = tempfile.mkdtemp(prefix="marketgate-sdk-")
    database_url = f"{POSTGRES}/{database}" if database else f"sqlite://{workdir}/marketgate.db"
    config = os.path.join(workdir, "control.toml")
    with open(config, "w") as f:
        f.write(CONFIG.format(instance=INSTANCE, database_url=database_url, ak=AK, sk=SK, project=PROJECT))
    # Every MARKETGATE_* variable is a config override for the binary (MARKETGATE_BIN would be
    # an unknown key): the child gets none.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARKETGATE_")}
    env["RUST_LOG"] = "info"
    proc = subprocess.Popen(
        [marketgate_binary(), "control", "--config", config],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    address = None
    for line in proc.stdout:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        address = entry.get("fields", {}).get("listen")
        if address:
            break
    assert address, "marketgate control did not log its address"
    yield f"http://{address}"
    proc.kill()
    proc.wait()
    shutil.rmtree(workdir, ignore_errors=True)
    if database:
        psql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


@pytest.fixture(scope="module")
def apig(marketgate_control):
    cfg = HttpConfig.get_default_config()
    cfg.ignore_ssl_verification = True
    return (
        ApigClient.new_builder()
        .with_http_config(cfg)
        .with_credentials(BasicCredentials(AK, SK, PROJECT))
        .with_endpoints([marketgate_control])
        .build()
    )


def api_body(group_id, name, uri):
    return ApiCreate(
        name=name,
        type=1,
        req_protocol="HTTP",
        req_method="GET",
        req_uri=uri,
        auth_type="APP",
        auth_opt=AuthOpt(app_code_auth_type="HEADER"),
        backend_type="HTTP",
        group_id=group_id,
        backend_api=BackendApiCreate(
            url_domain="127.0.0.1:9", req_protocol="HTTP", req_method="GET", req_uri="/backend/{id}", timeout=5000
        ),
    )


def expect_error(call, status, code, says=None):
    with pytest.raises(exceptions.ClientRequestException) as raised:
        call()
    assert raised.value.status_code == status, raised.value
    assert raised.value.error_code == code, raised.value
    assert raised.value.error_msg
    assert raised.value.request_id
    if says is not None:
        assert says in raised.value.error_msg, raised.value.error_msg


def test_sdk_full_seller_flow(apig):
    group = apig.create_api_group_v2(
        CreateApiGroupV2Request(instance_id=INSTANCE, body=ApiGroupCreate(name="sdk_group01", remark="demo"))
    )
    assert group.status_code == 201
    assert group.sl_domain.endswith(".marketgate.local")
    shown = apig.show_details_of_api_group_v2(ShowDetailsOfApiGroupV2Request(instance_id=INSTANCE, group_id=group.id))
    assert shown.name == "sdk_group01"

    api = apig.create_api_v2(CreateApiV2Request(instance_id=INSTANCE, body=api_body(group.id, "sdk_api_one", "/one/{id}")))
    assert api.status_code == 201
    mock = ApiCreate(
        name="sdk_mock",
        type=1,
        req_protocol="HTTP",
        req_method="POST",
        req_uri="/mock",
        auth_type="APP",
        backend_type="MOCK",
        group_id=group.id,
        mock_info=ApiMockCreate(result_content="mocked"),
    )
    api_two = apig.create_api_v2(CreateApiV2Request(instance_id=INSTANCE, body=mock))

    record = apig.create_or_delete_publish_record_for_api_v2(
        CreateOrDeletePublishRecordForApiV2Request(
            instance_id=INSTANCE, body=ApiActionInfo(action="online", env_id=RELEASE, api_id=api.id)
        )
    )
    assert record.publish_id
    batch = apig.batch_publish_or_offline_api_v2(
        BatchPublishOrOfflineApiV2Request(
            instance_id=INSTANCE, action="online", body=ApiBatchPublish(env_id=RELEASE, apis=[api_two.id])
        )
    )
    assert len(batch.success) == 1 and not batch.failure

    apis = apig.list_apis_v2(ListApisV2Request(instance_id=INSTANCE, group_id=group.id, env_id=RELEASE))
    assert apis.total == 2 and apis.size == 2
    assert {a.name for a in apis.apis} == {"sdk_api_one", "sdk_mock"}

    app = apig.create_an_app_v2(CreateAnAppV2Request(instance_id=INSTANCE, body=AppCreate(name="sdk_app")))
    assert app.app_key and app.app_secret
    reset = apig.resetting_app_secret_v2(ResettingAppSecretV2Request(instance_id=INSTANCE, app_id=app.id))
    assert reset.app_secret != app.app_secret
    code = apig.create_app_code_v2(
        CreateAppCodeV2Request(instance_id=INSTANCE, app_id=app.id, body=AppCodeCreate(app_code="C" * 64))
    )
    assert code.app_code == "C" * 64
    auto = apig.create_app_code_auto_v2(CreateAppCodeAutoV2Request(instance_id=INSTANCE, app_id=app.id))
    assert len(auto.app_code) >= 64
    codes = apig.list_app_codes_v2(ListAppCodesV2Request(instance_id=INSTANCE, app_id=app.id))
    assert codes.total == 2

    auths = apig.create_authorizing_apps_v2(
        CreateAuthorizingAppsV2Request(
            instance_id=INSTANCE, body=ApiAuthCreate(env_id=RELEASE, app_ids=[app.id], api_ids=[api.id])
        )
    )
    assert auths.auths[0].auth_result.status == "SUCCESS"
    bound = apig.list_apps_binded_to_api_v2(ListAppsBindedToApiV2Request(instance_id=INSTANCE, api_id=api.id))
    assert bound.total == 1 and bound.auths[0].app_name == "sdk_app"

    groups = apig.list_api_groups_v2(ListApiGroupsV2Request(instance_id=INSTANCE, name="sdk group", limit=50))
    assert groups.total == 0  # the SDK sends %20: a literal space, not part of the name
    groups = apig.list_api_groups_v2(ListApiGroupsV2Request(instance_id=INSTANCE, name="sdk_group", limit=50))
    assert groups.total == 1 and groups.groups[0].id == group.id
    apps = apig.list_apps_v2(ListAppsV2Request(instance_id=INSTANCE))
    assert apps.total == 1
    envs = apig.list_environments_v2(ListEnvironmentsV2Request(instance_id=INSTANCE))
    assert envs.envs[0].id == RELEASE

    # Errors arrive as ClientRequestException with Huawei's codes.
    expect_error(
        lambda: apig.create_api_group_v2(
            CreateApiGroupV2Request(instance_id=INSTANCE, body=ApiGroupCreate(name="sdk_group01"))
        ),
        400,
        "APIG.3201",
    )
    expect_error(
        lambda: apig.delete_api_group_v2(DeleteApiGroupV2Request(instance_id=INSTANCE, group_id=group.id)),
        403,
        "APIG.3415",
    )
    expect_error(
        lambda: apig.delete_api_v2(DeleteApiV2Request(instance_id=INSTANCE, api_id=api.id)), 403, "APIG.3416"
    )
    expect_error(
        lambda: apig.delete_api_group_v2(DeleteApiGroupV2Request(instance_id=INSTANCE, group_id="nope")),
        404,
        "APIG.3001",
    )
    expect_error(
        lambda: apig.create_authorizing_apps_v2(
            CreateAuthorizingAppsV2Request(
                instance_id=INSTANCE, body=ApiAuthCreate(env_id=RELEASE, app_ids=[app.id], api_ids=[api.id])
            )
        ),
        400,
        "APIG.3316",
    )
    bad = api_body(group.id, "sdk_api_bad", "/two/{id}")
    bad.backend_type = "FUNCTION"
    expect_error(
        lambda: apig.create_api_v2(CreateApiV2Request(instance_id=INSTANCE, body=bad)),
        400,
        "APIG.2012",
        'parameterName:backend_type. backend_type must be one of HTTP, MOCK (got "FUNCTION")',
    )
    expect_error(
        lambda: apig.create_api_group_v2(CreateApiGroupV2Request(instance_id=INSTANCE, body=ApiGroupCreate(name="ab"))),
        400,
        "APIG.2012",
        "name must be 3 to 255 characters of letters, digits, Chinese characters and - _ . / ( ) : 、, "
        "starting with a letter, a digit or a Chinese character (got 2)",
    )
    for _ in range(3):
        apig.create_app_code_auto_v2(CreateAppCodeAutoV2Request(instance_id=INSTANCE, app_id=app.id))
    expect_error(
        lambda: apig.create_app_code_auto_v2(CreateAppCodeAutoV2Request(instance_id=INSTANCE, app_id=app.id)),
        400,
        "APIG.2012",
    )
    expect_error(
        lambda: apig.list_api_groups_v2(ListApiGroupsV2Request(instance_id="no-such-instance")), 404, "APIG.3030"
    )


def test_sdk_wrong_secret_is_401(marketgate_control):
    client = (
        ApigClient.new_builder()
        .with_http_config(HttpConfig.get_default_config())
        .with_credentials(BasicCredentials(AK, "not-the-secret", PROJECT))
        .with_endpoints([marketgate_control])
        .build()
    )
    expect_error(lambda: client.list_api_groups_v2(ListApiGroupsV2Request(instance_id=INSTANCE)), 401, "APIG.1002")
