"""Self-signed certificates made by the Python suites (`cryptography`), for the domain and
certificate API: PEM chain, PEM key, and the leaf's notAfter.
"""

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


class Made:
    def __init__(self, cert_pem, key_pem, not_after):
        self.cert_pem = cert_pem
        self.key_pem = key_pem
        self.not_after = not_after

    def key_needle(self):
        """A line of the key's base64: found in a log line even where the PEM's newlines were
        escaped."""
        return self.key_pem.splitlines()[1]


def made(names, days=365, key=None):
    """A certificate for `names` (the first is the common name), valid from a day ago until
    `days` from now (negative: expired), signed by `key` (a new P-256 key by default)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    not_after = now + datetime.timedelta(days=days)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(min(now - datetime.timedelta(days=1), not_after - datetime.timedelta(days=1)))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return Made(cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem, not_after)
