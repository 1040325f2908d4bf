from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone

from wsauth.models import ApiKey


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """Keys are made here and shown once, on the page that follows "Save"; only a hash is kept.
    Revoke a key by setting its revoked time (or with the action)."""

    list_display = ("name", "user", "prefix", "created_at", "last_used_at", "revoked_at")
    list_filter = ("revoked_at",)
    search_fields = ("name", "user__username", "prefix")
    readonly_fields = ("prefix", "created_at", "last_used_at")
    fields = ("user", "name", "prefix", "created_at", "last_used_at", "revoked_at")
    actions = ("revoke",)

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        if not change:
            request._wsauth_new_key = obj.assign_new_key()  # type: ignore[attr-defined]
        super().save_model(request, obj, form, change)

    def response_add(self, request: HttpRequest, obj: ApiKey, *args: Any) -> HttpResponse:
        key = getattr(request, "_wsauth_new_key", None)
        if key is None:
            return super().response_add(request, obj, *args)
        context = {
            **self.admin_site.each_context(request),
            "key": key,
            "api_key": obj,
            "opts": self.model._meta,
            "title": "API key created",
        }
        response = TemplateResponse(request, "admin/wsauth/apikey/created.html", context)
        response["Cache-Control"] = "no-store"
        return response

    @admin.action(description="Revoke the selected keys")
    def revoke(self, request: HttpRequest, queryset: Any) -> None:
        queryset.filter(revoked_at=None).update(revoked_at=timezone.now())
