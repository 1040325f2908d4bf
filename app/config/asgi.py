"""ASGI entry point: ``config.asgi:application``.

The order below is the fix for ``AppRegistryNotReady``: the settings module is chosen first,
``get_asgi_application()`` then runs ``django.setup()``, and only after that is anything imported
that touches models -- routing, consumers, ``channels.auth`` (it imports the auth models).
"""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from django.core.asgi import get_asgi_application

django_asgi_app = get_asgi_application()

from config.routing import websocket_urlpatterns  # noqa: E402
from health.asgi import HealthCheckMiddleware  # noqa: E402
from observability.asgi import MetricsEndpoint  # noqa: E402
from realtime.handshake import DirectProtocolTypeRouter, WebsocketHandshake  # noqa: E402

application = MetricsEndpoint(
    DirectProtocolTypeRouter(
        {
            "http": HealthCheckMiddleware(django_asgi_app),
            # Origin rule, authentication, routing: realtime/handshake.py.
            "websocket": WebsocketHandshake(websocket_urlpatterns),
        }
    )
)
