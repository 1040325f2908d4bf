"""HTTP side of notifications.

* ``GET  /notifications/``      the user's stored notifications (JSON), newest first.
* ``POST /notifications/``      store one for yourself (``message``, ``kind``); the post_save
                                signal pushes it to your sockets.
* ``POST /notifications/ping/`` push one straight from the view, without storing it. Staff may
                                name another user with ``username``.
"""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_http_methods, require_POST

from notifications.models import Notification
from notifications.publish import notify_user

MAX_CHARS = 1000


def _message(request: HttpRequest) -> str | JsonResponse:
    message = (request.POST.get("message") or "").strip()
    if not message or len(message) > MAX_CHARS:
        return JsonResponse({"error": f"message must be 1-{MAX_CHARS} characters"}, status=400)
    return message


@login_required
@require_http_methods(["GET", "POST"])
def notifications(request: HttpRequest) -> JsonResponse:
    if request.method == "POST":
        message = _message(request)
        if isinstance(message, JsonResponse):
            return message
        kind = (request.POST.get("kind") or "info")[:64]
        note = Notification.objects.create(user=request.user, kind=kind, message=message)
        return JsonResponse({"id": note.pk}, status=201)
    items = [
        {"id": n.pk, "kind": n.kind, "message": n.message, "created_at": n.created_at.isoformat()}
        for n in Notification.objects.filter(user=request.user)[:50]
    ]
    return JsonResponse({"notifications": items})


@login_required
@require_POST
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
    event_id = notify_user(target.pk, message, data={"source": "view"})
    return JsonResponse({"id": event_id}, status=202)
