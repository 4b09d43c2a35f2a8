"""Headless Chromium for the report tests, over the DevTools protocol on a pipe.

``open_page(html_file, screenshot)`` starts ``chromium-headless-shell`` (or ``chromium``)
with ``--remote-debugging-pipe``, loads the file, collects console errors, uncaught
exceptions and failed loads, evaluates a few DOM facts (plots, decoded images) and saves a
full-page screenshot. No network and no Python package beyond the standard library: the
protocol is JSON messages separated by NUL bytes on file descriptors 3 (in) and 4 (out).

Install the browser with ``apt-get install chromium-headless-shell`` (.ci/run does).
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")

# What the page tells about itself once loaded.
FACTS_JS = """(() => {
  const imgs = [...document.images];
  const figs = [...document.querySelectorAll('figure.plot')];
  return {
    title: document.title,
    images: imgs.length,
    broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
    groups: figs.map(f => f.dataset.group).filter(g => g),
    keys: figs.map(f => f.dataset.key),
    height: document.documentElement.scrollHeight,
    external: [...document.querySelectorAll('[src],[href]')]
      .map(e => e.getAttribute('src') || e.getAttribute('href'))
      .filter(u => /^(https?:)?\\/\\//.test(u)),
    text: document.body.innerText.length,
  };
})()"""


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


class Page:
    def __init__(self, browser: str):
        self.profile = tempfile.mkdtemp(prefix="selfloop-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        def child_fds():  # the child's fd 3 reads our commands, its fd 4 writes to us
            a, b = os.dup(to_child_r), os.dup(from_child_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-pipe", f"--user-data-dir={self.profile}",
             "--window-size=1280,900", "--hide-scrollbars", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False, preexec_fn=child_fds,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        self.session: str | None = None

    def _send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        return self._id

    def _read(self, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    raise RuntimeError("the browser closed its DevTools pipe")
                self._buf += chunk
        raw, _, self._buf = self._buf.partition(b"\0")
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, timeout: float = 60) -> dict:
        want = self._send(method, params, self.session)
        deadline = time.monotonic() + timeout
        while True:
            msg = self._read(max(0.0, deadline - time.monotonic()))
            if msg is None:
                raise TimeoutError(f"no reply to {method} in {timeout}s")
            if msg.get("id") == want:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            msg = self._read(max(0.0, deadline - time.monotonic()))
            if msg is None:
                raise TimeoutError(f"no {method} in {timeout}s")
            if msg.get("method") == method:
                return msg
            self.events.append(msg)

    def attach(self) -> None:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.session = session
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")

    def close(self) -> None:
        try:
            self.session = None
            self._send("Browser.close")
            self.proc.wait(timeout=20)
        except Exception:  # noqa: BLE001 - make sure it is gone
            self.proc.kill()
            self.proc.wait(timeout=20)
        finally:
            os.close(self._to_child)
            os.close(self._from_child)
            shutil.rmtree(self.profile, ignore_errors=True)


def open_page(html_file: Path, screenshot: Path, browser: str) -> dict:
    """Load ``html_file``; returns its facts plus ``errors`` (console errors, exceptions,
    failed loads, error log entries) and ``requests`` (every URL the page fetched)."""
    page = Page(browser)
    try:
        page.attach()
        page.call("Page.navigate", {"url": Path(html_file).resolve().as_uri()})
        page.wait_event("Page.loadEventFired", timeout=120)
        facts = page.call("Runtime.evaluate", {"expression": FACTS_JS, "returnByValue": True})
        facts = facts["result"]["value"]
        width, height = 1280, min(int(facts["height"]), 16000)
        page.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        shot = page.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        errors, requests = [], []
        for e in page.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(f"console.{params['type']}: {params.get('args')}")
            elif method == "Runtime.exceptionThrown":
                errors.append(f"exception: {params.get('exceptionDetails', {}).get('text')}")
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                errors.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
            elif method == "Network.loadingFailed":
                errors.append(f"failed load: {params.get('errorText')}")
            elif method == "Network.requestWillBeSent":
                requests.append(params.get("request", {}).get("url", ""))
        facts.update(errors=errors, requests=requests)
        return facts
    finally:
        page.close()
