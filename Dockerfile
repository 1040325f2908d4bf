# syntax=docker/dockerfile:1
# Switchboard app image: one replica = gunicorn with WEB_CONCURRENCY uvicorn workers.
#
#   docker build -t switchboard:local .          (docker compose up builds it for you)
#
# Runs as UID 10001 with a read-only root filesystem; only /tmp must be writable (a tmpfs in
# compose, an emptyDir in Kubernetes). Nothing secret is baked in: DJANGO_SECRET_KEY, REDIS_URL
# and DATABASE_URL come from the environment at run time (app/config/env.py lists every setting).
# Both stages use the same pinned base (a test checks they agree); pin it by digest too if your
# policy asks for it: `docker buildx imagetools inspect python:3.11.14-slim-bookworm`.

# -- build: the virtualenv from the lock, static files, bytecode ------------------------------------
FROM python:3.11.14-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /srv/switchboard

# Every dependency ships a manylinux wheel, so no compiler is needed; the lock pins them all.
COPY requirements/main.txt requirements/main.txt
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --no-compile -r requirements/main.txt

COPY app/ app/
COPY infra/__init__.py infra/certs.py infra/gunicorn.conf.py infra/probe.py infra/uvicorn_worker.py infra/

# collectstatic needs settings that import, and DEBUG off for the hashed-manifest storage the
# replicas serve through whitenoise. The key below is a placeholder that exists only for this
# one command: it is not in ENV, not in the final image, and the app refuses to run without a
# real one. Bytecode is compiled with unchecked hashes, so it stays valid whatever the file
# times and nothing needs to write .pyc files on the read-only root filesystem.
RUN DJANGO_DEBUG=false DJANGO_SECRET_KEY=build-time-placeholder-for-collectstatic \
    /opt/venv/bin/python app/manage.py collectstatic --noinput --verbosity 0 \
 && /opt/venv/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash \
    /opt/venv/lib app infra

# -- runtime -------------------------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="switchboard" \
      org.opencontainers.image.description="Real-time Django (Channels) replica: gunicorn + uvicorn workers, Redis channel layer" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.source="https://github.com/your-org/switchboard" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.14-slim-bookworm"

# A fixed numeric UID/GID (Kubernetes' runAsNonRoot can verify it). The code stays root-owned,
# so the app cannot rewrite itself. /srv/switchboard/tls is the one directory the app user owns:
# compose mounts the certificate volume there and Docker copies this ownership onto it.
RUN groupadd --system --gid 10001 switchboard \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin switchboard \
 && install -d -o 10001 -g 10001 -m 0755 /srv/switchboard/tls

COPY --from=build /opt/venv /opt/venv
COPY --from=build /srv/switchboard/app /srv/switchboard/app
COPY --from=build /srv/switchboard/infra /srv/switchboard/infra
COPY --from=build /srv/switchboard/var/static /srv/switchboard/var/static

# HOME=/tmp: gunicorn's control socket and any library cache land on the writable tmpfs.
ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONPATH="/srv/switchboard:/srv/switchboard/app" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    BIND_HOST=0.0.0.0 \
    PORT=8000

WORKDIR /srv/switchboard/app
USER 10001:10001
EXPOSE 8000

# Liveness only (/healthz never touches Redis): an orchestrator that replaces unhealthy
# containers must not churn every replica during a Redis outage. Compose gates nginx on /readyz.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "infra.probe", "/healthz"]

# gunicorn reads BIND_HOST, PORT, WEB_CONCURRENCY, GRACEFUL_TIMEOUT... (infra/gunicorn.conf.py).
CMD ["gunicorn", "-c", "/srv/switchboard/infra/gunicorn.conf.py"]
