"""Request throttling policies driven by Huawei's own SDK (`huaweicloudsdkapig`) against the
real `marketgate control` binary (SQLite, and PostgreSQL when reachable): the fixtures of
test_management_sdk.py. Creates a policy, binds it to published APIs, lists the bound and
unbound APIs and the policies bound to an API, adds, updates and deletes per-APP and
per-tenant exceptions, unbinds (one and a batch) and deletes; bad input arrives as
`ClientRequestException` with Huawei's codes.
"""

from huaweicloudsdkapig.v2 import (
    ApiActionInfo,
    AppCreate,
    AssociateRequestThrottlingPolicyV2Request,
    BatchDisassociateThrottlingPolicyV2Request,
    CreateAnAppV2Request,
    CreateApiGroupV2Request,
    CreateApiV2Request,
    CreateOrDeletePublishRecordForApiV2Request,
    CreateRequestThrottlingPolicyV2Request,
    CreateSpecialThrottlingConfigurationV2Request,
    DeleteRequestThrottlingPolicyV2Request,
    DeleteSpecialThrottlingConfigurationV2Request,
    DisassociateRequestThrottlingPolicyV2Request,
    ApiGroupCreate,
    ListApisBindedToRequestThrottlingPolicyV2Request,
    ListApisUnbindedToRequestThrottlingPolicyV2Request,
    ListRequestThrottlingPoliciesBindedToApiV2Request,
    ListRequestThrottlingPolicyV2Request,
    ListSpecialThrottlingConfigurationsV2Request,
    ShowDetailsOfRequestThrottlingPolicyV2Request,
    ThrottleApiBindingCreate,
    ThrottleBaseInfo,
    ThrottleBindingBatchDelete,
    ThrottleSpecialCreate,
    ThrottleSpecialUpdate,
    UpdateRequestThrottlingPolicyV2Request,
    UpdateSpecialThrottlingConfigurationV2Request,
)

from test_management_sdk import (  # noqa: F401 (pytest fixtures)
    INSTANCE,
    RELEASE,
    api_body,
    apig,
    expect_error,
    marketgate_control,
)


def policy(name, api=100, user=None, app=None, ip=None, interval=1, unit="MINUTE", kind=1):
    return ThrottleBaseInfo(
        name=name,
        api_call_limits=api,
        user_call_limits=user,
        app_call_limits=app,
        ip_call_limits=ip,
        time_interval=interval,
        time_unit=unit,
        type=kind,
        remark="sdk",
    )


def test_sdk_throttling_policies_bindings_and_exceptions(apig):
    group = apig.create_api_group_v2(
        CreateApiGroupV2Request(instance_id=INSTANCE, body=ApiGroupCreate(name="sdk_throttle_group"))
    )
    publish_ids = {}
    for name, uri in (("sdk_paced_one", "/paced/{id}"), ("sdk_paced_two", "/paced2/{id}")):
        api = apig.create_api_v2(CreateApiV2Request(instance_id=INSTANCE, body=api_body(group.id, name, uri)))
        record = apig.create_or_delete_publish_record_for_api_v2(
            CreateOrDeletePublishRecordForApiV2Request(
                instance_id=INSTANCE, body=ApiActionInfo(action="online", env_id=RELEASE, api_id=api.id)
            )
        )
        publish_ids[api.id] = record.publish_id
    (api_one, api_two) = publish_ids

    created = apig.create_request_throttling_policy_v2(
        CreateRequestThrottlingPolicyV2Request(instance_id=INSTANCE, body=policy("sdk_policy", user=50, app=10))
    )
    assert created.status_code == 201
    assert (created.api_call_limits, created.user_call_limits, created.app_call_limits) == (100, 50, 10)
    assert created.time_unit == "MINUTE" and created.type == 1 and created.bind_num == 0
    shown = apig.show_details_of_request_throttling_policy_v2(
        ShowDetailsOfRequestThrottlingPolicyV2Request(instance_id=INSTANCE, throttle_id=created.id)
    )
    assert shown.name == "sdk_policy" and shown.is_inclu_special_throttle == 2
    updated = apig.update_request_throttling_policy_v2(
        UpdateRequestThrottlingPolicyV2Request(
            instance_id=INSTANCE, throttle_id=created.id, body=policy("sdk_policy", user=50, app=20, ip=30)
        )
    )
    assert updated.app_call_limits == 20 and updated.ip_call_limits == 30
    listed = apig.list_request_throttling_policy_v2(
        ListRequestThrottlingPolicyV2Request(instance_id=INSTANCE, name="sdk_pol")
    )
    assert listed.total == 1 and listed.throttles[0].id == created.id

    # Bind to the first API by its publication; the second stays unbound.
    bound = apig.associate_request_throttling_policy_v2(
        AssociateRequestThrottlingPolicyV2Request(
            instance_id=INSTANCE,
            body=ThrottleApiBindingCreate(strategy_id=created.id, publish_ids=[publish_ids[api_one]]),
        )
    )
    assert len(bound.throttle_applys) == 1
    binding = bound.throttle_applys[0]
    assert binding.publish_id == publish_ids[api_one] and binding.strategy_id == created.id
    apis = apig.list_apis_binded_to_request_throttling_policy_v2(
        ListApisBindedToRequestThrottlingPolicyV2Request(instance_id=INSTANCE, throttle_id=created.id)
    )
    assert apis.total == 1 and apis.apis[0].id == api_one and apis.apis[0].throttle_apply_id == binding.id
    unbound = apig.list_apis_unbinded_to_request_throttling_policy_v2(
        ListApisUnbindedToRequestThrottlingPolicyV2Request(
            instance_id=INSTANCE, throttle_id=created.id, group_id=group.id
        )
    )
    assert [a.id for a in unbound.apis] == [api_two]
    policies = apig.list_request_throttling_policies_binded_to_api_v2(
        ListRequestThrottlingPoliciesBindedToApiV2Request(instance_id=INSTANCE, api_id=api_one)
    )
    assert policies.total == 1 and policies.throttles[0].bind_id == binding.id

    # Exceptions: an app's and a tenant's own limits.
    app = apig.create_an_app_v2(CreateAnAppV2Request(instance_id=INSTANCE, body=AppCreate(name="sdk_paced_app")))
    special = apig.create_special_throttling_configuration_v2(
        CreateSpecialThrottlingConfigurationV2Request(
            instance_id=INSTANCE,
            throttle_id=created.id,
            body=ThrottleSpecialCreate(call_limits=40, object_id=app.id, object_type="APP"),
        )
    )
    assert special.status_code == 201 and special.app_name == "sdk_paced_app"
    tenant = apig.create_special_throttling_configuration_v2(
        CreateSpecialThrottlingConfigurationV2Request(
            instance_id=INSTANCE,
            throttle_id=created.id,
            body=ThrottleSpecialCreate(call_limits=45, object_id="buyer-domain-1", object_type="USER"),
        )
    )
    specials = apig.list_special_throttling_configurations_v2(
        ListSpecialThrottlingConfigurationsV2Request(instance_id=INSTANCE, throttle_id=created.id)
    )
    assert specials.total == 2
    apps_only = apig.list_special_throttling_configurations_v2(
        ListSpecialThrottlingConfigurationsV2Request(instance_id=INSTANCE, throttle_id=created.id, object_type="APP")
    )
    assert [s.id for s in apps_only.throttle_specials] == [special.id]
    changed = apig.update_special_throttling_configuration_v2(
        UpdateSpecialThrottlingConfigurationV2Request(
            instance_id=INSTANCE, throttle_id=created.id, strategy_id=special.id,
            body=ThrottleSpecialUpdate(call_limits=35),
        )
    )
    assert changed.call_limits == 35
    apig.delete_special_throttling_configuration_v2(
        DeleteSpecialThrottlingConfigurationV2Request(
            instance_id=INSTANCE, throttle_id=created.id, strategy_id=tenant.id
        )
    )

    # Bad input: Huawei's codes, as ClientRequestException.
    expect_error(
        lambda: apig.create_request_throttling_policy_v2(
            CreateRequestThrottlingPolicyV2Request(instance_id=INSTANCE, body=policy("sdk_bad", api=10, user=11))
        ),
        400,
        "APIG.2012",
    )
    expect_error(
        lambda: apig.create_request_throttling_policy_v2(
            CreateRequestThrottlingPolicyV2Request(instance_id=INSTANCE, body=policy("sdk_bad", unit="WEEK"))
        ),
        400,
        "APIG.2012",
    )
    expect_error(
        lambda: apig.create_request_throttling_policy_v2(
            CreateRequestThrottlingPolicyV2Request(instance_id=INSTANCE, body=policy("sdk_policy"))
        ),
        400,
        "APIG.3204",
    )
    expect_error(
        lambda: apig.associate_request_throttling_policy_v2(
            AssociateRequestThrottlingPolicyV2Request(
                instance_id=INSTANCE,
                body=ThrottleApiBindingCreate(strategy_id=created.id, publish_ids=[publish_ids[api_one]]),
            )
        ),
        400,
        "APIG.3312",
    )
    expect_error(
        lambda: apig.show_details_of_request_throttling_policy_v2(
            ShowDetailsOfRequestThrottlingPolicyV2Request(instance_id=INSTANCE, throttle_id="nope")
        ),
        404,
        "APIG.3005",
    )
    expect_error(
        lambda: apig.create_special_throttling_configuration_v2(
            CreateSpecialThrottlingConfigurationV2Request(
                instance_id=INSTANCE,
                throttle_id=created.id,
                body=ThrottleSpecialCreate(call_limits=5, object_id="no-such-app", object_type="APP"),
            )
        ),
        404,
        "APIG.3004",
    )
    expect_error(
        lambda: apig.disassociate_request_throttling_policy_v2(
            DisassociateRequestThrottlingPolicyV2Request(instance_id=INSTANCE, throttle_binding_id="nope")
        ),
        404,
        "APIG.3010",
    )

    # Unbind: the second API bound then unbound alone, the first by the batch.
    second = apig.associate_request_throttling_policy_v2(
        AssociateRequestThrottlingPolicyV2Request(
            instance_id=INSTANCE,
            body=ThrottleApiBindingCreate(strategy_id=created.id, publish_ids=[publish_ids[api_two]]),
        )
    )
    apig.disassociate_request_throttling_policy_v2(
        DisassociateRequestThrottlingPolicyV2Request(
            instance_id=INSTANCE, throttle_binding_id=second.throttle_applys[0].id
        )
    )
    batch = apig.batch_disassociate_throttling_policy_v2(
        BatchDisassociateThrottlingPolicyV2Request(
            instance_id=INSTANCE, action="delete", body=ThrottleBindingBatchDelete(throttle_bindings=[binding.id, "nope"])
        )
    )
    assert batch.success_count == 1
    assert [f.bind_id for f in batch.failure] == ["nope"] and batch.failure[0].error_code == "APIG.3010"
    apis = apig.list_apis_binded_to_request_throttling_policy_v2(
        ListApisBindedToRequestThrottlingPolicyV2Request(instance_id=INSTANCE, throttle_id=created.id)
    )
    assert apis.total == 0

    apig.delete_request_throttling_policy_v2(
        DeleteRequestThrottlingPolicyV2Request(instance_id=INSTANCE, throttle_id=created.id)
    )
    listed = apig.list_request_throttling_policy_v2(ListRequestThrottlingPolicyV2Request(instance_id=INSTANCE))
    assert listed.total == 0
