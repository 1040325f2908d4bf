"""Observability: Prometheus metrics (``/metrics``), structured logs, per-connection context.

* :mod:`observability.metrics` defines every metric once and the cheap calls that update them.
* :mod:`observability.asgi` answers ``GET /metrics`` before Django, aggregated over the replica's
  workers (prometheus_client's multiprocess mode), and gives every websocket a connection id.
* :mod:`observability.scrape` adds what is measured at scrape time: readiness, Redis, and the
  CPU, memory and file descriptors of every process of the replica.
* :mod:`observability.logs` formats log records as one JSON object per line (``LOG_FORMAT=json``).
"""
