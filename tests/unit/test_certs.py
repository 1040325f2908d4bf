"""infra.certs: a CA and a leaf that verifies against it, with the names clients use."""

from __future__ import annotations

import datetime as dt
import ssl
import subprocess
from pathlib import Path

from cryptography import x509

from infra.certs import ensure_certificates


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_leaf_is_not_a_ca_has_the_sans_and_verifies(tmp_path: Path) -> None:
    ca = ensure_certificates(tmp_path)
    leaf = load(tmp_path / "server.crt")
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert load(ca).extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1", "::1"}
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime <= dt.timedelta(days=366)  # Mozilla intermediate maximum
    result = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(ca),
            "-purpose",
            "sslserver",
            str(tmp_path / "server.crt"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    context = ssl.create_default_context(cafile=str(ca))  # loads as a trust anchor
    assert context.cert_store_stats()["x509_ca"] == 1
    assert oct((tmp_path / "server.key").stat().st_mode & 0o777) == "0o600"


def test_existing_certificates_are_kept_and_new_names_reissue_the_leaf(tmp_path: Path) -> None:
    ensure_certificates(tmp_path)
    ca_before, leaf_before = (
        (tmp_path / "ca.crt").read_bytes(),
        (tmp_path / "server.crt").read_bytes(),
    )
    ensure_certificates(tmp_path)
    assert (tmp_path / "server.crt").read_bytes() == leaf_before
    ensure_certificates(tmp_path, ["localhost", "127.0.0.1", "::1", "chat.internal"])
    assert (tmp_path / "ca.crt").read_bytes() == ca_before
    leaf = load(tmp_path / "server.crt")
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "chat.internal" in san.get_values_for_type(x509.DNSName)
