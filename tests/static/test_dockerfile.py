"""Dockerfile and .dockerignore: hadolint clean, and the image's promises kept."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from tests.static.support import DOCKERFILE, ROOT
from tests.validators import run


def _instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        lines.append(current)
        current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_hadolint_reports_nothing(vbin: Path) -> None:
    result = run([str(vbin / "hadolint"), "--failure-threshold", "warning", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr
    # Not even info or style findings.
    assert result.stdout.strip() == "", result.stdout


def test_image_is_multi_stage_pinned_non_root_and_exec_form() -> None:
    instructions = _instructions()
    bases = [args for op, args in instructions if op == "FROM"]
    assert len(bases) >= 2, "multi-stage"
    images = {args.split()[0] for args in bases}
    assert len(images) == 1, f"one pinned base for every stage: {images}"
    (image,) = images
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", image), image

    runtime = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM") :]
    users = [args for op, args in runtime if op == "USER"]
    assert users, "the runtime stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 10000, f"numeric non-root UID, got {users[-1]}"

    (cmd,) = [args for op, args in runtime if op == "CMD"]
    assert json.loads(cmd)[0] == "gunicorn", "exec-form CMD running gunicorn"
    (healthcheck,) = [args for op, args in runtime if op == "HEALTHCHECK"]
    exec_form = healthcheck[healthcheck.index("CMD ") + 4 :]
    assert json.loads(exec_form)[:3] == ["python", "-m", "infra.probe"], "exec-form HEALTHCHECK"

    labels = " ".join(args for op, args in runtime if op == "LABEL")
    for key in ("title", "description", "version", "revision", "licenses", "source"):
        assert f"org.opencontainers.image.{key}=" in labels, key


def test_no_secret_in_any_layer_and_static_files_built_in() -> None:
    instructions = _instructions()
    for op, args in instructions:
        if op in {"ENV", "ARG", "LABEL"}:
            assert not re.search(r"SECRET|PASSWORD|TOKEN", args, re.I), f"{op} {args}"
    (collect,) = [args for op, args in instructions if op == "RUN" and "collectstatic" in args]
    # The build-time key is an inline placeholder for one command, not an ENV.
    assert "DJANGO_SECRET_KEY=build-time-placeholder" in collect
    assert "compileall" in collect and "unchecked-hash" in collect
    installs = [args for op, args in instructions if op == "RUN" and "pip install" in args]
    assert any("-r requirements/main.txt" in args for args in installs), "installed from the lock"


def test_dockerignore_allows_only_what_the_build_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "an allow-list: nothing enters the context unless named"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    for op, args in _instructions():
        if op != "COPY" or args.startswith("--from"):
            continue
        *sources, _ = shlex.split(args)
        for source in sources:
            source = source.rstrip("/")
            assert (ROOT / source).exists(), f"COPY {source}: no such file"
            assert any(source == a or source.startswith(a + "/") for a in allowed), (
                f"COPY {source} is excluded by .dockerignore"
            )
    for secret_place in (".env", ".run", ".venv", "var", ".git"):
        assert not any(secret_place == a or a.startswith(secret_place + "/") for a in allowed)
