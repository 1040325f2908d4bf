"""A local certificate authority and a server certificate signed by it.

``python -m infra.certs <dir> [--host NAME ...]`` writes ``ca.crt``/``ca.key`` (CA:TRUE) and
``server.crt``/``server.key`` (CA:FALSE, serverAuth, SANs). Clients verify TLS by trusting
``ca.crt``: no ``verify=False`` anywhere. Existing files are kept, unless the leaf expires within
30 days or lacks a requested name. Keys are ECDSA P-256; the leaf lives 365 days, inside the
Mozilla intermediate profile's 366-day limit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
LEAF_DAYS = 365
CA_DAYS = 3650


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Switchboard local"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _key_usage(*, certificate_authority: bool) -> x509.KeyUsage:
    """ECDSA keys sign; only the CA signs certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=certificate_authority,
        crl_sign=certificate_authority,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _leaf_is_current(cert_path: Path, hosts: list[str]) -> bool:
    if not cert_path.exists():
        return False
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    if cert.not_valid_after_utc - dt.datetime.now(dt.UTC) < dt.timedelta(days=30):
        return False
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    present = {str(v) for v in san.get_values_for_type(x509.DNSName)}
    present |= {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    return all(_canonical(host) in present for host in hosts)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _canonical(host: str) -> str:
    return str(ipaddress.ip_address(host)) if _is_ip(host) else host


def ensure_certificates(
    directory: Path, hosts: list[str] | tuple[str, ...] = DEFAULT_HOSTS
) -> Path:
    """Create the CA (once) and a current leaf for ``hosts``; returns the CA certificate path."""
    hosts = list(hosts)
    directory.mkdir(parents=True, exist_ok=True)
    ca_crt, ca_key = directory / "ca.crt", directory / "ca.key"
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)

    if ca_crt.exists() and ca_key.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_crt.read_bytes())
        ca_private = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    else:
        ca_private = ec.generate_private_key(ec.SECP256R1())
        ca_name = _name("Switchboard local CA")
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(certificate_authority=True), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_private.public_key()), False
            )
            .sign(ca_private, hashes.SHA256())
        )
        _write_key(ca_key, ca_private)
        ca_crt.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    leaf_crt, leaf_key = directory / "server.crt", directory / "server.key"
    if not _leaf_is_current(leaf_crt, hosts) or not leaf_key.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(hosts[0]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(certificate_authority=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_private.public_key()), False
            )
            .sign(ca_private, hashes.SHA256())
        )
        _write_key(leaf_key, key)
        # The leaf alone: the CA signs it directly and clients hold the CA as their trust
        # anchor, so sending it too only costs bytes (sslyze: "chain contains the anchor").
        leaf_crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return ca_crt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument(
        "--host", action="append", dest="hosts", help="a DNS name or IP for the leaf (repeatable)"
    )
    args = parser.parse_args()
    ca = ensure_certificates(args.directory, args.hosts or DEFAULT_HOSTS)
    print(f"CA certificate: {ca}")


if __name__ == "__main__":
    main()
