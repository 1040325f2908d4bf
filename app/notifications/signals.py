from __future__ import annotations

import logging
from typing import Any

from django.db import transaction
from django.db.models.signals import post_save
from django.dispatch import receiver

from notifications.models import Notification
from notifications.publish import PUSH_ERRORS, notify_user

logger = logging.getLogger("notifications")


@receiver(post_save, sender=Notification)
def push_new_notification(sender: type, instance: Notification, created: bool, **_: Any) -> None:
    if not created:
        return

    def push() -> None:
        try:
            notify_user(
                instance.user_id,
                instance.message,
                notification_type=instance.kind,
                data={"notification_id": instance.pk, "source": "post_save"},
            )
        except PUSH_ERRORS as exc:
            # The row is stored: the user's sockets get it by replay (?since=) on reconnect.
            instance.push_deferred = True
            logger.warning(
                "notification %s stored, push deferred to replay: channel layer unavailable (%s)",
                instance.pk,
                exc,
            )

    # After commit: a rolled-back row must not be announced, and a client that reacts by
    # fetching /notifications/ must find it. robust: whatever else goes wrong in the push, the
    # commit (and the request that made it) has succeeded; the error is logged.
    transaction.on_commit(push, robust=True)
