"""Settings come from the environment, with production-safe defaults."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from config import env

APP = Path(__file__).resolve().parents[2] / "app"


def django_python(code: str, **environ: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter with only ``environ`` set (plus PATH)."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=APP,
        env={"PATH": os.environ["PATH"], "DJANGO_SETTINGS_MODULE": "config.settings", **environ},
        capture_output=True,
        text=True,
        timeout=60,
    )


PRODUCTION = {
    "DJANGO_SECRET_KEY": "a-production-secret-key-that-is-long-enough-1234567890-abcdefghij",
    "DJANGO_ALLOWED_HOSTS": "chat.example.com",
    "DJANGO_CSRF_TRUSTED_ORIGINS": "https://chat.example.com",
    "REDIS_URL": "rediss://:s3cret@redis.example.com:6380/0",
}


def test_debug_is_off_and_a_secret_key_is_required_by_default() -> None:
    result = django_python("import django; django.setup()")
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY is required" in result.stderr


def test_production_environment_passes_check_deploy_at_warning_level() -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=APP,
        env={"PATH": os.environ["PATH"], **PRODUCTION},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_rediss_url_with_password_reaches_the_channel_layer_config() -> None:
    code = (
        "import django; django.setup(); from django.conf import settings; "
        "c = settings.CHANNEL_LAYERS['default']; print(c['BACKEND']); "
        "print(c['CONFIG']['hosts'][0]['address']); print(settings.DEBUG)"
    )
    result = django_python(code, **PRODUCTION)
    assert result.returncode == 0, result.stderr
    backend, address, debug = result.stdout.split()
    from config import env
    from config.channel_layers import BACKENDS

    assert backend == BACKENDS[env.get("CHANNEL_LAYER", environ={})]  # the declared default
    assert address == PRODUCTION["REDIS_URL"]
    assert debug == "False"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CHANNEL_LAYER", "rabbit", "expected one of"),
        ("CHANNEL_CAPACITY", "lots", "not an integer"),
        ("DJANGO_DEBUG", "maybe", "not a boolean"),
        ("REDIS_SOCKET_TIMEOUT", "3", "must exceed"),
        ("REDIS_TOPOLOGY", "ring", "expected one of"),
        ("REDIS_TOPOLOGY", "sentinel", "needs REDIS_SENTINELS"),
        ("REDIS_SENTINEL_USERNAME", "app", "needs REDIS_SENTINEL_PASSWORD"),
        ("CHANNEL_PREFIX", "a{b}", "without braces"),
    ],
)
def test_bad_values_fail_at_start_with_a_clear_message(name: str, value: str, message: str) -> None:
    result = django_python("import django; django.setup()", **PRODUCTION, **{name: value})
    assert result.returncode != 0
    assert message in result.stderr and name in result.stderr


def test_every_setting_read_in_code_is_declared_once() -> None:
    names = [s.name for s in env.SETTINGS]
    assert len(names) == len(set(names))
    root = APP.parent
    sources = [*APP.rglob("*.py"), *(root / "infra").rglob("*.py")]
    used: set[str] = set()
    pattern = re.compile(r"env\.get(?:_int|_bool|_float|_list)?\(\s*[\"']([A-Z_]+)[\"']")
    for path in sources:
        used |= set(pattern.findall(path.read_text()))
    assert used - set(names) == set()
    assert set(names) - used == set(), "declared but never read"


def test_readme_settings_table_is_generated_from_the_one_table() -> None:
    readme = (APP.parent / "README.md").read_text()
    assert env.with_table(readme) == readme, "README drifted: run `make settings-table`"
    for setting in env.SETTINGS:
        assert f"| `{setting.name}` |" in readme


def test_the_topology_settings_reach_the_layer_and_other_layers_refuse_them() -> None:
    code = (
        "import django; django.setup(); from django.conf import settings; "
        "c = settings.CHANNEL_LAYERS['default']['CONFIG']; "
        "print(c['topology'], c['sentinels'], c['sentinel_master'], c['prefix'], "
        "c['sentinel_username'], c['sentinel_password'])"
    )
    topology = {
        "REDIS_TOPOLOGY": "sentinel",
        "REDIS_SENTINELS": "10.0.0.1:26379,10.0.0.2:26379",
        "REDIS_SENTINEL_MASTER": "chat",
        "CHANNEL_PREFIX": "staging",
        "REDIS_SENTINEL_USERNAME": "watcher",
        "REDIS_SENTINEL_PASSWORD": "sentinel-secret",
    }
    result = django_python(code, **PRODUCTION, **topology)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "sentinel",
        "10.0.0.1:26379,10.0.0.2:26379",
        "chat",
        "staging",
        "watcher",
        "sentinel-secret",
    ]
    refused = django_python(code, **PRODUCTION, REDIS_TOPOLOGY="cluster", CHANNEL_LAYER="redis")
    assert refused.returncode != 0
    assert "REDIS_TOPOLOGY=cluster needs CHANNEL_LAYER=fanout" in refused.stderr
