import os

# Settings for in-process tests (unit and consumer tests). The e2e stacks get their own
# environment from tests/harness.py.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("DJANGO_DEBUG", "true")
os.environ.setdefault("DJANGO_SECURE", "false")
