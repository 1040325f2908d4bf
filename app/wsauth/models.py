"""Personal API keys: what a client without a browser uses to get connection tokens."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from django.conf import settings
from django.db import models
from django.utils import timezone

#: ``sbk_<prefix>_<secret>``: the prefix finds the row, the whole key is compared by hash.
KEY_PREFIX = "sbk"
PREFIX_CHARS = 8


def hash_key(key: str) -> str:
    """SHA-256 of the whole key. A fast hash is enough: keys are 256 random bits, not passwords
    a dictionary could guess; a slow hash would only slow down every token request."""
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeyQuerySet(models.QuerySet):
    def authenticate(self, key: str) -> ApiKey | None:
        """The usable key ``key`` names (not revoked, its user active), else ``None``."""
        parts = key.split("_", 2)
        if len(parts) != 3 or parts[0] != KEY_PREFIX or len(parts[1]) != PREFIX_CHARS:
            return None
        found = self.select_related("user").filter(prefix=parts[1], revoked_at=None).first()
        if found is None or not hmac.compare_digest(found.hashed_key, hash_key(key)):
            return None
        if not found.user.is_active:
            return None
        return found


class ApiKey(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    name = models.CharField(max_length=100, help_text="What it is for (a device, a script).")
    prefix = models.CharField(max_length=PREFIX_CHARS, unique=True, editable=False)
    hashed_key = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        verbose_name = "API key"
        ordering = ("-created_at",)

    def __str__(self) -> str:
        return f"{self.name} ({KEY_PREFIX}_{self.prefix}_...)"

    def assign_new_key(self) -> str:
        """Give this row a fresh key and return it: the only time the key exists in clear."""
        self.prefix = secrets.token_hex(PREFIX_CHARS // 2)
        key = f"{KEY_PREFIX}_{self.prefix}_{secrets.token_urlsafe(32)}"
        self.hashed_key = hash_key(key)
        return key

    @classmethod
    def create_for(cls, user: models.Model, name: str) -> tuple[ApiKey, str]:
        row = cls(user=user, name=name)
        key = row.assign_new_key()
        row.save()
        return row, key
