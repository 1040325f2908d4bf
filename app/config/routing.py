"""All websocket routes of the project, and a refusal for everything else."""

from django.urls import re_path

from chat.routing import websocket_urlpatterns as chat_routes
from notifications.routing import websocket_urlpatterns as notification_routes
from realtime.consumers import NotFoundConsumer

websocket_urlpatterns = [
    *chat_routes,
    *notification_routes,
    # Without this, an unknown path raises in URLRouter and is logged as a server error.
    re_path(r"", NotFoundConsumer.as_asgi()),
]
