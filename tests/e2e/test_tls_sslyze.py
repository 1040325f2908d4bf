"""The native stack's TLS, scanned by sslyze against Mozilla's "intermediate" profile.

nginx/snippets/tls.conf is the same file the containers mount, so this also checks compose.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness import RunningStack
from tests.validators import run, tool

pytestmark = pytest.mark.e2e

#: Scans whose boolean result must be exactly this; anything else is a finding.
EXPECTED = {
    ("heartbleed", "is_vulnerable_to_heartbleed"): False,
    ("openssl_ccs_injection", "is_vulnerable_to_ccs_injection"): False,
    ("tls_fallback_scsv", "supports_fallback_scsv"): True,
    ("tls_compression", "supports_compression"): False,
    ("session_renegotiation", "supports_secure_renegotiation"): True,
    ("session_renegotiation", "is_vulnerable_to_client_renegotiation_dos"): False,
    ("tls_extended_master_secret", "supports_ems_extension"): True,
}


def test_tls_is_mozilla_intermediate_compliant_with_no_finding(
    stack: RunningStack, tmp_path: Path
) -> None:
    report = tmp_path / "sslyze.json"
    result = run(
        [
            tool("sslyze"),
            "--mozilla_config=intermediate",
            f"--certinfo_ca_file={stack.stack.ca_file}",
            f"--json_out={report}",
            f"localhost:{stack.stack.https_port}",
        ],
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "OK - Compliant" in output and "intermediate" in output, output

    (server,) = json.loads(report.read_text())["server_scan_results"]
    assert server["scan_status"] == "COMPLETED", server.get("connectivity_error_trace")
    scans = server["scan_result"]
    for (scan, field), expected in EXPECTED.items():
        assert scans[scan]["status"] == "COMPLETED", scan
        assert scans[scan]["result"][field] is expected, f"{scan}.{field}"
    assert scans["robot"]["result"]["robot_result"].startswith("NOT_VULNERABLE")

    for version in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1"):
        assert not scans[f"{version}_cipher_suites"]["result"]["accepted_cipher_suites"], version
    for version in ("tls_1_2", "tls_1_3"):
        assert scans[f"{version}_cipher_suites"]["result"]["accepted_cipher_suites"], version

    # The certificate: trusted through the local CA (public stores cannot know it), a correct
    # chain, and the anchor not sent along.
    for deployment in scans["certificate_info"]["result"]["certificate_deployments"]:
        supplied = [
            p
            for p in deployment["path_validation_results"]
            if p["trust_store"]["name"] == "Supplied CA file"
        ]
        assert supplied and supplied[0]["validation_error"] is None, supplied
        assert deployment["received_chain_has_valid_order"] is True
        assert deployment["received_chain_contains_anchor_certificate"] is False
        assert deployment["verified_chain_has_sha1_signature"] is False
