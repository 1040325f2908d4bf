"""``manage.py create_api_key <username> [--name N] [--output FILE]``: a new API key, shown once."""

from __future__ import annotations

import os
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from wsauth.models import ApiKey


class Command(BaseCommand):
    help = "Create an API key for a user. The key is shown (or written) once and stored hashed."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--name", default="command line", help="What the key is for.")
        parser.add_argument(
            "--output",
            help="Write the key to this new file (mode 0600) instead of printing it.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            user = get_user_model()._default_manager.get_by_natural_key(options["username"])
        except get_user_model().DoesNotExist:
            raise CommandError(f"no user {options['username']!r}") from None
        row, key = ApiKey.create_for(user, options["name"])
        if options["output"]:
            fd = os.open(options["output"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(key + "\n")
            self.stdout.write(f"API key {row} written to {options['output']}")
        else:
            self.stdout.write(key)
