#!/usr/bin/env python3
"""Writes docs/openapi.json: the market API (CONTRACT §3) and the APIG v2 management API
(spec/apig-v2-management.md) of the marketgate control plane, OpenAPI 3.0.3.

    python3 deploy/openapi/generate.py           # rewrite docs/openapi.json
    python3 deploy/openapi/generate.py --check   # fail if docs/openapi.json is out of date

Schemas are deliberately permissive: no additionalProperties: false, `required` only for
fields the contract guarantees, and optional properties are nullable.
"""
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "docs" / "openapi.json"

MARKET = "/v1/{project_id}/apigw/instances/{instance_id}/market"
MGMT = "/v2/{project_id}/apigw/instances/{instance_id}"


def ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


def S(t, desc=None, **kw):
    s = {"type": t}
    if desc:
        s["description"] = desc
    s.update(kw)
    return s


def obj(props, required=(), desc=None):
    """An object schema; properties not in `required` are nullable (permissive)."""
    out = {}
    for k, v in props.items():
        if k not in required and "$ref" not in v:
            v = dict(v, nullable=True)
        elif k not in required:
            # `nullable` beside a $ref is ignored by OpenAPI 3.0 validators: say null explicitly.
            v = {"anyOf": [v, {"enum": [None], "nullable": True}]}
        out[k] = v
    s = {"type": "object", "properties": out}
    if required:
        s["required"] = list(required)
    if desc:
        s["description"] = desc
    return s


def envelope(array, item, desc):
    return obj({"total": S("integer", "matching records"), "size": S("integer", "records on this page"),
                array: S("array", items=ref(item))}, required=("total", "size", array), desc=desc)


TIME = S("string", "RFC 3339 UTC time")
EPOCH = S("string", "epoch seconds, as a string")

schemas = {
    "Error": obj({
        "error_code": S("string", "APIG error code, e.g. APIG.3001", example="APIG.3001"),
        "error_msg": S("string", "human-readable message; never contains a secret"),
        "request_id": S("string", "the same id as the X-Request-Id header"),
    }, required=("error_code", "error_msg"), desc="Error body (CONTRACT §8)."),
    # ---- market API ----
    "OnsellRequest": obj({"url_domain": S("string", "market access domain", minLength=1, maxLength=255)}, required=("url_domain",)),
    "MarketGroup": obj({"id": S("string"), "name": S("string"), "remark": S("string"), "update_time": TIME,
                        "url_domain": S("string"), "status": S("integer", "market review lock: 3 locked, 2 unlocked")},
                       required=("id", "name")),
    "MarketGroupStatusRequest": obj({"status": S("integer", "3 lock for market review, 2 unlock", enum=[2, 3])}, required=("status",)),
    "ReserveRequest": obj({"group_id": S("string", minLength=1)}, required=("group_id",)),
    "ReserveResponse": obj({"group_id": S("string"), "purchase_id": S("string")}, required=("group_id", "purchase_id")),
    "PurchaseRequest": obj({
        "order_id": S("string", "market's idempotency key", minLength=1),
        "group_id": S("string", minLength=1),
        "start_time": EPOCH, "expire_time": EPOCH,
        "req_quota": S("integer", "calls bought; absent = unlimited for order types 2 and 3", minimum=0),
        "order_type": S("integer", "1 prepaid package, 2 postpaid period, 3 postpaid on-demand", enum=[1, 2, 3]),
        "purchase_id": S("string", "a reserved purchase to activate"),
    }, required=("order_id", "group_id", "start_time", "expire_time", "order_type")),
    "PurchaseResponse": obj({
        "purchase_id": S("string"), "order_id": S("string"), "group_id": S("string"),
        "start_time": TIME, "expire_time": TIME, "req_quota": S("integer"), "order_type": S("integer"),
        "app_key": S("string"), "app_secret": S("string", "the buyer's AppSecret; shown here and nowhere in logs"),
    }, required=("purchase_id", "order_id", "group_id")),
    "BuyerStatusRequest": obj({
        "group_id": S("string"), "project_id": S("string", "the buyer's project"),
        "purchase_id": S("string", "instead of group_id + project_id"),
        "unused": S("integer", "calls left; <= 0 freezes, > 0 unfreezes and sets the calls left"),
    }, required=("unused",)),
    "ProjectStatusRequest": obj({"status": S("integer", "3 freeze, 1 unfreeze", enum=[1, 3]),
                                 "purchase_ids": S("array", items=S("string"), minItems=1)},
                                required=("status", "purchase_ids")),
    "ProjectStatusResult": obj({"purchase_id": S("string"), "status": S("integer"), "error_code": S("string"),
                                "error_msg": S("string")}),
    "ProjectStatusResponse": {"description": "per-purchase result", "oneOf": [
        S("array", items=ref("ProjectStatusResult")),
        S("object", additionalProperties=True)]},
    "MarketGroupList": envelope("groups", "MarketGroup", "groups that could be listed / that are listed"),
    "Purchase": obj({
        "purchase_id": S("string"), "order_id": S("string"), "group_id": S("string"),
        "url_domain": S("string"), "app_key": S("string"), "order_type": S("integer"),
        "state": S("string", "reserved | active | frozen | unsubscribed"),
        "start_time": TIME, "expire_time": TIME, "req_quota": S("integer"),
        "quota_used": S("integer"), "quota_left": S("integer", "absent or null when unlimited"),
    }, required=("purchase_id", "group_id")),
    # The contract fixes no envelope for row 12: the list envelope of the other lists, unrequired.
    "PurchaseList": obj({"total": S("integer"), "size": S("integer"),
                         "purchases": S("array", items=ref("Purchase"))}, desc="the buyer's purchases"),
    # ---- management API: groups ----
    "ApiGroupCreate": obj({"name": S("string", minLength=3, maxLength=255), "remark": S("string", maxLength=1000)}, required=("name",)),
    "UrlDomain": obj({"id": S("string"), "domain": S("string"), "cname_status": S("integer"), "ssl_id": S("string"),
                      "ssl_name": S("string"), "min_ssl_version": S("string")}),
    "ApiGroup": obj({
        "id": S("string"), "name": S("string"), "status": S("integer", "1 valid"), "sl_domain": S("string"),
        "register_time": TIME, "update_time": TIME, "on_sell_status": S("integer", "1 on sale, 2 not, 3 under review"),
        "url_domains": S("array", items=ref("UrlDomain")), "sl_domain_access_enabled": S("boolean"),
        "sl_domains": S("array", items=S("string")), "remark": S("string"), "is_default": S("integer"),
        "version": S("string"), "roma_app_id": S("string"), "roma_app_name": S("string"),
    }, required=("id", "name")),
    "ApiGroupList": envelope("groups", "ApiGroup", "API groups"),
    # ---- APIs ----
    "BackendApi": obj({
        "req_protocol": S("string", enum=["HTTP", "HTTPS"]), "req_method": S("string"),
        "req_uri": S("string", maxLength=512), "url_domain": S("string", "host:port", maxLength=255),
        "timeout": S("integer", "milliseconds", minimum=1, maximum=600000), "retry_count": S("string"),
        "vpc_channel_status": S("integer"), "remark": S("string"), "version": S("string"),
        "id": S("string"), "status": S("integer"), "register_time": TIME, "update_time": TIME,
    }, required=()),
    "ReqParam": obj({
        "name": S("string"), "type": S("string", enum=["STRING", "NUMBER"]), "location": S("string", enum=["PATH", "QUERY", "HEADER"]),
        "required": S("integer"), "default_value": S("string"), "sample_value": S("string"), "remark": S("string"),
        "valid_enable": S("integer"), "min_num": S("integer"), "max_num": S("integer"), "min_size": S("integer"),
        "max_size": S("integer"), "pass_through": S("integer"), "enumerations": S("string"), "id": S("string"),
    }),
    "BackendParam": obj({"origin": S("string", enum=["REQUEST", "CONSTANT", "SYSTEM"]), "name": S("string"),
                         "location": S("string", enum=["PATH", "QUERY", "HEADER"]), "value": S("string"),
                         "remark": S("string"), "id": S("string"), "req_param_id": S("string")}),
    "ApiCreate": obj({
        "name": S("string", minLength=3, maxLength=255), "type": S("integer", "1 public, 2 private", enum=[1, 2]),
        "req_protocol": S("string", enum=["HTTP", "HTTPS", "BOTH"]),
        "req_method": S("string", enum=["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS", "ANY"]),
        "req_uri": S("string", "literal segments, {name} one segment, {name+} the rest", minLength=1, maxLength=512),
        "auth_type": S("string", enum=["NONE", "APP", "IAM", "AUTHORIZER"]),
        "auth_opt": obj({"app_code_auth_type": S("string", enum=["DISABLE", "HEADER"])}),
        "backend_type": S("string", "HTTP and MOCK are served; others are 400", enum=["HTTP", "FUNCTION", "MOCK", "GRPC"]),
        "group_id": S("string", minLength=1), "match_mode": S("string", enum=["NORMAL", "SWA"]),
        "remark": S("string", maxLength=255), "backend_api": ref("BackendApi"),
        "req_params": S("array", items=ref("ReqParam")), "backend_params": S("array", items=ref("BackendParam")),
        "mock_info": obj({"result_content": S("string"), "version": S("string"), "remark": S("string")}),
        "cors": S("boolean"), "tags": S("array", items=S("string")), "content_type": S("string"),
        "result_normal_sample": S("string"), "result_failure_sample": S("string"), "body_remark": S("string"),
    }, required=("name", "type", "req_protocol", "req_method", "req_uri", "auth_type", "backend_type", "group_id")),
    "Api": obj({
        "id": S("string"), "name": S("string"), "type": S("integer"), "group_id": S("string"), "group_name": S("string"),
        "status": S("integer"), "req_protocol": S("string"), "req_method": S("string"), "req_uri": S("string"),
        "auth_type": S("string"), "auth_opt": obj({"app_code_auth_type": S("string")}), "match_mode": S("string"),
        "backend_type": S("string"), "backend_api": ref("BackendApi"), "remark": S("string"),
        "req_params": S("array", items=ref("ReqParam")), "backend_params": S("array", items=ref("BackendParam")),
        "mock_info": obj({"result_content": S("string"), "version": S("string"), "remark": S("string")}),
        "register_time": TIME, "update_time": TIME, "run_env_id": S("string"), "run_env_name": S("string"),
        "publish_id": S("string"), "publish_time": S("string"), "arrange_necessary": S("integer"),
        "group_version": S("string"), "cors": S("boolean"), "tags": S("array", items=S("string")),
        "api_group_info": ref("ApiGroup"),
    }, required=("id", "name")),
    "ApiList": envelope("apis", "Api", "APIs"),
    "ApiActionRequest": obj({"action": S("string", enum=["online", "offline"]), "env_id": S("string", minLength=1),
                             "api_id": S("string", minLength=1), "remark": S("string", maxLength=255)},
                            required=("action", "env_id", "api_id")),
    "PublishRecord": obj({"publish_id": S("string"), "api_id": S("string"), "api_name": S("string"), "env_id": S("string"),
                          "remark": S("string"), "publish_time": S("string"), "version_id": S("string")}),
    "ApiBatchPublishRequest": obj({"env_id": S("string", minLength=1), "apis": S("array", items=S("string"), maxItems=1000),
                                   "group_id": S("string"), "remark": S("string")}, required=("env_id",)),
    "ApiBatchPublishResponse": obj({
        "success": S("array", items=ref("PublishRecord")),
        "failure": S("array", items=obj({"api_id": S("string"), "api_name": S("string"), "error_code": S("string"), "error_msg": S("string")})),
    }),
    "Env": obj({"id": S("string"), "name": S("string"), "remark": S("string"), "create_time": S("string")}, required=("id", "name")),
    "EnvList": envelope("envs", "Env", "environments (RELEASE, id DEFAULT_ENVIRONMENT_RELEASE_ID, is built in)"),
    # ---- apps ----
    "AppCreate": obj({"name": S("string", minLength=3, maxLength=64), "remark": S("string", maxLength=255),
                      "app_key": S("string", minLength=8, maxLength=200), "app_secret": S("string", minLength=8, maxLength=128),
                      "related_domain_id": S("string"), "related_project_id": S("string")}, required=("name",)),
    "App": obj({
        "id": S("string"), "name": S("string"), "remark": S("string"), "app_key": S("string"),
        "app_secret": S("string"), "creator": S("string", "USER | MARKET"), "status": S("integer"), "app_type": S("string"),
        "register_time": TIME, "update_time": TIME, "related_domain_id": S("string"), "related_project_id": S("string"),
        "bind_num": S("integer", "in lists: number of bound APIs"),
    }, required=("id", "name")),
    "AppList": envelope("apps", "App", "apps"),
    "AppResetRequest": obj({"app_secret": S("string", minLength=8, maxLength=128)}),
    "AppValidation": obj({"id": S("string"), "name": S("string"), "remark": S("string")}, required=("id",)),
    "AppCodeCreate": obj({"app_code": S("string", minLength=64, maxLength=180)}, required=("app_code",)),
    "AppCode": obj({"id": S("string"), "app_id": S("string"), "app_code": S("string"), "create_time": S("string")}, required=("id", "app_code")),
    "AppCodeList": envelope("app_codes", "AppCode", "app codes"),
    # ---- app auths ----
    "ApiAuthCreate": obj({"env_id": S("string", minLength=1), "app_ids": S("array", items=S("string"), minItems=1),
                          "api_ids": S("array", items=S("string"), minItems=1)}, required=("env_id", "app_ids", "api_ids")),
    "ApiAuthRelation": obj({
        "id": S("string"), "api_id": S("string"), "app_id": S("string"),
        "auth_result": obj({"status": S("string"), "error_code": S("string"), "error_msg": S("string"),
                            "api_name": S("string"), "app_name": S("string")}),
        "auth_time": S("string"), "auth_role": S("string"), "auth_tunnel": S("string"),
        "auth_whitelist": S("array", items=S("string")), "auth_blacklist": S("array", items=S("string")),
        "visit_params": S("string"),
    }),
    "ApiAuthCreateResponse": obj({"auths": S("array", items=ref("ApiAuthRelation"))}, required=("auths",)),
    "ApiAuthInfo": obj({k: S("string") for k in (
        "id", "api_id", "api_name", "api_remark", "group_id", "group_name", "publish_id", "env_id", "env_name",
        "app_id", "app_name", "app_remark", "app_type", "app_creator", "auth_role", "auth_time", "auth_tunnel",
        "visit_param", "roma_app_type")} | {"api_type": S("integer"), "tags": S("array", items=S("string")),
                                          "auth_whitelist": S("array", items=S("string")),
                                          "auth_blacklist": S("array", items=S("string"))}),
    "ApiAuthList": envelope("auths", "ApiAuthInfo", "authorizations"),
}

# ---- parameters -------------------------------------------------------------------------
def path_param(name, desc):
    return {"name": name, "in": "path", "required": True, "description": desc, "schema": S("string", minLength=1)}


def query(name, schema, desc=None, required=False):
    p = {"name": name, "in": "query", "required": required, "schema": schema}
    if desc:
        p["description"] = desc
    return p


# Ids in headers are visible ASCII: an HTTP field value cannot hold control characters (RFC
# 9110 §5.5), and such a request is refused by the HTTP layer (400, no body) before any handler.
HEADER_ID = "^[!-~]+$"

parameters = {
    "project_id": path_param("project_id", "project id (on the market API: the project of the tenant in X-Domain-Id)"),
    "instance_id": path_param("instance_id", "gateway instance id ([instance_id] in the config); unknown is 404"),
    "group_id": path_param("group_id", "API group id"),
    "api_id": path_param("api_id", "API id"),
    "app_id": path_param("app_id", "app id"),
    "app_code_id": path_param("app_code_id", "app code id"),
    "app_auth_id": path_param("app_auth_id", "authorization id"),
    "purchase_id": path_param("purchase_id", "purchase id"),
    "throttle_id": path_param("throttle_id", "request throttling policy id"),
    "strategy_id": path_param("strategy_id", "excluded (special) throttling configuration id"),
    "throttle_binding_id": path_param("throttle_binding_id", "throttling policy binding record id"),
    "XDomainIdRequired": {"name": "X-Domain-Id", "in": "header", "required": True,
                          "schema": S("string", minLength=1, pattern=HEADER_ID),
                          "description": "the tenant's domain id (seller for onsell/off-sell/delist/status; buyer for reserve/purchase)"},
    "XDomainId": {"name": "X-Domain-Id", "in": "header", "required": False, "schema": S("string", pattern=HEADER_ID),
                  "description": "the tenant's domain id; a market principal acts for it"},
    "XProjectId": {"name": "X-Project-Id", "in": "header", "required": False, "schema": S("string", pattern=HEADER_ID),
                   "description": "when sent, must equal the path's project_id"},
    "offset": query("offset", S("integer", default=0), "records to skip; < 0 counts as 0"),
    "limit": query("limit", S("integer", default=20), "page size; <= 0 gives 20, > 500 gives 500"),
    "page_size": query("page_size", S("integer", minimum=1), "page size"),
    "page_no": query("page_no", S("integer", minimum=1), "page number, from 1"),
    "name": query("name", S("string"), "name filter (fuzzy unless precise_search names it)"),
    "precise_search": query("precise_search", S("string"), "parameter names to match exactly"),
}
P = lambda *names: [{"$ref": f"#/components/parameters/{n}"} for n in names]

ERRORS = {
    400: "bad request (APIG.2000 parameter error, APIG.2011/2012 invalid value, APIG.3xxx conflicts)",
    401: "authentication missing or bad (APIG.1002)",
    403: "no permission (APIG.1005, or a market rule: APIG.3406 own group, …)",
    404: "not found (APIG.3001 group, APIG.3002 API, APIG.3004 app, APIG.3009 authorization, APIG.3030 instance)",
    409: "conflict",
    412: "precondition failed",
    500: "internal error (APIG.9999)",
}


def err(code, desc=None):
    return {"description": desc or ERRORS[code], "headers": {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}},
            "content": {"application/json": {"schema": ref("Error")}}}


def ok(code, schema=None, desc="success"):
    r = {"description": desc, "headers": {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}}}
    if schema is not None:
        r["content"] = {"application/json": {"schema": schema}}
    return r


# Seeds 000 (delist) and 003 (reserve) list no 404.
NO_404 = {"MarketDelistGroup", "MarketReserve"}


def op(op_id, summary, tag, success, errors, params=(), body=None, body_required=True, desc=None):
    o = {"operationId": op_id, "summary": summary, "tags": [tag]}
    if desc:
        o["description"] = desc
    if params:
        o["parameters"] = list(params)
    if body is not None:
        o["requestBody"] = {"required": body_required, "content": {"application/json": {"schema": body}}}
    code, schema, sdesc = success
    o["responses"] = {str(code): ok(code, schema, sdesc)}
    # Every operation can meet a bad parameter (400), bad auth (401), a tenant acting outside
    # its domain (403), an unknown instance (404, except where the seed lists no 404: there
    # the contract maps it to 400) and an internal error (500).
    always = {400, 401, 403, 500} | (set() if op_id in NO_404 else {404})
    for e in sorted(set(errors) | always):
        o["responses"][str(e)] = err(e)
    o["responses"]["default"] = {"description": "any other error", "content": {"application/json": {"schema": ref("Error")}}}
    return o


paths = {}


def add(path, method, operation, path_params):
    entry = paths.setdefault(path, {"parameters": P(*path_params)})
    entry[method] = operation


MK = "market"
base = ("project_id", "instance_id")
# ---- market API: CONTRACT §3, rows 1–12 --------------------------------------------------
add(MARKET + "/api-groups/onsell/{group_id}", "put", op(
    "MarketOnsellGroup", "List a group on the market under url_domain (row 1, seed 002)", MK,
    (201, ref("MarketGroup"), "listed"), [403, 404], P("XDomainIdRequired"), ref("OnsellRequest"),
    desc="400 APIG.3305 url_domain taken, APIG.3403 no sellable API, APIG.3420 group delisted."),
    base + ("group_id",))
add(MARKET + "/api-groups/onsell/{group_id}", "delete", op(
    "MarketOffsellGroup", "Take a group off sale (row 2, seed 001)", MK,
    (204, None, "off sale"), [403, 404], P("XDomainIdRequired"),
    desc="Existing buyers keep calling until their calls run out. 404 if the group is not on sale."),
    base + ("group_id",))
add(MARKET + "/api-groups/delist/{group_id}", "delete", op(
    "MarketDelistGroup", "Delist a group: every buyer is refused at once (row 3, seed 000)", MK,
    (204, None, "delisted (also when already delisted)"), [403], P("XDomainIdRequired"),
    desc="Never-listed group or unknown instance: 400."),
    base + ("group_id",))
add(MARKET + "/api-groups/reserve", "post", op(
    "MarketReserve", "Pre-order: create a reserved purchase for a group on sale (row 4, seed 003)", MK,
    (201, ref("ReserveResponse"), "reserved"), [403, 409], P("XDomainIdRequired"), ref("ReserveRequest"),
    desc="409 if the group is not on sale; 403 APIG.3406 for the group's own domain."),
    base)
add(MARKET + "/api-groups/purchase", "post", op(
    "MarketPurchase", "Buy: activate the reserved purchase or create one, with its APP (row 5)", MK,
    (201, ref("PurchaseResponse"), "purchased (the same order_id again returns the same purchase)"),
    [403, 404, 409], P("XDomainIdRequired"), ref("PurchaseRequest")),
    base)
add(MARKET + "/api-groups/status", "post", op(
    "MarketBuyerStatus", "Set a buyer's calls left: unused <= 0 freezes, > 0 unfreezes (row 6)", MK,
    (200, {"type": "object", "description": "a JSON object; its fields are not fixed by the contract"}, "applied"), [403, 404],
    P("XDomainId"), ref("BuyerStatusRequest")),
    base)
add(MARKET + "/api-groups/status/{group_id}", "put", op(
    "MarketGroupLock", "Lock a group for market review (3) or unlock it (2) (row 7)", MK,
    (201, ref("MarketGroup"), "applied"), [403, 404], P("XDomainId"), ref("MarketGroupStatusRequest")),
    base + ("group_id",))
add(MARKET + "/api-groups/tosell", "get", op(
    "MarketListToSell", "Groups that could be listed: with a sellable API (row 8)", MK,
    (200, ref("MarketGroupList"), "groups"), [403, 404], P("XDomainId", "name", "page_size", "page_no")),
    base)
add(MARKET + "/api-groups/onsell", "get", op(
    "MarketListOnSale", "Listed groups (row 9)", MK,
    (200, ref("MarketGroupList"), "groups"), [403, 404], P("XDomainId", "name", "page_size", "page_no")),
    base)
add(MARKET + "/project", "put", op(
    "MarketProjectStatus", "Freeze (3) or unfreeze (1) purchases, e.g. for arrears (row 10)", MK,
    (200, ref("ProjectStatusResponse"), "per-purchase result"), [403, 404], P("XDomainId"), ref("ProjectStatusRequest")),
    base)
add(MARKET + "/unsubscribe/{purchase_id}", "delete", op(
    "MarketUnsubscribe", "End a purchase; its APP stops working (row 11)", MK,
    (204, None, "unsubscribed"), [403, 404], P("XDomainId")),
    base + ("purchase_id",))
add(MARKET + "/purchases", "get", op(
    "MarketListPurchases", "The buyer's purchases (row 12)", MK,
    (200, ref("PurchaseList"), "purchases"), [403, 404], P("XDomainId", "offset", "limit")),
    base)
add(MARKET + "/purchases/{purchase_id}", "get", op(
    "MarketShowPurchase", "One of the buyer's purchases (row 12)", MK,
    (200, ref("Purchase"), "the purchase"), [403, 404], P("XDomainId")),
    base + ("purchase_id",))

# ---- management API: spec/apig-v2-management.md ----------------------------------------
G, A, PUB, ENV, APP, AUTH = "api-groups", "apis", "publishing", "environments", "apps", "app-auths"
XP = P("XProjectId")
add(MGMT + "/api-groups", "post", op("CreateApiGroupV2", "Create an API group", G,
    (201, ref("ApiGroup"), "created"), [403], XP, ref("ApiGroupCreate"),
    desc="400 APIG.3201 name exists."), base)
add(MGMT + "/api-groups", "get", op("ListApiGroupsV2", "List API groups", G,
    (200, ref("ApiGroupList"), "groups"), [403, 404], XP + P("offset", "limit", "name", "precise_search")
    + [query("id", S("string"))]), base)
add(MGMT + "/api-groups/{group_id}", "get", op("ShowDetailsOfApiGroupV2", "Show an API group", G,
    (200, ref("ApiGroup"), "the group"), [403, 404], XP), base + ("group_id",))
add(MGMT + "/api-groups/{group_id}", "put", op("UpdateApiGroupV2", "Update an API group", G,
    (200, ref("ApiGroup"), "updated"), [403, 404], XP, ref("ApiGroupCreate")), base + ("group_id",))
add(MGMT + "/api-groups/{group_id}", "delete", op("DeleteApiGroupV2", "Delete an API group", G,
    (204, None, "deleted"), [403, 404, 412], XP, desc="403 APIG.3415 while the group has APIs."), base + ("group_id",))

add(MGMT + "/apis", "post", op("CreateApiV2", "Create an API", A,
    (201, ref("Api"), "created"), [403, 404], XP, ref("ApiCreate"),
    desc="400 APIG.3202 name exists, APIG.3301 method+URI exists; backend types other than HTTP and MOCK are 400."), base)
add(MGMT + "/apis", "get", op("ListApisV2", "List APIs", A,
    (200, ref("ApiList"), "APIs"), [403, 404], XP + P("offset", "limit", "name", "precise_search") + [
        query("id", S("string")), query("group_id", S("string")), query("req_protocol", S("string")),
        query("req_method", S("string")), query("req_uri", S("string")), query("auth_type", S("string")),
        query("env_id", S("string")), query("type", S("integer")), query("vpc_channel_name", S("string")),
        query("return_data_mode", S("string")), query("tags", S("string"))]), base)
add(MGMT + "/apis/{api_id}", "get", op("ShowDetailsOfApiV2", "Show an API", A,
    (200, ref("Api"), "the API"), [403, 404], XP), base + ("api_id",))
add(MGMT + "/apis/{api_id}", "put", op("UpdateApiV2", "Update an API (a full definition)", A,
    (200, ref("Api"), "updated"), [403, 404], XP, ref("ApiCreate")), base + ("api_id",))
add(MGMT + "/apis/{api_id}", "delete", op("DeleteApiV2", "Delete an API", A,
    (204, None, "deleted"), [403, 404, 409], XP, desc="403 APIG.3416 while published."), base + ("api_id",))
add(MGMT + "/apis/action", "post", op("CreateOrDeletePublishRecordForApiV2", "Publish (online) or take offline one API", PUB,
    (201, ref("PublishRecord"), "publish record"), [403, 404], XP, ref("ApiActionRequest")), base)
add(MGMT + "/apis/publish", "post", op("BatchPublishOrOfflineApiV2", "Publish or take offline APIs in bulk", PUB,
    (200, ref("ApiBatchPublishResponse"), "per-API result"), [403, 404],
    XP + [query("action", S("string", enum=["online", "offline"]), "online | offline", required=True)],
    ref("ApiBatchPublishRequest")), base)
add(MGMT + "/envs", "get", op("ListEnvironmentsV2", "List environments", ENV,
    (200, ref("EnvList"), "environments"), [403, 404], XP + P("offset", "limit", "name")), base)

add(MGMT + "/apps", "post", op("CreateAnAppV2", "Create an app (AppKey/AppSecret)", APP,
    (201, ref("App"), "created, with app_key and app_secret"), [403, 404], XP, ref("AppCreate"),
    desc="400 APIG.3203 name exists, APIG.3310 AppKey exists."), base)
add(MGMT + "/apps", "get", op("ListAppsV2", "List apps", APP,
    (200, ref("AppList"), "apps"), [403, 404], XP + P("offset", "limit", "name", "precise_search") + [
        query("id", S("string")), query("status", S("integer")), query("app_key", S("string")),
        query("creator", S("string")), query("related_domain_id", S("string")), query("related_project_id", S("string"))]), base)
add(MGMT + "/apps/{app_id}", "get", op("ShowDetailsOfAppV2", "Show an app", APP,
    (200, ref("App"), "the app"), [403, 404], XP), base + ("app_id",))
add(MGMT + "/apps/{app_id}", "put", op("UpdateAppV2", "Update an app", APP,
    (200, ref("App"), "updated"), [403, 404], XP, ref("AppCreate")), base + ("app_id",))
add(MGMT + "/apps/{app_id}", "delete", op("DeleteAppV2", "Delete an app", APP,
    (204, None, "deleted"), [403, 404], XP), base + ("app_id",))
add(MGMT + "/apps/secret/{app_id}", "put", op("ResettingAppSecretV2", "Reset an app's secret (generated when no body)", APP,
    (200, ref("App"), "the app with its new app_secret"), [403, 404], XP, ref("AppResetRequest"), body_required=False),
    base + ("app_id",))
add(MGMT + "/apps/validation/{app_id}", "get", op("CheckAppV2", "Check that an app exists", APP,
    (200, ref("AppValidation"), "the app exists"), [403, 404], XP), base + ("app_id",))
add(MGMT + "/apps/{app_id}/app-codes", "post", op("CreateAppCodeV2", "Add an AppCode", APP,
    (201, ref("AppCode"), "created"), [403, 404], XP, ref("AppCodeCreate")), base + ("app_id",))
add(MGMT + "/apps/{app_id}/app-codes", "put", op("CreateAppCodeAutoV2", "Generate an AppCode", APP,
    (201, ref("AppCode"), "generated"), [403, 404], XP), base + ("app_id",))
add(MGMT + "/apps/{app_id}/app-codes", "get", op("ListAppCodesV2", "List an app's AppCodes", APP,
    (200, ref("AppCodeList"), "app codes"), [403, 404], XP + P("offset", "limit")), base + ("app_id",))
add(MGMT + "/apps/{app_id}/app-codes/{app_code_id}", "get", op("ShowDetailsOfAppCodeV2", "Show an AppCode", APP,
    (200, ref("AppCode"), "the app code"), [403, 404], XP), base + ("app_id", "app_code_id"))
add(MGMT + "/apps/{app_id}/app-codes/{app_code_id}", "delete", op("DeleteAppCodeV2", "Delete an AppCode", APP,
    (204, None, "deleted"), [403, 404], XP), base + ("app_id", "app_code_id"))

add(MGMT + "/app-auths", "post", op("CreateAuthorizingAppsV2", "Authorize apps to call APIs in an environment", AUTH,
    (201, ref("ApiAuthCreateResponse"), "authorizations"), [403, 404], XP, ref("ApiAuthCreate"),
    desc="400 APIG.3316 already authorized."), base)
add(MGMT + "/app-auths/binded-apps", "get", op("ListAppsBindedToApiV2", "List the apps authorized to APIs", AUTH,
    (200, ref("ApiAuthList"), "authorizations"), [403, 404], XP + P("offset", "limit") + [
        query("api_id", S("string")), query("app_name", S("string")), query("app_id", S("string")),
        query("env_id", S("string"))]), base)
add(MGMT + "/app-auths/{app_auth_id}", "delete", op("CancelingAuthorizationV2", "Cancel an authorization", AUTH,
    (204, None, "cancelled"), [403, 404], XP), base + ("app_auth_id",))

# ---- independent domains and certificates (docs/domains.md) --------------------------------
DOM, CERT = "domains", "certificates"
CERTS = "/v2/{project_id}/apigw/certificates"
SSL = S("string", "TLSv1.1 | TLSv1.2 (both: TLS 1.2 and up) | TLSv1.3", enum=["TLSv1.1", "TLSv1.2", "TLSv1.3"])
PORT = S("integer", "only -1 (absent): a proxy's listeners serve every domain")
parameters["domain_id"] = path_param("domain_id", "bound domain id")
parameters["certificate_id"] = path_param("certificate_id", "certificate id")
schemas.update({
    "UrlDomainCreate": obj({"url_domain": S("string", "the host name, lower-cased", minLength=1, maxLength=255),
                            "min_ssl_version": SSL, "is_http_redirect_to_https": S("boolean"),
                            "verified_client_certificate_enabled": S("boolean", "only false: no client certificates"),
                            "ingress_http_port": PORT, "ingress_https_port": PORT}, required=("url_domain",)),
    "UrlDomainModify": obj({"min_ssl_version": SSL, "is_http_redirect_to_https": S("boolean"),
                            "verified_client_certificate_enabled": S("boolean", "only false: no client certificates"),
                            "ingress_http_port": PORT, "ingress_https_port": PORT}),
    "UrlDomainRef": obj({"id": S("string"), "url_domain": S("string"), "status": S("integer", "3: marketgate does not check DNS"),
                         "min_ssl_version": S("string"), "is_http_redirect_to_https": S("boolean"),
                         "verified_client_certificate_enabled": S("boolean"), "ssl_id": S("string"), "ssl_name": S("string"),
                         "api_group_id": S("string"), "api_group_name": S("string"), "instance_id": S("string")},
                        required=("id", "url_domain")),
    "CertificateForm": obj({"name": S("string", "4–50 of letters, digits, _ and CJK, starting with a letter or CJK"),
                            "cert_content": S("string", "PEM chain, leaf first"),
                            "private_key": S("string", "PEM private key (RSA, ECDSA or Ed25519); never answered"),
                            "type": S("string", enum=["global", "instance"]), "instance_id": S("string"),
                            "trusted_root_ca": S("string", "only empty: no client certificates"),
                            "algorithm_type": S("string", enum=["RSA", "ECC"]),
                            "cert_content_sign": S("string", "only empty: no SM2"),
                            "private_key_sign": S("string", "only empty: no SM2")},
                           required=("name", "cert_content", "private_key")),
    "Certificate": obj({"id": S("string"), "name": S("string"), "type": S("string"), "instance_id": S("string"),
                        "project_id": S("string"), "common_name": S("string"), "san": S("array", items=S("string")),
                        "version": S("integer"), "organization": S("array", items=S("string")),
                        "organizational_unit": S("array", items=S("string")), "locality": S("array", items=S("string")),
                        "state": S("array", items=S("string")), "country": S("array", items=S("string")),
                        "not_before": TIME, "not_after": TIME, "serial_number": S("string"),
                        "issuer": S("array", items=S("string")), "signature_algorithm": S("string"),
                        "algorithm_type": S("string"), "is_has_trusted_root_ca": S("boolean"),
                        "create_time": TIME, "update_time": TIME},
                       required=("id", "name", "not_after"), desc="a certificate, never its private key"),
    "CertificateList": envelope("certs", "Certificate", "certificates"),
    "AttachOrDetachDomains": obj({"domains": S("array", items=obj({
        "domain": S("string", "a bound domain of the caller's"), "instance_ids": S("array", items=S("string")),
        "verified_client_certificate_enabled": S("boolean")}, required=("domain",)))}, required=("domains",)),
    "BoundDomainList": envelope("bound_domains", "UrlDomainRef", "domains a certificate is attached to"),
})
schemas["UrlDomain"]["properties"].update({
    k: dict(v, nullable=True) for k, v in {
        "is_http_redirect_to_https": S("boolean"), "verified_client_certificate_enabled": S("boolean"),
        "is_has_trusted_root_ca": S("boolean"), "ssl_infos": S("array", items=S("object"))}.items()})
GD = MGMT + "/api-groups/{group_id}/domains"
add(GD, "post", op("AssociateDomainV2", "Bind an independent domain to a group", DOM,
    (201, ref("UrlDomainRef"), "bound"), [403, 404], XP, ref("UrlDomainCreate"),
    desc="400 APIG.3305 the host name answers for a group already; APIG.2012 a sixth domain."), base + ("group_id",))
add(GD + "/{domain_id}", "put", op("UpdateDomainV2", "Change a bound domain's TLS settings", DOM,
    (200, ref("UrlDomainRef"), "changed"), [403, 404], XP, ref("UrlDomainModify")), base + ("group_id", "domain_id"))
add(GD + "/{domain_id}", "delete", op("DisassociateDomainV2", "Unbind a domain", DOM,
    (204, None, "unbound"), [403, 404], XP), base + ("group_id", "domain_id"))
add(GD + "/{domain_id}/certificate", "post", op("AssociateCertificateV2", "Bind a certificate given inline", DOM,
    (201, ref("UrlDomainRef"), "bound"), [403, 404], XP, ref("CertificateForm"),
    desc="400 APIG.2012 naming the rule: parses, key matches, not expired, covers the domain."),
    base + ("group_id", "domain_id"))
add(GD + "/{domain_id}/certificate/{certificate_id}", "get", op(
    "ShowDetailsOfDomainNameCertificateV2", "Show a domain's certificate (never the key)", DOM,
    (200, ref("Certificate"), "the certificate"), [403, 404], XP), base + ("group_id", "domain_id", "certificate_id"))
add(GD + "/{domain_id}/certificate/{certificate_id}", "delete", op(
    "DisassociateCertificateV2", "Unbind a domain's certificate (the certificate stays)", DOM,
    (204, None, "unbound"), [403, 404], XP), base + ("group_id", "domain_id", "certificate_id"))
add(CERTS, "post", op("CreateCertificateV2", "Create a certificate", CERT,
    (201, ref("Certificate"), "created"), [403], XP, ref("CertificateForm"),
    desc="400 APIG.2012 naming the rule: parses, key matches, not expired."), ("project_id",))
add(CERTS, "get", op("ListCertificatesV2", "List certificates", CERT,
    (200, ref("CertificateList"), "certificates"), [403], XP + P("offset", "limit", "name") + [
        query(q, S("string")) for q in ("common_name", "signature_algorithm", "type", "instance_id", "algorithm_type")]),
    ("project_id",))
add(CERTS + "/{certificate_id}", "get", op("ShowDetailsOfCertificateV2", "Show a certificate (never the key)", CERT,
    (200, ref("Certificate"), "the certificate"), [403, 404], XP), ("project_id", "certificate_id"))
add(CERTS + "/{certificate_id}", "put", op("UpdateCertificateV2", "Replace a certificate and key (rotation)", CERT,
    (200, ref("Certificate"), "replaced"), [403, 404], XP, ref("CertificateForm"),
    desc="The new certificate must cover every domain it is attached to."), ("project_id", "certificate_id"))
add(CERTS + "/{certificate_id}", "delete", op("DeleteCertificateV2", "Delete a certificate", CERT,
    (204, None, "deleted"), [403, 404, 409], XP, desc="409 while a domain serves it."), ("project_id", "certificate_id"))
add(CERTS + "/{certificate_id}/domains/attach", "post", op("BatchAssociateDomainsV2", "Attach to bound domains", CERT,
    (204, None, "attached"), [403, 404], XP, ref("AttachOrDetachDomains")), ("project_id", "certificate_id"))
add(CERTS + "/{certificate_id}/domains/detach", "post", op("BatchDisassociateDomainsV2", "Detach from bound domains", CERT,
    (204, None, "detached"), [403, 404], XP, ref("AttachOrDetachDomains")), ("project_id", "certificate_id"))
add(CERTS + "/{certificate_id}/attached-domains", "get", op("ListAttachedDomainsV2", "Domains a certificate serves", CERT,
    (200, ref("BoundDomainList"), "domains"), [403, 404], XP + P("offset", "limit") + [query("url_domain", S("string"))]),
    ("project_id", "certificate_id"))

# ---- request throttling (Huawei APIG v2 throttles, throttle-bindings, throttle-specials) ----
TH = "throttles"
LIMIT = "1 to 2147483647"
THROTTLE_FIELDS = {
    "name": S("string", "3-64 letters, digits, underscores or Chinese characters, starting with a letter; "
                        "unique in the project (400 APIG.3204)"),
    "api_call_limits": S("integer", "calls per window to an API (type 1) or to all bound APIs together (type 2), " + LIMIT),
    "user_call_limits": S("integer", "calls per window per tenant (a market buyer's domain); <= api_call_limits"),
    "app_call_limits": S("integer", "calls per window per app; <= user_call_limits (or api_call_limits)"),
    "ip_call_limits": S("integer", "calls per window per client IP; <= api_call_limits"),
    "time_interval": S("integer", "window length in time_unit, " + LIMIT),
    "time_unit": S("string", enum=["SECOND", "MINUTE", "HOUR", "DAY"]),
    "type": S("integer", "1 exclusive (each bound API counted apart; default), 2 shared", enum=[1, 2]),
    "remark": S("string", maxLength=255),
    "enable_adaptive_control": S("string", "echoed; not enforced", enum=["TRUE", "FALSE"]),
}
schemas.update({
    "ThrottleCreate": obj(THROTTLE_FIELDS, required=("name", "api_call_limits", "time_interval", "time_unit"),
                          desc="ThrottleBaseInfo; a bad value is 400 APIG.2012 naming the field and the rule"),
    "Throttle": obj(THROTTLE_FIELDS | {"id": S("string"), "bind_num": S("integer", "APIs bound"),
                                       "is_inclu_special_throttle": S("integer", "1: has exceptions, 2: none"),
                                       "create_time": TIME},
                    required=("id", "name", "api_call_limits", "time_interval", "time_unit", "type"),
                    desc="ThrottlesInfo: a request throttling policy"),
    "ThrottleList": envelope("throttles", "Throttle", "request throttling policies"),
    "ThrottleForApi": obj(THROTTLE_FIELDS | {"id": S("string"), "create_time": TIME, "env_name": S("string"),
                                             "bind_id": S("string"), "bind_time": TIME},
                          desc="ThrottleForApi: a policy bound to the API"),
    "ThrottleForApiList": envelope("throttles", "ThrottleForApi", "policies bound to an API"),
    "ThrottleBindingCreate": obj({"strategy_id": S("string", "the policy"),
                                  "publish_ids": S("array", "RELEASE publications of the caller's APIs; an API takes "
                                                            "one policy per environment (400 APIG.3312)",
                                                   items=S("string"))},
                                 required=("strategy_id", "publish_ids")),
    "ThrottleBinding": obj({"id": S("string"), "publish_id": S("string"), "scope": S("integer"),
                            "strategy_id": S("string"), "apply_time": TIME}),
    "ThrottleBindingCreateResponse": obj({"throttle_applys": S("array", items=ref("ThrottleBinding"))},
                                         required=("throttle_applys",)),
    "ThrottleBindingBatchDelete": obj({"throttle_bindings": S("array", items=S("string"))}),
    "ThrottleBindingBatchResult": obj({
        "success_count": S("integer"),
        "failure": S("array", items=obj({k: S("string") for k in
                                         ("bind_id", "error_code", "error_msg", "api_id", "api_name")}))},
        required=("success_count", "failure")),
    "ApiForThrottle": obj({k: S("string") for k in (
        "id", "name", "remark", "auth_type", "req_method", "req_uri", "group_id", "group_name", "publish_id",
        "run_env_id", "run_env_name", "throttle_apply_id", "apply_time", "throttle_name")}
        | {"type": S("integer"), "tags": S("array", items=S("string"))}),
    "ApiForThrottleList": envelope("apis", "ApiForThrottle", "published APIs"),
    "ThrottleSpecialCreate": obj({"call_limits": S("integer", LIMIT),
                                  "object_id": S("string", "an app id (APP; 404 APIG.3004 if none) or a tenant's "
                                                           "domain id (USER)"),
                                  "object_type": S("string", enum=["APP", "USER"])},
                                 required=("call_limits", "object_id", "object_type")),
    "ThrottleSpecialUpdate": obj({"call_limits": S("integer", LIMIT)}, required=("call_limits",)),
    "ThrottleSpecial": obj({k: S("string") for k in (
        "id", "throttle_id", "object_id", "object_type", "object_name", "app_id", "app_name")}
        | {"call_limits": S("integer"), "apply_time": TIME}),
    "ThrottleSpecialList": envelope("throttle_specials", "ThrottleSpecial", "a policy's exceptions"),
})
add(MGMT + "/throttles", "post", op("CreateRequestThrottlingPolicyV2", "Create a request throttling policy", TH,
    (201, ref("Throttle"), "created"), [403, 404], XP, ref("ThrottleCreate"),
    desc="400 APIG.2012 names the field and the rule; 400 APIG.3204 name exists."), base)
add(MGMT + "/throttles", "get", op("ListRequestThrottlingPolicyV2", "List request throttling policies", TH,
    (200, ref("ThrottleList"), "policies"), [403, 404], XP + P("offset", "limit", "name", "precise_search")
    + [query("id", S("string"))]), base)
add(MGMT + "/throttles/{throttle_id}", "get", op("ShowDetailsOfRequestThrottlingPolicyV2",
    "Show a request throttling policy", TH, (200, ref("Throttle"), "the policy"), [403, 404], XP,
    desc="404 APIG.3005."), base + ("throttle_id",))
add(MGMT + "/throttles/{throttle_id}", "put", op("UpdateRequestThrottlingPolicyV2",
    "Update a request throttling policy", TH, (200, ref("Throttle"), "updated"), [403, 404], XP,
    ref("ThrottleCreate")), base + ("throttle_id",))
add(MGMT + "/throttles/{throttle_id}", "delete", op("DeleteRequestThrottlingPolicyV2",
    "Delete a request throttling policy, with its bindings and exceptions", TH, (204, None, "deleted"),
    [403, 404], XP), base + ("throttle_id",))
add(MGMT + "/throttles/{throttle_id}/throttle-specials", "post", op("CreateSpecialThrottlingConfigurationV2",
    "Create an excluded throttling configuration: an APP's or a tenant's own limit", TH,
    (201, ref("ThrottleSpecial"), "created"), [403, 404], XP, ref("ThrottleSpecialCreate"),
    desc="400 APIG.3318 the object already has one."), base + ("throttle_id",))
add(MGMT + "/throttles/{throttle_id}/throttle-specials", "get", op("ListSpecialThrottlingConfigurationsV2",
    "List a policy's excluded configurations", TH, (200, ref("ThrottleSpecialList"), "exceptions"), [403, 404],
    XP + P("offset", "limit") + [query("object_type", S("string")), query("app_name", S("string")),
                                 query("user", S("string"))]), base + ("throttle_id",))
add(MGMT + "/throttles/{throttle_id}/throttle-specials/{strategy_id}", "put", op(
    "UpdateSpecialThrottlingConfigurationV2", "Update an excluded configuration's call_limits", TH,
    (200, ref("ThrottleSpecial"), "updated"), [403, 404], XP, ref("ThrottleSpecialUpdate"),
    desc="404 APIG.3018."), base + ("throttle_id", "strategy_id"))
add(MGMT + "/throttles/{throttle_id}/throttle-specials/{strategy_id}", "delete", op(
    "DeleteSpecialThrottlingConfigurationV2", "Delete an excluded configuration", TH,
    (204, None, "deleted"), [403, 404], XP), base + ("throttle_id", "strategy_id"))
add(MGMT + "/throttle-bindings", "post", op("AssociateRequestThrottlingPolicyV2",
    "Bind a policy to published APIs", TH, (201, ref("ThrottleBindingCreateResponse"), "bound"), [403, 404], XP,
    ref("ThrottleBindingCreate"),
    desc="404 APIG.3005 policy, APIG.3002 publication; 400 APIG.3312 already bound."), base)
add(MGMT + "/throttle-bindings", "put", op("BatchDisassociateThrottlingPolicyV2",
    "Unbind binding records in a batch (action=delete)", TH,
    (200, ref("ThrottleBindingBatchResult"), "the records unbound and those that could not be"), [403, 404],
    XP + [query("action", S("string", enum=["delete"]), "must be delete", required=True)],
    ref("ThrottleBindingBatchDelete")), base)
BOUND_QUERY = XP + P("offset", "limit") + [
    query("throttle_id", S("string"), "the policy", required=True), query("env_id", S("string")),
    query("group_id", S("string")), query("api_id", S("string")), query("api_name", S("string"))]
add(MGMT + "/throttle-bindings/binded-apis", "get", op("ListApisBindedToRequestThrottlingPolicyV2",
    "APIs bound to a policy", TH, (200, ref("ApiForThrottleList"), "APIs"), [403, 404], BOUND_QUERY), base)
add(MGMT + "/throttle-bindings/unbinded-apis", "get", op("ListApisUnbindedToRequestThrottlingPolicyV2",
    "Published APIs not bound to a policy", TH, (200, ref("ApiForThrottleList"), "APIs"), [403, 404],
    BOUND_QUERY + [query("tags", S("string"))]), base)
add(MGMT + "/throttle-bindings/binded-throttles", "get", op("ListRequestThrottlingPoliciesBindedToApiV2",
    "Policies bound to an API", TH, (200, ref("ThrottleForApiList"), "policies"), [403, 404],
    XP + P("offset", "limit") + [query("api_id", S("string"), "the API", required=True),
                                 query("throttle_id", S("string")), query("throttle_name", S("string")),
                                 query("env_id", S("string"))]), base)
add(MGMT + "/throttle-bindings/{throttle_binding_id}", "delete", op("DisassociateRequestThrottlingPolicyV2",
    "Unbind one binding record", TH, (204, None, "unbound"), [403, 404], XP, desc="404 APIG.3010."),
    base + ("throttle_binding_id",))

# ---- the document itself ---------------------------------------------------------------
paths["/openapi.json"] = {"get": {
    "operationId": "GetOpenApiDocument", "summary": "This document (no authentication)", "tags": ["meta"],
    "security": [],
    "responses": {"200": {"description": "the OpenAPI 3.0.3 document",
                          "content": {"application/json": {"schema": {"type": "object"}}}}},
}}

doc = {
    "openapi": "3.0.3",
    "info": {
        "title": "marketgate control plane: market API and APIG v2 management API",
        "version": "1.0.0",
        "description": (
            "Served by the control plane at GET /openapi.json (control listener). The market API "
            "(base /v1/{project_id}/apigw/instances/{instance_id}/market) is called by the cloud market; "
            "the management API (base /v2/{project_id}/apigw/instances/{instance_id}) is the Huawei "
            "APIG v2 subset that sellers and the huaweicloudsdkapig SDK use. Every response carries "
            "X-Request-Id; errors have the body {error_code, error_msg, request_id}. Generated by "
            "deploy/openapi/generate.py."),
        "license": {"name": "see the repository"},
    },
    "servers": [{"url": "http://127.0.0.1:8081", "description": "marketgate serve with built-in defaults"}],
    "security": [{"AuthToken": []}, {"SdkHmac": []}],
    "tags": [{"name": t} for t in (MK, G, A, PUB, ENV, APP, AUTH, DOM, CERT, TH, "meta")],
    "paths": dict(sorted(paths.items())),
    "components": {
        "securitySchemes": {
            "AuthToken": {"type": "apiKey", "in": "header", "name": "X-Auth-Token",
                          "description": "a token of [[control.tokens]]; `Authorization: Bearer <token>` works too"},
            "SdkHmac": {"type": "apiKey", "in": "header", "name": "Authorization",
                        "description": "`SDK-HMAC-SHA256 Access=<AK>, SignedHeaders=<h1;h2>, Signature=<hex>` with "
                                       "X-Sdk-Date, verified against [[control.credentials]] (what the Huawei SDK sends)"},
        },
        "headers": {"X-Request-Id": {"description": "request id, also in error bodies", "schema": S("string")}},
        "parameters": parameters,
        "schemas": dict(sorted(schemas.items())),
    },
}

text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
if "--check" in sys.argv:
    if OUT.read_text() != text:
        sys.exit("docs/openapi.json is out of date: run python3 deploy/openapi/generate.py")
    print("docs/openapi.json is up to date")
else:
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}: {len(paths)} paths, "
          f"{sum(1 for v in paths.values() for k in v if k != 'parameters')} operations")
