"""The chat page: ``/chat/<room>/``."""

from __future__ import annotations

from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render

from chat.protocol import is_valid_room

#: Scripts and styles come only from our own static files; websockets only to this host.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'self'; form-action 'self'; "
    "object-src 'none'"
)


def room(request: HttpRequest, room_name: str) -> HttpResponse:
    if not is_valid_room(room_name):
        raise Http404("Room names are 1-64 characters of A-Z, a-z, 0-9, '_' and '-'.")
    context = {"room_name": room_name, "max_chars": settings.CHAT_MAX_MESSAGE_CHARS}
    response = render(request, "chat/room.html", context)
    response["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return response
