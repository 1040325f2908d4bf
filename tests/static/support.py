"""Reading the deployment files the way their tools do: compose interpolation, rendered k8s."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
#: Redis topology -> the override files added with -f for it (README, "Run it in containers").
COMPOSE_TOPOLOGIES: dict[str, tuple[Path, ...]] = {
    "single": (),
    "cluster": (ROOT / "docker-compose.redis-cluster.yml",),
    "sentinel": (ROOT / "docker-compose.redis-sentinel.yml",),
}
COMPOSE_FILES = (COMPOSE_FILE, *(f for files in COMPOSE_TOPOLOGIES.values() for f in files))
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
#: What tests/static renders with `kubectl kustomize`: each overlay as shipped, and each with its
#: Redis swapped for components/redis-sentinel the way the overlay's comment and README.md say
#: (one line of its kustomization.yaml). target -> (overlay, (line, replacement) or None).
K8S_TARGETS: dict[str, tuple[str, tuple[str, str] | None]] = {
    "local": ("local", None),
    "production": ("production", None),
    "local+redis-sentinel": ("local", ("  - redis\n", "  - ../../components/redis-sentinel\n")),
    "production+redis-sentinel": (
        "production",
        ("  - ../../components/managed-redis-cluster\n", "  - ../../components/redis-sentinel\n"),
    ),
}
OVERLAYS = tuple(K8S_TARGETS)


def overlay_of(target: str) -> str:
    """The overlay directory a render target builds on (``local`` or ``production``)."""
    return K8S_TARGETS[target][0]


def redis_kind(target: str) -> str:
    """Which Redis a target runs the layer on: ``single``, ``managed-cluster`` or ``sentinel``."""
    if K8S_TARGETS[target][1] is not None:
        return "sentinel"
    return "single" if overlay_of(target) == "local" else "managed-cluster"


def kustomize_directory(target: str, scratch: Path) -> Path:
    """The overlay directory to render for ``target``: the repository's own, or a copy of k8s/
    with the one documented line of the overlay's kustomization.yaml swapped."""
    overlay, swap = K8S_TARGETS[target]
    if swap is None:
        return ROOT / "k8s" / "overlays" / overlay
    copy = scratch / target / "k8s"
    shutil.copytree(ROOT / "k8s", copy)
    kustomization = copy / "overlays" / overlay / "kustomization.yaml"
    text = kustomization.read_text()
    line, replacement = swap
    assert text.count(line) == 1, f"{overlay}: the documented line {line!r} is not there once"
    kustomization.write_text(text.replace(line, replacement))
    return kustomization.parent


#: Services that run once and exit; everything else must be healthy to be depended on.
ONE_SHOT_SERVICES = {"certs", "migrate", "redis-cluster-create"}


def interpolate(value: str, environ: Mapping[str, str]) -> str:
    """Compose's ``${NAME}``, ``${NAME:-default}``, ``${NAME-default}`` (defaults may nest) and
    ``$$``, with ``environ`` as the only source, like ``docker compose config`` with no .env."""
    out: list[str] = []
    i = 0
    while i < len(value):
        if value.startswith("$$", i):
            out.append("$")
            i += 2
        elif value.startswith("${", i):
            end, name, op, default = _parse_braced(value, i)
            present = name in environ and (op != ":-" or environ[name] != "")
            if present:
                out.append(environ[name])
            elif op in (":-", "-"):
                out.append(interpolate(default, environ))
            elif op is None:
                out.append("")
            else:
                raise ValueError(f"{name} is required: {default}")
            i = end
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def _parse_braced(value: str, start: int) -> tuple[int, str, str | None, str]:
    """``(end, name, operator, default)`` of the ``${...}`` at ``start`` (nesting allowed)."""
    depth, i = 0, start
    while i < len(value):
        if value.startswith("${", i):
            depth += 1
            i += 2
            continue
        if value[i] == "}":
            depth -= 1
            if depth == 0:
                break
        i += 1
    else:
        raise ValueError(f"unterminated ${{ in {value!r}")
    body = value[start + 2 : i]
    match = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(:-|-|:\?|\?)?", body)
    if not match:
        raise ValueError(f"bad variable in {value!r}")
    name, op = match.group(1), match.group(2)
    return i + 1, name, op, body[match.end() :]


def variables(value: str) -> Iterator[tuple[str, str | None]]:
    """Every ``(NAME, default)`` referenced in ``value``, nested ones included."""
    i = 0
    while i < len(value):
        if value.startswith("$$", i):
            i += 2
        elif value.startswith("${", i):
            end, name, op, default = _parse_braced(value, i)
            yield name, (default if op in (":-", "-") else None)
            yield from variables(default)
            i = end
        else:
            i += 1


def walk_strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, item in node.items():
            yield from walk_strings(key)
            yield from walk_strings(item)
    elif isinstance(node, list):
        for item in node:
            yield from walk_strings(item)


def resolve(node: Any, environ: Mapping[str, str]) -> Any:
    """The compose document with every string interpolated."""
    if isinstance(node, str):
        return interpolate(node, environ)
    if isinstance(node, dict):
        return {key: resolve(item, environ) for key, item in node.items()}
    if isinstance(node, list):
        return [resolve(item, environ) for item in node]
    return node


def load_compose_raw(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


#: Service attributes an overriding file replaces instead of merging (compose-spec merge.md).
_REPLACED_ON_MERGE = {("command",), ("entrypoint",), ("healthcheck", "test")}


def merge_compose(base: Any, override: Any, path: tuple[str, ...] = ()) -> Any:
    """``docker compose -f base -f override``'s merge, by the compose spec's rules (merge.md):
    mappings merge key by key, sequences append, and ``command``, ``entrypoint`` and
    ``healthcheck.test`` are replaced. The docker client here has no compose plugin, so
    ``docker compose config`` cannot do it; this covers what the override files use and refuses
    the rest (a sequence where the base has a mapping, or list-form environment/depends_on,
    which compose would first normalise)."""
    within_service = path[2:] if path[:1] == ("services",) else ()
    if within_service in _REPLACED_ON_MERGE:
        return override
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge_compose(base[key], value, (*path, key)) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(override, list):
        if within_service[:1] in {("environment",), ("depends_on",)}:
            raise TypeError(f"{'.'.join(path)}: use the mapping form to merge")
        return base + override
    if isinstance(base, (dict, list)) or isinstance(override, (dict, list)):
        raise TypeError(f"{'.'.join(path)}: cannot merge {type(base)} with {type(override)}")
    return override


def load_compose_topology_raw(topology: str) -> dict[str, Any]:
    """docker-compose.yml merged with the override files of one Redis topology, uninterpolated."""
    merged = load_compose_raw()
    for path in COMPOSE_TOPOLOGIES[topology]:
        merged = merge_compose(merged, load_compose_raw(path))
    return merged


def load_compose(
    environ: Mapping[str, str] | None = None, topology: str = "single"
) -> dict[str, Any]:
    """docker-compose.yml (plus the override files of ``topology``) as `docker compose up` sees
    it with no .env (or with ``environ``)."""
    return resolve(load_compose_topology_raw(topology), environ or {})


def compose_variables() -> dict[str, set[str | None]]:
    """NAME -> every default it is given in docker-compose.yml and its override files."""
    found: dict[str, set[str | None]] = {}
    for path in COMPOSE_FILES:
        for text in walk_strings(load_compose_raw(path)):
            for name, default in variables(text):
                found.setdefault(name, set()).add(default)
    return found


def env_example() -> dict[str, str]:
    """The variables .env.example documents: ``NAME=value`` lines, commented out or not."""
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"#?\s*([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match:
            values[match.group(1)] = match.group(2)
    return values


def seconds(duration: str | int) -> float:
    """Compose/Go durations such as ``30s``, ``1m30s`` or ``500ms``."""
    if isinstance(duration, int):
        return float(duration)
    total, units = 0.0, {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a duration: {duration!r}")
    for number, unit in parts:
        total += float(number) * units[unit]
    return total


def redis_url_parts(url: str) -> dict[str, Any]:
    parsed = urllib.parse.urlsplit(url)
    return {
        "scheme": parsed.scheme,
        "host": parsed.hostname,
        "port": parsed.port,
        "db": parsed.path.lstrip("/"),
        "username": parsed.username or "",
        "password": parsed.password,
    }


# -- rendered kustomize output -------------------------------------------------------------------


def load_manifests(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        doc
        for doc in docs
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``("Kind/name", pod spec)`` of every workload."""
    for doc in docs:
        if doc["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def generated_name(docs: list[dict[str, Any]], kind: str, prefix: str) -> str | None:
    """The name kustomize gave a generated object (``prefix-<hash>``), if it is rendered."""
    for doc in docs:
        name = doc["metadata"]["name"]
        if doc["kind"] == kind and re.fullmatch(re.escape(prefix) + r"(-[a-z0-9]{10})?", name):
            return name
    return None


def app_container_env(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """What the app container's environment is made of: ConfigMap values and explicit env
    (a string value, or ``("secret", key)`` / ``("field", path)`` for references)."""
    deployment = one(docs, "Deployment", "switchboard")
    container = next(
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "app"
    )
    environ: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        config = one(docs, "ConfigMap", source["configMapRef"]["name"])
        environ.update(config["data"])
    for item in container.get("env", []):
        if "value" in item:
            environ[item["name"]] = item["value"]
        elif "secretKeyRef" in item["valueFrom"]:
            environ[item["name"]] = ("secret", item["valueFrom"]["secretKeyRef"]["key"])
        else:
            environ[item["name"]] = ("field", item["valueFrom"]["fieldRef"]["fieldPath"])
    return environ


# -- deployment files run for real, in a private network namespace ------------------------------


def wait_for(condition: Callable[[], bool], limit: float) -> float | None:
    """Seconds until ``condition()`` held (polled every 0.1 s), or None after ``limit``."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if condition():
            return round(time.monotonic() - start, 2)
        time.sleep(0.1)
    return None


def run_isolated(module: str, *args: str, timeout: float = 240) -> dict[str, Any]:
    """``python -m module *args`` in a new network, mount and PID namespace (only loopback, its
    own /etc/hosts, every process it started gone when it ends); the JSON it prints last."""
    namespace = ["unshare", "--net", "--mount", "--pid", "--fork", "--mount-proc"]
    if os.geteuid() != 0:
        namespace.insert(1, "--map-root-user")
    result = subprocess.run(
        [*namespace, sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
