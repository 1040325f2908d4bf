"""Django settings for Switchboard.

Everything a deployment changes comes from the environment; names, defaults and meanings live
in :mod:`config.env` (the README's settings table is generated from it).
"""

from __future__ import annotations

from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from config import env
from config.channel_layers import channel_layers_from_env
from observability.logs import formatter_config

APP_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = APP_DIR.parent

DEBUG = env.get_bool("DJANGO_DEBUG")
SECRET_KEY = env.get("DJANGO_SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY is required when DJANGO_DEBUG is off "
            "(generate one: python -c 'import secrets; print(secrets.token_urlsafe(50))')"
        )
    SECRET_KEY = env.DEV_SECRET_KEY

ALLOWED_HOSTS = env.get_list("DJANGO_ALLOWED_HOSTS")
CSRF_TRUSTED_ORIGINS = env.get_list("DJANGO_CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "chat",
    "notifications",
    "health",
    "wsauth",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "config.staticfiles.AsgiWhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
# JSON endpoints answer a failed CSRF check in JSON too (config.json_views).
CSRF_FAILURE_VIEW = "config.json_views.csrf_failure"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [APP_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def _database() -> dict:
    config = dj_database_url.parse(env.get("DATABASE_URL"), conn_max_age=0)
    if config["ENGINE"] == "django.db.backends.sqlite3":
        name = Path(config["NAME"])
        if not name.is_absolute():
            name = REPO_DIR / name
        name.parent.mkdir(parents=True, exist_ok=True)
        config["NAME"] = str(name)
        # Several processes share the file: WAL lets readers run beside the one writer, and
        # IMMEDIATE transactions queue writers instead of failing with "database is locked".
        config["OPTIONS"] = {
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
        }
    return config


DATABASES = {"default": _database()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_REDIRECT_URL = "/chat/lobby/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# Static files: collected at build time, served by whitenoise from every replica.
STATIC_URL = "/static/"
STATIC_ROOT = REPO_DIR / env.get("DJANGO_STATIC_ROOT")  # an absolute value replaces REPO_DIR
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "django.contrib.staticfiles.storage.StaticFilesStorage"
            if DEBUG
            else "whitenoise.storage.CompressedManifestStaticFilesStorage"
        )
    },
}

# -- Channels ---------------------------------------------------------------------------------
CHANNEL_LAYERS = channel_layers_from_env()
CHAT_MAX_MESSAGE_CHARS = env.get_int("CHAT_MAX_MESSAGE_CHARS", minimum=1)
CHAT_RATE_PER_SECOND = env.get_float("CHAT_RATE_PER_SECOND", minimum=0.001)
CHAT_RATE_BURST = env.get_int("CHAT_RATE_BURST", minimum=1)
CHAT_FLOOD_CLOSE_AFTER = env.get_int("CHAT_FLOOD_CLOSE_AFTER", minimum=1)
CHAT_HISTORY_SIZE = env.get_int("CHAT_HISTORY_SIZE", minimum=0)
CHAT_HISTORY_TTL = env.get_float("CHAT_HISTORY_TTL", minimum=1)
CHAT_HISTORY_MAX = env.get_int("CHAT_HISTORY_MAX", minimum=0)
NOTIFICATIONS_REPLAY_MAX = env.get_int("NOTIFICATIONS_REPLAY_MAX", minimum=1)
PRESENCE_TTL = env.get_float("PRESENCE_TTL", minimum=1)
PRESENCE_EVENTS = env.get_bool("PRESENCE_EVENTS")
PRESENCE_EVENTS_MAX_MEMBERS = env.get_int("PRESENCE_EVENTS_MAX_MEMBERS", minimum=0)
REPLICA_NAME = env.get("REPLICA_NAME")

# -- Connection tokens and socket authority (wsauth/) -------------------------------------------
WS_TOKEN_KEYS = env.get("WS_TOKEN_KEYS")
WS_TOKEN_TTL = env.get_int("WS_TOKEN_TTL", minimum=1)
WS_TOKEN_AUDIENCE = env.get("WS_TOKEN_AUDIENCE")
WS_TOKEN_REFRESH_NOTICE = env.get_int("WS_TOKEN_REFRESH_NOTICE", minimum=0)
WS_TOKEN_QUERY_PARAM = env.get_bool("WS_TOKEN_QUERY_PARAM")
WS_MAX_CONNECTIONS_PER_USER = env.get_int("WS_MAX_CONNECTIONS_PER_USER", minimum=0)
WS_CONNECTION_LEASE = env.get_int("WS_CONNECTION_LEASE", minimum=3)
WS_SESSION_RECHECK = env.get_float("WS_SESSION_RECHECK", minimum=0.1)

# -- HTTPS behind nginx -------------------------------------------------------------------------
# nginx terminates TLS. The scheme reaches Django through uvicorn's proxy-header handling, which
# trusts X-Forwarded-Proto only from FORWARDED_ALLOW_IPS. Django's SECURE_PROXY_SSL_HEADER is
# deliberately *not* set: it would trust the header from any peer that reaches the app port.
# /healthz and /readyz are answered before Django (health.asgi), so probes that hit the pod IP
# over plain HTTP see neither DisallowedHost nor the HTTPS redirect.
SECURE = env.get_bool("DJANGO_SECURE")
SECURE_SSL_REDIRECT = SECURE
SESSION_COOKIE_SECURE = SECURE
CSRF_COOKIE_SECURE = SECURE
SECURE_HSTS_SECONDS = env.get_int("DJANGO_HSTS_SECONDS", minimum=0) if SECURE else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = SECURE
SECURE_HSTS_PRELOAD = SECURE
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"

# -- Logging: connects, refusals and limits with their reason; never message bodies. ------------
LOG_LEVEL = env.get("DJANGO_LOG_LEVEL").upper()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    # LOG_FORMAT: plain text, or one JSON object per line (observability/logs.py).
    "formatters": {"switchboard": formatter_config(env.get("LOG_FORMAT"))},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "switchboard"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        name: {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False}
        for name in ("switchboard", "chat", "notifications", "health", "wsauth", "django")
    },
}
