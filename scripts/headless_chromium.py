"""Drive headless Chromium over the DevTools protocol on a pipe (no extra packages).

Chromium started with ``--remote-debugging-pipe`` reads DevTools commands (JSON, each
ended by a NUL byte) from file descriptor 3 and writes answers and events to file
descriptor 4. This module starts it that way and offers the few commands the
dashboard's browser test and ``make dashboard-screenshot`` need: open a page, evaluate
JavaScript, take a screenshot.

    with Browser() as b:
        page = b.open("http://127.0.0.1:9100/", width=1280, height=900)
        page.wait_for("window.dashboard && window.dashboard.polls > 2", timeout=30)
        page.screenshot("out.png")

:func:`find_chromium` returns the browser's path or None (Debian's ``chromium``
package installs ``/usr/bin/chromium``).
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
from typing import Any, Dict, List, Optional

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> Optional[str]:
    """The path of a Chromium-family browser, from ``$CHROMIUM`` or ``$PATH``."""
    env = os.environ.get("CHROMIUM")
    if env:
        return shutil.which(env) or (env if os.access(env, os.X_OK) else None)
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class BrowserError(RuntimeError):
    """The browser failed, answered with an error, or took too long."""


class Browser:
    """One headless Chromium process, talked to over the DevTools pipe."""

    def __init__(self, executable: Optional[str] = None, timeout: float = 60.0) -> None:
        exe = executable or find_chromium()
        if exe is None:
            raise BrowserError("no Chromium found (install Debian's chromium package, or set "
                               "$CHROMIUM)")
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="splitlearn-chromium-")
        cmd_r, self._cmd_w = os.pipe()
        self._resp_r, resp_w = os.pipe()
        args = [exe, "--headless=new", "--remote-debugging-pipe", "--no-sandbox",
                "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
                "--mute-audio", "--disable-background-networking", "--disable-sync",
                "--disable-component-update", "--disable-features=Translate,MediaRouter",
                "--force-color-profile=srgb", f"--user-data-dir={self._profile}",
                "about:blank"]
        # the browser wants the pipe on descriptors 3 and 4: let a shell put them there
        # (bash: dash accepts only one-digit descriptors in redirections)
        script = f'exec "$0" "$@" 3<&{cmd_r} 4>&{resp_w} {cmd_r}<&- {resp_w}>&-'
        self._log = tempfile.TemporaryFile()
        # not the sanitizer runtime a test run may preload into Python (make asan)
        env = {k: v for k, v in os.environ.items()
               if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")}
        self.proc = subprocess.Popen([shutil.which("bash") or "bash", "-c", script, *args],
                                     pass_fds=(cmd_r, resp_w), stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env)
        os.close(cmd_r)
        os.close(resp_w)
        self._buf = b""
        self._next_id = 0
        self._events: List[Dict[str, Any]] = []
        try:
            self.version = self.call("Browser.getVersion")
        except BaseException:
            self.close()
            raise

    # -- the protocol ---------------------------------------------------------------------

    def call(self, method: str, params: Optional[Dict[str, Any]] = None,
             session: Optional[str] = None, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Send one command and return its ``result`` (raise BrowserError on an error)."""
        self._next_id += 1
        msg: Dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        try:
            while data:
                data = data[os.write(self._cmd_w, data):]
        except OSError as e:
            raise BrowserError(f"the browser is gone ({e}){self._tail()}") from None
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self._events.append(reply)
                del self._events[:-200]

    def _read(self, deadline: float) -> Dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"the browser did not answer in time{self._tail()}")
            ready, _, _ = select.select([self._resp_r], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self._resp_r, 1 << 20)
                if not chunk:
                    raise BrowserError(f"the browser exited (status {self.proc.poll()})"
                                       f"{self._tail()}")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def _tail(self) -> str:
        try:
            self._log.seek(0)
            text = self._log.read().decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""
        return f"; its output ends: {text[-1500:]}" if text else ""

    # -- pages ----------------------------------------------------------------------------

    def open(self, url: str, width: int = 1280, height: int = 900, scale: float = 1.0,
             mobile: bool = False) -> "Page":
        """A new tab of ``width`` x ``height`` CSS pixels showing ``url``."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"]
        page = Page(self, session, width, height, scale, mobile)
        page.call("Page.enable")
        page.call("Runtime.enable")
        page.resize(width, height)
        page.call("Page.navigate", {"url": url})
        return page

    def close(self) -> None:
        """Close the browser (killing it if it does not exit) and delete its profile."""
        if self.proc.poll() is None:
            try:
                self.call("Browser.close", timeout=5)
            except BrowserError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for fd in (self._cmd_w, self._resp_r):
            try:
                os.close(fd)
            except OSError:
                pass
        self._log.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Page:
    """A tab of a :class:`Browser`."""

    def __init__(self, browser: Browser, session: str, width: int, height: int, scale: float,
                 mobile: bool) -> None:
        self.browser = browser
        self.session = session
        self.width, self.height, self.scale, self.mobile = width, height, scale, mobile

    def call(self, method: str, params: Optional[Dict[str, Any]] = None,
             timeout: Optional[float] = None) -> Dict[str, Any]:
        return self.browser.call(method, params, self.session, timeout)

    def resize(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": self.scale,
                   "mobile": self.mobile})
        self.width, self.height = width, height

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (promises awaited; JSON-able values)."""
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                           "awaitPromise": True})
        if "exceptionDetails" in r:
            details = r["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"JavaScript failed: {text}")
        return r.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, interval: float = 0.2) -> Any:
        """Evaluate ``expression`` until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            try:
                last = self.evaluate(expression)
            except BrowserError as e:  # the page may still be loading
                last = e
            if last and not isinstance(last, BrowserError):
                return last
            if time.monotonic() > deadline:
                raise BrowserError(f"waited {timeout:g} s for {expression!r}; last: {last!r}")
            time.sleep(interval)

    def screenshot(self, path: str, full_page: bool = True) -> str:
        """Save a PNG of the page (all of it when ``full_page``) to ``path``."""
        if full_page:
            height = int(self.evaluate("Math.ceil(document.documentElement.scrollHeight)") or 0)
            if height > self.height:
                self.resize(self.width, height)
                self.evaluate("new Promise(r => requestAnimationFrame(() => "
                              "requestAnimationFrame(r)))")
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        return path
