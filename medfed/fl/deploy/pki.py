"""The deployment's transport credentials, made locally with ``cryptography``.

* TLS: a throw-away certificate authority signs the SuperLink's server certificate (subject
  alternative names 127.0.0.1 and localhost); the CA's private key is never written, so no
  further certificate can be issued under it. SuperNodes and ``flwr`` trust ``ca.crt`` only.
* SuperNode authentication: each hospital's EC P-384 key pair in OpenSSH format (what
  ``ssh-keygen -t ecdsa -b 384`` writes and Flower's ``--auth-supernode-private-key``
  reads); the SuperLink accepts only nodes whose public key was registered with
  ``flwr supernode register``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medfed.fl.workspace import write_private

#: How long the deployment's certificates are valid: one run, with room for clock skew.
VALIDITY = dt.timedelta(days=1)


@dataclass(frozen=True)
class TlsFiles:
    """The SuperLink's TLS material: the CA certificate everyone trusts, its own cert and key."""

    ca_certificate: Path
    certificate: Path
    private_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_tls(directory: Path, host: str = "127.0.0.1") -> TlsFiles:
    """A fresh CA and a server certificate for ``host`` (and localhost) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    server_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("medfed deployment CA")

    def builder(subject: x509.Name, public_key) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
        )

    ca = (
        builder(ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(host))]
    server = (
        builder(_name(host), server_key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    files = TlsFiles(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    files.ca_certificate.write_bytes(ca.public_bytes(ser.Encoding.PEM))
    files.certificate.write_bytes(server.public_bytes(ser.Encoding.PEM))
    write_private(
        files.private_key,
        server_key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()),
    )
    return files


def make_node_auth_key(private_path: Path) -> bytes:
    """A SuperNode's EC P-384 key: the private key to ``private_path`` (0600, OpenSSH);
    returns the public key in OpenSSH format (for ``flwr supernode register``)."""
    key = ec.generate_private_key(ec.SECP384R1())
    write_private(
        private_path,
        key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption()),
    )
    return key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH) + b"\n"
