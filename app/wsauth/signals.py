"""When a user's authority ends, their open sockets close (``authority.revoke_user``).

A logout closes, at once, every socket that authenticated with that session -- chat and
notifications, on every replica (``authority.revoke_session``); the user's other sessions and
tokens keep theirs. A deactivation (``is_active`` turned off), a password change and a deletion
each close every socket of that user, on every replica, once the change is committed. Saves
that touch neither field (``last_login`` on each login) cost nothing; any other save of a user
costs one query to compare with the stored row.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.contrib.auth.signals import user_logged_out
from django.db import transaction
from django.db.models.signals import post_delete, post_save, pre_save
from django.dispatch import receiver

from wsauth.authority import revoke_session, revoke_user

logger = logging.getLogger("switchboard.ws")

WATCHED_FIELDS = frozenset({"password", "is_active"})


def _revoke_after_commit(user_pk: object, reason: str) -> None:
    def revoke() -> None:
        try:
            revoke_user(user_pk, reason)
        except Exception:  # Redis down must not fail the change that caused this
            logger.warning("could not close the sockets of user %s (%s)", user_pk, reason)
            return
        logger.info("closing the sockets of user %s: %s", user_pk, reason)

    transaction.on_commit(revoke)


@receiver(pre_save, sender=settings.AUTH_USER_MODEL)
def remember_stored_authority(
    sender: Any, instance: Any, raw: bool = False, update_fields: Any = None, **_: Any
) -> None:
    if raw or instance.pk is None:
        return
    if update_fields is not None and not WATCHED_FIELDS & set(update_fields):
        return
    instance._wsauth_stored = (
        sender._default_manager.filter(pk=instance.pk).values("password", "is_active").first()
    )


@receiver(post_save, sender=settings.AUTH_USER_MODEL)
def revoke_on_authority_change(sender: Any, instance: Any, raw: bool = False, **_: Any) -> None:
    stored = instance.__dict__.pop("_wsauth_stored", None)
    if raw or not stored:
        return
    if stored["is_active"] and not instance.is_active:
        _revoke_after_commit(instance.pk, "deactivated")
    elif stored["password"] != instance.password:
        _revoke_after_commit(instance.pk, "password_changed")


@receiver(post_delete, sender=settings.AUTH_USER_MODEL)
def revoke_on_delete(sender: Any, instance: Any, **_: Any) -> None:
    _revoke_after_commit(instance.pk, "deleted")


@receiver(user_logged_out)
def revoke_on_logout(sender: Any, request: Any, user: Any, **_: Any) -> None:
    # Sent before the session is flushed: its key still names the sockets it opened.
    key = getattr(getattr(request, "session", None), "session_key", None)
    if user is None or not key:
        return
    try:
        revoke_session(user.pk, key)
    except Exception:  # Redis down must not break logout; the session check closes them later
        logger.warning("could not close the sockets of user %s on logout", user.pk)
