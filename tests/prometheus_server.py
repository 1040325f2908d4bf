"""A real Prometheus server (Debian's ``prometheus`` package) on a free loopback port.

It scrapes the given targets every second and loads the given rule files, so the tests can ask
it what an operator's Prometheus would see, in PromQL through its HTTP API.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from tests.harness import free_port_block

SCRAPE_SECONDS = 1
JOB = "switchboard"


def binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/sbin")
    if found is None:
        raise RuntimeError(f"{name} is not installed (Debian/Ubuntu: apt-get install prometheus)")
    return found


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant vector query's result (``[{"metric": {...}, "value": [t, "v"]}, ...]``)."""
        data = self.api("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]

    def value(self, expr: str) -> float:
        """The one value of a query that returns one series."""
        result = self.query(expr)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def wait_for_scrapes_after(self, moment: float, timeout: float = 20) -> None:
        """Until every target has a successful scrape that started after ``moment``
        (``time.time()``); a failed scrape (a loaded machine) is followed by the next one."""
        deadline = time.monotonic() + timeout
        up = f'up{{job="{JOB}"}}'
        while time.monotonic() < deadline:
            # timestamp() of a plain selector is the scrape's time (of an expression such as
            # ``up == 1``, Prometheus 2.42 gives the evaluation time instead).
            scraped = {
                r["metric"]["instance"]: float(r["value"][1])
                for r in self.query(f"timestamp({up})")
            }
            healthy = {r["metric"]["instance"]: r["value"][1] == "1" for r in self.query(up)}
            if scraped and all(t > moment for t in scraped.values()) and all(healthy.values()):
                return
            time.sleep(0.25)
        raise TimeoutError(
            f"no successful scrape of every target after {moment} within {timeout} s: "
            f"{self.query(up)}"
        )


@contextmanager
def prometheus_server(
    directory: Path, targets: Sequence[str], rule_files: Sequence[Path] = ()
) -> Iterator[Prometheus]:
    """Prometheus scraping ``targets`` (``host:port``, path ``/metrics``) every second."""
    port = free_port_block(1)
    config = {
        "global": {
            "scrape_interval": f"{SCRAPE_SECONDS}s",
            "scrape_timeout": f"{SCRAPE_SECONDS}s",
            "evaluation_interval": f"{SCRAPE_SECONDS}s",
        },
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": list(targets)}]}],
    }
    config_file = directory / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    check = subprocess.run(
        [binary("promtool"), "check", "config", str(config_file)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    log = (directory / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            binary("prometheus"),
            f"--config.file={config_file}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "prometheus did not start:\n" + (directory / "prometheus.log").read_text()
                )
            time.sleep(0.2)
        yield Prometheus(url)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
