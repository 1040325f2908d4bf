"""``manage.py notify <username> <message>``: push a notification from a separate OS process.

It serves no websockets; the channel layer carries the message to whichever replica and worker
holds the user's sockets. ``--store`` saves a Notification instead, so the post_save signal sends.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from notifications.models import Notification
from notifications.publish import notify_user


class Command(BaseCommand):
    help = "Send a notification to one user's open sockets, on every replica."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("message")
        parser.add_argument("--kind", default="info")
        parser.add_argument("--store", action="store_true", help="save it (signal path)")

    def handle(self, *args: Any, **options: Any) -> None:
        user = get_user_model().objects.filter(username=options["username"]).first()
        if user is None:
            raise CommandError(f"no user {options['username']!r}")
        if options["store"]:
            note = Notification.objects.create(
                user=user, kind=options["kind"], message=options["message"]
            )
            self.stdout.write(f"stored notification {note.pk}")
        else:
            event_id = notify_user(
                user.pk,
                options["message"],
                notification_type=options["kind"],
                data={"source": "command"},
            )
            self.stdout.write(f"sent {event_id}")
