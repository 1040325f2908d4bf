from django.apps import AppConfig


class WsAuthConfig(AppConfig):
    """Connection tokens, API keys, and the websocket side of authentication."""

    name = "wsauth"
    verbose_name = "Websocket authentication"

    def ready(self) -> None:
        from wsauth import signals  # noqa: F401  (connects the revocation receivers)
