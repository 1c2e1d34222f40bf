"""Sellers' domains and certificates driven by Huawei's own SDK (`huaweicloudsdkapig`)
against the real `marketgate control` binary, over SQLite and PostgreSQL (the fixtures of
`test_management_sdk`): bind a domain to a group, create a certificate made here
(`cryptography`) and attach it, bind one inline, read `not_after` back, rotate, unbind; and
the refusals of bad certificates (wrong key, expired, not covering the domain), each naming
its rule in Huawei's error body.
"""

import datetime

from huaweicloudsdkapig.v2 import (
    ApiGroupCreate,
    AssociateCertificateV2Request,
    AssociateDomainV2Request,
    AttachOrDetachDomainInfo,
    AttachOrDetachDomainsReqBody,
    BatchAssociateDomainsV2Request,
    BatchDisassociateDomainsV2Request,
    CertForm,
    CertificateForm,
    CreateApiGroupV2Request,
    CreateCertificateV2Request,
    DeleteCertificateV2Request,
    DisassociateCertificateV2Request,
    DisassociateDomainV2Request,
    ListAttachedDomainsV2Request,
    ListCertificatesV2Request,
    ShowDetailsOfApiGroupV2Request,
    ShowDetailsOfCertificateV2Request,
    UpdateCertificateV2Request,
    UpdateDomainV2Request,
    UrlDomainCreate,
    UrlDomainModify,
)

from certificates import made
from test_management_sdk import INSTANCE, apig, expect_error, marketgate_control  # noqa: F401

DOMAIN = "api.sdk-seller.test"


def as_utc(value):
    """The SDK's `not_after`: a datetime, or the RFC 3339 text when it keeps it as such."""
    if isinstance(value, str):
        value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value.astimezone(datetime.timezone.utc)


def cert_form(name, cert, key_pem=None):
    return CertificateForm(name=name, cert_content=cert.cert_pem, private_key=key_pem or cert.key_pem)


def test_sdk_binds_a_domain_creates_attaches_and_rotates_a_certificate(apig):
    group = apig.create_api_group_v2(
        CreateApiGroupV2Request(instance_id=INSTANCE, body=ApiGroupCreate(name="sdk_domains_group"))
    )
    bound = apig.associate_domain_v2(
        AssociateDomainV2Request(
            instance_id=INSTANCE,
            group_id=group.id,
            body=UrlDomainCreate(url_domain=DOMAIN, min_ssl_version="TLSv1.2", is_http_redirect_to_https=True),
        )
    )
    assert bound.status_code == 201
    assert (bound.url_domain, bound.min_ssl_version, bound.is_http_redirect_to_https) == (DOMAIN, "TLSv1.2", True)

    cert = made([DOMAIN])
    created = apig.create_certificate_v2(CreateCertificateV2Request(body=cert_form("sdk_cert_one", cert)))
    assert created.status_code == 201
    assert as_utc(created.not_after) == cert.not_after
    assert created.common_name == DOMAIN and created.san == [DOMAIN]
    assert "private_key" not in created.to_json_object()
    attached = apig.batch_associate_domains_v2(
        BatchAssociateDomainsV2Request(
            certificate_id=created.id,
            body=AttachOrDetachDomainsReqBody(domains=[AttachOrDetachDomainInfo(domain=DOMAIN)]),
        )
    )
    assert attached.status_code == 204
    domains = apig.list_attached_domains_v2(ListAttachedDomainsV2Request(certificate_id=created.id))
    assert [d.url_domain for d in domains.bound_domains] == [DOMAIN]
    assert domains.bound_domains[0].ssl_id == created.id
    shown = apig.show_details_of_api_group_v2(ShowDetailsOfApiGroupV2Request(instance_id=INSTANCE, group_id=group.id))
    assert [(d.domain, d.ssl_id, d.min_ssl_version) for d in shown.url_domains] == [(DOMAIN, created.id, "TLSv1.2")]

    # Show and list never carry the key.
    detail = apig.show_details_of_certificate_v2(ShowDetailsOfCertificateV2Request(certificate_id=created.id))
    assert as_utc(detail.not_after) == cert.not_after
    listed = apig.list_certificates_v2(ListCertificatesV2Request(name="sdk_cert_one"))
    assert listed.total == 1 and listed.certs[0].id == created.id
    for answer in (detail, listed):
        assert "PRIVATE KEY" not in str(answer.to_json_object())

    # Rotation in place: a new key pair, the same certificate id, a later not_after.
    rotated = made([DOMAIN], days=400)
    replaced = apig.update_certificate_v2(
        UpdateCertificateV2Request(certificate_id=created.id, body=cert_form("sdk_cert_one", rotated))
    )
    assert replaced.id == created.id and as_utc(replaced.not_after) == rotated.not_after

    # A certificate bound inline replaces the attached one on the domain.
    inline = made([DOMAIN])
    swapped = apig.associate_certificate_v2(
        AssociateCertificateV2Request(
            instance_id=INSTANCE,
            group_id=group.id,
            domain_id=bound.id,
            body=CertForm(name="sdk_cert_inline", cert_content=inline.cert_pem, private_key=inline.key_pem),
        )
    )
    assert swapped.status_code == 201 and swapped.ssl_id != created.id
    changed = apig.update_domain_v2(
        UpdateDomainV2Request(
            instance_id=INSTANCE, group_id=group.id, domain_id=bound.id, body=UrlDomainModify(min_ssl_version="TLSv1.3")
        )
    )
    assert changed.min_ssl_version == "TLSv1.3"

    # Unbind and clean up: the old certificate is free to delete, the inline one once unbound.
    apig.delete_certificate_v2(DeleteCertificateV2Request(certificate_id=created.id))
    apig.disassociate_certificate_v2(
        DisassociateCertificateV2Request(
            instance_id=INSTANCE, group_id=group.id, domain_id=bound.id, certificate_id=swapped.ssl_id
        )
    )
    apig.delete_certificate_v2(DeleteCertificateV2Request(certificate_id=swapped.ssl_id))
    apig.disassociate_domain_v2(DisassociateDomainV2Request(instance_id=INSTANCE, group_id=group.id, domain_id=bound.id))
    shown = apig.show_details_of_api_group_v2(ShowDetailsOfApiGroupV2Request(instance_id=INSTANCE, group_id=group.id))
    assert shown.url_domains == []


def test_sdk_bad_certificates_are_refused_with_their_rule(apig):
    group = apig.create_api_group_v2(
        CreateApiGroupV2Request(instance_id=INSTANCE, body=ApiGroupCreate(name="sdk_refusals_group"))
    )
    domain = "api.sdk-refused.test"
    bound = apig.associate_domain_v2(
        AssociateDomainV2Request(instance_id=INSTANCE, group_id=group.id, body=UrlDomainCreate(url_domain=domain))
    )
    good = made([domain])
    other = made([domain])

    def create(name, form):
        return lambda: apig.create_certificate_v2(CreateCertificateV2Request(body=form))

    expect_error(
        create("wrong key", cert_form("sdk_wrong_key", good, other.key_pem)),
        400,
        "APIG.2012",
        "private_key must match the certificate's public key",
    )
    expect_error(
        create("expired", cert_form("sdk_expired", made([domain], days=-1))),
        400,
        "APIG.2012",
        "cert_content must not be expired",
    )
    elsewhere = made(["elsewhere.sdk.test"])
    expect_error(
        lambda: apig.associate_certificate_v2(
            AssociateCertificateV2Request(
                instance_id=INSTANCE,
                group_id=group.id,
                domain_id=bound.id,
                body=CertForm(name="sdk_elsewhere", cert_content=elsewhere.cert_pem, private_key=elsewhere.key_pem),
            )
        ),
        400,
        "APIG.2012",
        f"cert_content must cover the domain {domain}",
    )
    free = apig.create_certificate_v2(CreateCertificateV2Request(body=cert_form("sdk_elsewhere", elsewhere)))
    expect_error(
        lambda: apig.batch_associate_domains_v2(
            BatchAssociateDomainsV2Request(
                certificate_id=free.id,
                body=AttachOrDetachDomainsReqBody(domains=[AttachOrDetachDomainInfo(domain=domain)]),
            )
        ),
        400,
        "APIG.2012",
        f"must cover the domain {domain}",
    )
    expect_error(
        lambda: apig.batch_disassociate_domains_v2(
            BatchDisassociateDomainsV2Request(
                certificate_id=free.id,
                body=AttachOrDetachDomainsReqBody(domains=[AttachOrDetachDomainInfo(domain=domain)]),
            )
        ),
        404,
        "APIG.3020",
    )
    # A host name answers for one group only.
    expect_error(
        lambda: apig.associate_domain_v2(
            AssociateDomainV2Request(instance_id=INSTANCE, group_id=group.id, body=UrlDomainCreate(url_domain=domain))
        ),
        400,
        "APIG.3305",
    )
    expect_error(
        lambda: apig.show_details_of_certificate_v2(ShowDetailsOfCertificateV2Request(certificate_id="nope")),
        404,
        "APIG.3021",
    )
