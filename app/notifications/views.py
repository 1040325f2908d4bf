"""HTTP side of notifications.

* ``GET  /notifications/``      the user's stored notifications (JSON), newest first.
* ``POST /notifications/``      store one for yourself (``message``, ``kind``); the post_save
                                signal pushes it to your sockets.
* ``POST /notifications/ping/`` push one straight from the view, without storing it. Staff may
                                name another user with ``username``.

Every answer is JSON, errors included (``config.json_views``). With the channel layer (Redis)
down, a stored notification is still stored -- ``201`` with ``"push": "deferred"``: the client's
sockets get it by replay when they reconnect -- and a ping, which has nothing to store, answers
``503`` with ``"error": "unavailable"``.
"""

from __future__ import annotations

import logging

from django.contrib.auth import get_user_model
from django.http import HttpRequest, JsonResponse

from config.json_views import json_endpoint, json_error
from notifications.models import Notification
from notifications.publish import PUSH_ERRORS, notify_user

logger = logging.getLogger("notifications")

MAX_CHARS = 1000


def _message(request: HttpRequest) -> str | JsonResponse:
    message = (request.POST.get("message") or "").strip()
    if not message or len(message) > MAX_CHARS:
        return JsonResponse({"error": f"message must be 1-{MAX_CHARS} characters"}, status=400)
    return message


@json_endpoint(["GET", "POST"])
def notifications(request: HttpRequest) -> JsonResponse:
    if request.method == "POST":
        message = _message(request)
        if isinstance(message, JsonResponse):
            return message
        kind = (request.POST.get("kind") or "info")[:64]
        note = Notification.objects.create(user=request.user, kind=kind, message=message)
        # The post_save signal pushed it after commit (at once, outside a transaction), or
        # marked it deferred when the channel layer refused: stored either way.
        push = "deferred" if getattr(note, "push_deferred", False) else "sent"
        return JsonResponse({"id": note.pk, "push": push}, status=201)
    items = [
        {"id": n.pk, "kind": n.kind, "message": n.message, "created_at": n.created_at.isoformat()}
        for n in Notification.objects.filter(user=request.user)[:50]
    ]
    return JsonResponse({"notifications": items})


@json_endpoint(["POST"])
def ping(request: HttpRequest) -> JsonResponse:
    message = _message(request)
    if isinstance(message, JsonResponse):
        return message
    target = request.user
    username = request.POST.get("username")
    if username and username != request.user.get_username():
        if not request.user.is_staff:
            return JsonResponse({"error": "only staff may notify other users"}, status=403)
        target = get_user_model().objects.filter(username=username).first()
        if target is None:
            return JsonResponse({"error": f"no user {username!r}"}, status=404)
    try:
        event_id = notify_user(target.pk, message, data={"source": "view"})
    except PUSH_ERRORS as exc:
        logger.warning("ping for user %s not sent: channel layer unavailable (%s)", target.pk, exc)
        return json_error(
            503,
            "unavailable",
            "The message broker is unreachable; nothing was sent. Try again shortly.",
            Retry_After="5",
        )
    return JsonResponse({"id": event_id}, status=202)
