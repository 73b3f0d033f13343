"""A throwaway CA with a server certificate for 127.0.0.1 and a client certificate, for TLS tests of the broker,
of downloads and of the server's mutual TLS."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path


def make_test_ca(d: Path) -> Path:
    """Write ``ca.pem``, ``server.pem`` and ``server.key`` (127.0.0.1 and localhost), and ``client.pem`` and
    ``client.key`` (a client certificate the CA signed) into ``d``; return the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def cert(subject, issuer, pub, signer, ca, san=None, usage=None):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])).public_key(pub)
             .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
             .not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if usage:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return b.sign(signer, hashes.SHA256())

    d.mkdir(parents=True, exist_ok=True)
    ca_key, srv_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("edgerun test CA", "edgerun test CA", ca_key.public_key(), ca_key, True)
    srv = cert("127.0.0.1", "edgerun test CA", srv_key.public_key(), ca_key, False,
               [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    pem = serialization.Encoding.PEM
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    (d / "server.pem").write_bytes(srv.public_bytes(pem))
    (d / "server.key").write_bytes(srv_key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                                         serialization.NoEncryption()))
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = cert("edgerun test client", "edgerun test CA", client_key.public_key(), ca_key, False,
                  usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    (d / "client.pem").write_bytes(client.public_bytes(pem))
    (d / "client.key").write_bytes(client_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
    return d / "ca.pem"
