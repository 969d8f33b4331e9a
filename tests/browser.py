"""Headless Chromium (Debian's `chromium`) driven over the DevTools protocol, and a folder
served on 127.0.0.1, for the tests of the exported web page.

The protocol runs over `--remote-debugging-pipe` (Chromium reads commands from fd 3 and
writes replies and events to fd 4, each message JSON ended by a NUL byte): no websocket
client, no browser download, nothing beyond the standard library.
"""

from __future__ import annotations

import base64
import fcntl
import functools
import http.server
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def served(folder: Path):
    """http://127.0.0.1:PORT/ serving `folder` (python's http.server, in a thread)."""
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no line per request in the test output
        pass


class Browser:
    """One headless Chromium with one page (tab) attached."""

    def __init__(self, width: int = 900, height: int = 700):
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # the child's ends above fd 9, so that putting one at fd 3 cannot overwrite the other
        for end in (to_browser_r, from_browser_w):
            high = fcntl.fcntl(end, fcntl.F_DUPFD, 10)
            os.close(end)
            to_browser_r, from_browser_w = (
                (high, from_browser_w) if end == to_browser_r else (to_browser_r, high)
            )
        args = [
            "--headless",
            "--remote-debugging-pipe",
            "--no-sandbox",  # CI runs as root
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={self.profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        # bash puts the two pipe ends at fds 3 and 4, where Chromium looks for them
        script = f'exec "$0" "$@" 3<&{to_browser_r} 4>&{from_browser_w}'
        self.proc = subprocess.Popen(
            ["bash", "-c", script, CHROMIUM, *args],
            pass_fds=(to_browser_r, from_browser_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self.call("Page.enable", session=True)
        self.call("Runtime.enable", session=True)

    # ------------------------------------------------------------ protocol

    def _read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium did not answer")
            import select

            ready, _, _ = select.select([self._from_browser], [], [], 1.0)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium exited (status {self.proc.poll()})")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: bool = False, timeout: float = 60, **params) -> dict:
        """Send one command; its result (events read meanwhile are dropped)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(max(0.1, deadline - time.monotonic()))
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    # ------------------------------------------------------------ page

    def evaluate(self, expression: str, timeout: float = 60):
        """The value of a JavaScript expression in the page (a promise is awaited)."""
        result = self.call(
            "Runtime.evaluate",
            session=True,
            timeout=timeout,
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        """Navigate and wait until the page's script has loaded the model (or failed)."""
        self.call("Page.navigate", session=True, url=url)
        self.wait("document.readyState === 'complete' && document.getElementById('go') "
                  "&& (!document.getElementById('go').disabled || "
                  "document.getElementById('out').dataset.state !== 'idle')")  # fmt: skip

    def wait(self, condition: str, timeout: float = 60):
        """Poll a JavaScript condition in the page until it is true."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.evaluate(f"!!({condition})"):
                    return
            except RuntimeError:  # a navigation replaced the context
                pass
            time.sleep(0.05)
        raise TimeoutError(f"waited {timeout} s for {condition}")

    def type_into(self, selector: str, text: str) -> None:
        """Replace an input's text by typing `text` (Input.insertText, as an IME does)."""
        self.evaluate(
            f"(e => {{ e.value = ''; e.focus(); }})(document.querySelector({selector!r}))"
        )
        self.call("Input.insertText", session=True, text=text)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def fonts_for(self, selector: str) -> list[dict]:
        """The platform fonts that render the text of the element (CSS.getPlatformFontsForNode)."""
        self.call("DOM.enable", session=True)
        self.call("CSS.enable", session=True)
        root = self.call("DOM.getDocument", session=True)["root"]["nodeId"]
        node = self.call("DOM.querySelector", session=True, nodeId=root, selector=selector)
        return self.call("CSS.getPlatformFontsForNode", session=True, nodeId=node["nodeId"])[
            "fonts"
        ]

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=10)
        os.close(self._to_browser)
        os.close(self._from_browser)
        shutil.rmtree(self.profile, ignore_errors=True)
