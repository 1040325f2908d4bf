"""The seeds' tutorial chat project: what a Channels user starts from (a baseline, not an app).

Deliberately as the tutorials write it (shared/seeds): ``AsyncWebsocketConsumer``, ``json``,
``AuthMiddlewareStack``, ``RedisChannelLayer`` with nothing but ``hosts``, served by one daphne
process. Only the Redis address (with its password) and the secret key come from the environment,
and a ``/readyz`` view lets the stack launcher see that it is up.
"""
