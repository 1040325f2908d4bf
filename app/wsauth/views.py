"""``POST /api/ws-token/``: a short-lived connection token for the websocket endpoints.

The caller authenticates with ``Authorization: Bearer <API key>`` (clients without a browser)
or with its session cookie, in which case Django's CSRF check applies as to any form. Optional
body (JSON or form): ``{"rooms": ["lobby", ...]}`` limits the token to those chat rooms.
Answer: ``{"token": "...", "expires_in": 300}`` (``Cache-Control: no-store``); errors are
``{"error": "<code>", "detail": "..."}`` with 400, 401 or 403.
"""

from __future__ import annotations

import json
import logging

from django.contrib.auth.mixins import LoginRequiredMixin
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.shortcuts import redirect, render
from django.utils import timezone
from django.utils.decorators import method_decorator
from django.views import View
from django.views.decorators.csrf import csrf_exempt

from chat.protocol import is_valid_room
from wsauth import tokens
from wsauth.models import ApiKey

logger = logging.getLogger("switchboard.ws")

MAX_ROOMS = 50


class _CsrfCheck(CsrfViewMiddleware):
    def _reject(self, request: HttpRequest, reason: str) -> str:  # type: ignore[override]
        return reason


def _csrf_failure(request: HttpRequest) -> str | None:
    """Django's CSRF check, run by hand: the view is exempt only for API-key callers."""
    check = _CsrfCheck(lambda _: None)  # type: ignore[arg-type]
    check.process_request(request)
    return check.process_view(request, lambda _: None, (), {})  # type: ignore[return-value]


def _error(status: int, code: str, detail: str) -> JsonResponse:
    response = JsonResponse({"error": code, "detail": detail}, status=status)
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="switchboard"'
    response["Cache-Control"] = "no-store"
    return response


def _requested_rooms(request: HttpRequest) -> list[str] | None:
    if request.content_type == "application/json":
        body = json.loads(request.body or b"{}")
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        rooms = body.get("rooms")
    else:
        rooms = request.POST.getlist("rooms") or None
    if rooms is None:
        return None
    if not isinstance(rooms, list) or not rooms or len(rooms) > MAX_ROOMS:
        raise ValueError(f"`rooms` must be a list of 1-{MAX_ROOMS} room names")
    if not all(isinstance(room, str) and is_valid_room(room) for room in rooms):
        raise ValueError("every room must be 1-64 characters of A-Z, a-z, 0-9, '_' and '-'")
    return rooms


@method_decorator(csrf_exempt, name="dispatch")
class WsTokenView(View):
    http_method_names = ["post"]

    def post(self, request: HttpRequest) -> JsonResponse:
        authorization = request.headers.get("Authorization")
        if authorization is not None:
            scheme, _, key = authorization.partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                return _error(401, "invalid_authorization", "Use `Authorization: Bearer <key>`.")
            api_key = ApiKey.objects.authenticate(key.strip())
            if api_key is None:
                return _error(401, "invalid_api_key", "Unknown, revoked or inactive API key.")
            ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=timezone.now())
            user, via = api_key.user, f"api_key={api_key.prefix}"
        else:
            if not request.user.is_authenticated:
                return _error(401, "authentication_required", "Log in or send an API key.")
            reason = _csrf_failure(request)
            if reason is not None:
                return _error(403, "csrf_failed", f"CSRF check failed: {reason}")
            user, via = request.user, "session"
        try:
            rooms = _requested_rooms(request)
        except ValueError as exc:
            return _error(400, "invalid_rooms", str(exc))
        token, ttl = tokens.issue(user, rooms)
        logger.info("issued a connection token user=%s via %s rooms=%s", user.pk, via, rooms)
        response = JsonResponse({"token": token, "expires_in": ttl})
        response["Cache-Control"] = "no-store"
        return response


class ApiKeysView(LoginRequiredMixin, View):
    """``/accounts/api-keys/``: a logged-in user's own API keys -- create (shown once), list,
    revoke. Staff can also manage everyone's in the admin."""

    template_name = "wsauth/api_keys.html"

    def get(self, request: HttpRequest) -> HttpResponse:
        return self._page(request)

    def post(self, request: HttpRequest) -> HttpResponse:
        action = request.POST.get("action")
        if action == "create":
            name = request.POST.get("name", "").strip()[:100]
            if not name:
                return self._page(request, error="Name the key: what is it for?", status=400)
            row, key = ApiKey.create_for(request.user, name)
            logger.info("API key %s created by user %s", row.prefix, request.user.pk)
            return self._page(request, new_key=key, new_key_row=row)
        if action == "revoke":
            revoked = ApiKey.objects.filter(
                user=request.user, prefix=request.POST.get("prefix", ""), revoked_at=None
            ).update(revoked_at=timezone.now())
            if revoked:
                logger.info("API key revoked by user %s", request.user.pk)
            return redirect(request.path)
        return self._page(request, error="Unknown action.", status=400)

    def _page(self, request: HttpRequest, status: int = 200, **context: object) -> HttpResponse:
        keys = ApiKey.objects.filter(user=request.user)
        response = render(request, self.template_name, {"keys": keys, **context}, status=status)
        response["Cache-Control"] = "no-store"
        return response
