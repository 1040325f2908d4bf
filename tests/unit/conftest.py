from __future__ import annotations

from collections.abc import Iterator

import django
import pytest
from django.test import override_settings

from tests.redis_server import redis_server

django.setup()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def redis_layer(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Point the default channel layer at the real test redis-server (prefix per test)."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("CHANNEL_LAYER", "redis")
    from config.channel_layers import channel_layers_from_env

    # override_settings makes Channels drop its cached layers (setting_changed).
    with override_settings(CHANNEL_LAYERS=channel_layers_from_env()):
        yield
