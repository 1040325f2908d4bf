"""The channel layers Switchboard runs on: one place for everything between consumers and Redis.

=================  ===========================================================================
``layer``          the default layer (``CHANNEL_LAYER=fanout``): Redis pub/sub, groups kept per
                   process, one decode per process, bounded mailboxes with counted drops
``subscription``   one subscription connection per Redis node a process needs, following failovers
``transport``      its Redis connections: hand-written RESP2 parsed by hiredis (the hot path)
``topology``       which server(s): one, a Sentinel master, or a Cluster's slot owners (redis-py)
``stats``          its per-process counters (``/readyz``)
``redis_core``     ``CHANNEL_LAYER=redis``: channels-redis' core layer with a bounded idle pool
``membership``     restores channels-redis group memberships after a Redis restart
=================  ===========================================================================

The consumer side (the base consumer, rate limits, Origin checks, JSON frames) is ``realtime``.
"""
