"""Strict health probe for containers: ``python -m infra.probe /readyz``.

Used by the image's HEALTHCHECK, the compose healthchecks and the Kubernetes exec probes. It
asks one replica over plain HTTP, as an orchestrator would, and succeeds on **200 only**: kubelet's
own ``httpGet`` counts any 2xx/3xx as healthy, so a 301 (say, Django's HTTPS redirect because the
health endpoints slipped behind it) would pass there and fails here.

Target: ``$POD_IP`` if set (Kubernetes downward API: the pod IP, with that IP as the Host header,
exactly what a kubelet probe sends), else 127.0.0.1; port ``$PORT``. Standard library only, so it
starts fast and never imports Django.
"""

from __future__ import annotations

import http.client
import os
import sys


def probe(path: str, host: str, port: int, timeout: float) -> tuple[bool, str]:
    """``(healthy, detail)`` for one GET; healthy only on status 200."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        authority = f"[{host}]" if ":" in host else host  # an IPv6 pod IP
        connection.request("GET", path, headers={"Host": f"{authority}:{port}"})
        response = connection.getresponse()
        body = response.read(512).decode(errors="replace")
    except OSError as exc:
        return False, f"{type(exc).__name__}: {exc}"
    finally:
        connection.close()
    return response.status == 200, f"{response.status} {body}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else "/healthz"
    host = os.environ.get("POD_IP") or "127.0.0.1"
    port = int(os.environ.get("PORT") or "8000")
    healthy, detail = probe(path, host, port, timeout=float(os.environ.get("PROBE_TIMEOUT", "4")))
    print(f"{path} on {host}:{port}: {detail}", file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
