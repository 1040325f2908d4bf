"""The chat page as a person uses it: Debian's Chromium, driven by Playwright, two users.

The stack's own CA is trusted by public-key pin (``--ignore-certificate-errors-spki-list`` with
the SPKI hashes of the CA and the server certificate; without it the same page fails with a
certificate error, checked first). Both users log in through the login form and open one room;
both pages show the two of them as present; a message typed in one page appears in the other
with the process that delivered it. Then the
worker one page is connected to is killed: the page shows it is reconnecting, comes back, and
both pages keep talking. Screenshots are kept in ``artifacts/browser/``; the assertions are on
the DOM.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from playwright.sync_api import Browser, Error, Page, expect, sync_playwright

from tests.faults.tools import record_figures
from tests.harness import TEST_PASSWORD, RunningStack

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "artifacts" / "browser"
ROOM = "browser-room"
#: Flags for a headless Chromium on a machine without network or GPU.
QUIET = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


#: Records every change of the page's #status state (chat.js sets data-state).
RECORD_STATES = """() => {
    window.__states = [];
    const status = document.getElementById("status");
    new MutationObserver(() => window.__states.push(status.dataset.state))
        .observe(status, {attributes: true, attributeFilter: ["data-state"]});
}"""


def spki_hash(pem_file: Path) -> str:
    """base64(sha256(SubjectPublicKeyInfo)): Chromium's public-key pin format."""
    certificate = x509.load_pem_x509_certificate(pem_file.read_bytes())
    spki = certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture(scope="module")
def chromium(browser_stack: RunningStack) -> Iterator[tuple[object, Browser]]:
    tls = browser_stack.stack.tls_dir
    pins = ",".join(spki_hash(tls / name) for name in ("ca.crt", "server.crt"))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=[*QUIET, f"--ignore-certificate-errors-spki-list={pins}"]
        )
        yield playwright, browser
        browser.close()


def open_chat_as(browser: Browser, stack: RunningStack, username: str) -> Page:
    page = browser.new_context(viewport={"width": 900, "height": 600}).new_page()
    page.goto(f"{stack.base_url}/accounts/login/?next=/chat/{ROOM}/")
    page.fill("#id_username", username)
    page.fill("#id_password", TEST_PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"**/chat/{ROOM}/")
    expect(page.locator("#status")).to_have_attribute("data-state", "open", timeout=15000)
    expect(page.locator("header .who")).to_contain_text(username)
    return page


def say(page: Page, text: str) -> None:
    page.fill("#message", text)
    page.press("#message", "Enter")


def message(page: Page, text: str) -> dict[str, str]:
    """The ``li.message`` showing ``text`` (waits for it): its user, text and delivering process."""
    item = page.locator("li.message", has_text=text)
    expect(item).to_have_count(1, timeout=15000)
    return {
        "user": item.locator(".user").inner_text(),
        "text": item.locator(".text").inner_text(),
        "route": item.locator(".route").inner_text(),
        "delivered_by": item.get_attribute("data-delivered-by") or "",
        "sent_by": item.get_attribute("data-sent-by") or "",
    }


def test_the_certificate_is_what_makes_the_page_load(
    browser_stack: RunningStack, chromium: tuple[object, Browser]
) -> None:
    """Without the pins, the same Chromium refuses the stack's certificate."""
    playwright, _ = chromium
    plain = playwright.chromium.launch(executable_path=CHROMIUM, args=QUIET)  # type: ignore[attr-defined]
    try:
        with pytest.raises(Error, match="ERR_CERT_AUTHORITY_INVALID"):
            plain.new_page().goto(f"{browser_stack.base_url}/chat/{ROOM}/")
    finally:
        plain.close()


def test_two_users_chat_and_survive_their_worker_dying(
    browser_stack: RunningStack, chromium: tuple[object, Browser]
) -> None:
    stack = browser_stack
    _, browser = chromium
    for name in ("ada", "grace"):
        stack.create_user(name)
    SHOTS.mkdir(parents=True, exist_ok=True)
    ada, grace = open_chat_as(browser, stack, "ada"), open_chat_as(browser, stack, "grace")
    # Both pages show who is here (ada's page learns of grace through presence.join).
    for page in (ada, grace):
        expect(page.locator("#presence-count")).to_have_text("2", timeout=15000)
        expect(page.locator("#presence-users")).to_have_text("ada, grace")

    say(ada, "hello from ada")
    seen_by_grace = message(grace, "hello from ada")
    seen_by_ada = message(ada, "hello from ada")
    assert seen_by_grace["user"] == "ada" and seen_by_grace["text"] == "hello from ada"
    process = re.compile(r"^[\w.-]+-app1:(\d+)$")
    assert process.match(seen_by_grace["delivered_by"]), seen_by_grace
    assert seen_by_grace["route"] == f"{seen_by_grace['sent_by']} → {seen_by_grace['delivered_by']}"
    assert seen_by_grace["sent_by"] == seen_by_ada["sent_by"]  # accepted once, by ada's worker
    grace.screenshot(path=str(SHOTS / "1-grace-sees-ada.png"), full_page=True)

    # Kill the worker grace's page is connected to (ada's too, if they share it).
    for page in (ada, grace):
        page.evaluate(RECORD_STATES)
    victim = int(process.match(seen_by_grace["delivered_by"]).group(1))
    assert victim in stack.worker_pids("app1")
    hit = [grace] + ([ada] if seen_by_ada["delivered_by"] == seen_by_grace["delivered_by"] else [])
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    for page in hit:
        page.wait_for_function(
            "() => window.__states.includes('reconnecting') && "
            "document.getElementById('status').dataset.state === 'open'",
            timeout=30000,
        )
    back_after = time.monotonic() - killed_at
    states = grace.evaluate("() => window.__states")
    assert states[0] == "reconnecting" and states[-1] == "open", states
    expect(ada.locator("#status")).to_have_attribute("data-state", "open")

    # Both ways, through the worker(s) still alive.
    say(ada, "after the kill")
    after = message(grace, "after the kill")
    assert after["delivered_by"] and process.match(after["delivered_by"])
    assert int(process.match(after["delivered_by"]).group(1)) != victim
    say(grace, "grace is back")
    assert message(ada, "grace is back")["user"] == "grace"
    expect(grace.locator("li.message")).to_have_count(3)
    expect(ada.locator("li.message")).to_have_count(3)
    expect(grace.locator("li.error")).to_have_count(0)
    grace.screenshot(path=str(SHOTS / "2-grace-after-reconnect.png"), full_page=True)
    ada.screenshot(path=str(SHOTS / "3-ada.png"), full_page=True)
    record_figures(
        "browser_reconnect",
        {
            "page_reconnected_after_kill_s": round(back_after, 3),
            "status_sequence": states,
            "killed": seen_by_grace["delivered_by"],
            "then_delivered_by": after["delivered_by"],
        },
    )


def test_a_page_whose_worker_dies_misses_nothing(
    browser_stack: RunningStack, chromium: tuple[object, Browser]
) -> None:
    """Kill the worker one page is connected to while the other page sends 5 messages: after
    its reconnect (a resume from the last offset it showed) the first page shows all 5, in
    order, once each."""
    stack = browser_stack
    _, browser = chromium
    for name in ("lin", "max"):
        stack.create_user(name)
    lin, max_ = open_chat_as(browser, stack, "lin"), open_chat_as(browser, stack, "max")
    say(lin, "where are you")
    where = message(max_, "where are you")
    victim = int(where["delivered_by"].rsplit(":", 1)[1])
    lin_pid = int(message(lin, "where are you")["delivered_by"].rsplit(":", 1)[1])
    max_.evaluate(RECORD_STATES)

    os.kill(victim, signal.SIGKILL)
    # Keep max's page away while lin sends: its browser goes offline until all 5 are accepted
    # (as a phone losing its network would), so they can only reach it by the resume.
    max_.wait_for_function("() => window.__states.includes('reconnecting')", timeout=30000)
    max_.context.set_offline(True)
    if lin_pid == victim:  # lin's page lost its worker too: its form waits for the socket
        lin.wait_for_function(
            "() => document.getElementById('status').dataset.state === 'open'", timeout=30000
        )
        expect(lin.locator("#status")).to_have_attribute("data-state", "open", timeout=30000)
    sent = [f"while away {n}" for n in range(5)]
    for text in sent:
        say(lin, text)
        message(lin, text)  # accepted: lin's own copy came back
    max_.context.set_offline(False)
    max_.wait_for_function(
        "() => document.getElementById('status').dataset.state === 'open'", timeout=30000
    )
    for text in sent:
        expect(max_.locator("li.message", has_text=text)).to_have_count(1, timeout=15000)
    texts = max_.locator("li.message .text").all_inner_texts()
    assert [t for t in texts if t.startswith("while away")] == sent
    assert texts.count("where are you") == 1  # nothing shown twice after the resume
    expect(max_.locator("li.notice")).to_have_count(0)  # recovered, not reloaded
    max_.screenshot(path=str(SHOTS / "4-max-after-resume.png"), full_page=True)
