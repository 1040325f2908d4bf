"""JSON endpoints answer every error in JSON.

A client of ``/notifications/`` (or any view wrapped in :func:`json_endpoint`) parses the body of
every answer, so none may be Django's HTML: not the login redirect, not the 405 of a wrong
method, not the CSRF failure page, and not the HTML 500 page of an unexpected exception -- a
client that cannot tell "stored, push failed" from "nothing happened" retries and stores twice.

* :func:`json_endpoint` -- 401 for anonymous users, 405 for other methods, 500 for an unhandled
  exception (logged with its traceback), each as ``{"error": <code>, "detail": <text>}``.
* :func:`csrf_failure` (``CSRF_FAILURE_VIEW``) -- 403 in JSON for such views, Django's own page
  for the others.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.csrf import csrf_failure as html_csrf_failure

logger = logging.getLogger("switchboard.http")

View = Callable[..., HttpResponse]


def json_error(status: int, code: str, detail: str, **headers: str) -> JsonResponse:
    """An error answer: ``{"error": code, "detail": detail}`` with the HTTP ``status``."""
    response = JsonResponse({"error": code, "detail": detail}, status=status)
    for name, value in headers.items():
        response[name.replace("_", "-")] = value
    return response


def json_endpoint(methods: Iterable[str], *, login: bool = True) -> Callable[[View], View]:
    """Wrap a view whose every answer, errors included, is JSON."""
    allowed = sorted({m.upper() for m in methods})

    def decorate(view: View) -> View:
        @functools.wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.method not in allowed:
                return json_error(
                    405,
                    "method_not_allowed",
                    f"Use {' or '.join(allowed)}.",
                    Allow=", ".join(allowed),
                )
            if login and not request.user.is_authenticated:
                return json_error(401, "auth_required", "Log in first.")
            try:
                return view(request, *args, **kwargs)
            except Exception:
                logger.exception("unhandled error in %s %s", request.method, request.path)
                return json_error(500, "internal_error", "The server failed; nothing to retry.")

        wrapper.json_endpoint = True  # type: ignore[attr-defined]
        return wrapper

    return decorate


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """``CSRF_FAILURE_VIEW``: JSON for JSON endpoints, Django's page for everything else."""
    match = getattr(request, "resolver_match", None)
    if match is not None and getattr(match.func, "json_endpoint", False):
        return json_error(403, "csrf_failed", f"CSRF check failed: {reason}")
    return html_csrf_failure(request, reason=reason)
