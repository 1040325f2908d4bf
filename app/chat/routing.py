from django.urls import re_path

from chat.consumers import ChatConsumer

# Any room segment (even one with an encoded "/") reaches the consumer, which refuses bad names
# with a reason (invalid_room) instead of the router's bare "No route found" exception.
websocket_urlpatterns = [
    re_path(r"^ws/chat/(?P<room>.+)/$", ChatConsumer.as_asgi()),
]
