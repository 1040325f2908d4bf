from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import django
import pytest
from django.test import override_settings

from tests.redis_server import redis_server

django.setup()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


#: The Redis-backed layers the in-process consumer tests run against: the default first.
LAYERS_ON_REDIS = ("fanout", "redis")


@pytest.fixture(params=LAYERS_ON_REDIS)
async def layer_on_redis(
    request: pytest.FixtureRequest, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[str]:
    """Point the default channel layer at the real test redis-server, once per Redis-backed
    ``CHANNEL_LAYER`` (the default ``fanout`` and channels-redis' ``redis``); yields the name."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("CHANNEL_LAYER", request.param)
    from channels.layers import get_channel_layer

    from config.channel_layers import channel_layers_from_env

    # override_settings makes Channels drop its cached layers (setting_changed).
    with override_settings(CHANNEL_LAYERS=channel_layers_from_env()):
        yield request.param
        # The fanout layer holds connections and a subscriber task on the (session) loop.
        await get_channel_layer().flush()
