"""Screenshot of the asset graph as the Dagster UI shows it: docs/asset_graph.png.

    python docs/asset_graph.py                 # with the project's venv: .venv/bin/python
    python docs/asset_graph.py --out x.png --width 1250 --height 1300 --scale 2

Starts the real `dagster-webserver` on `workspace.yaml` against a throw-away instance (a
temporary DAGSTER_HOME with the project's dagster.yaml, so the repository's `.dagster_home`
and its runs are untouched), opens its "Global asset lineage" page in headless Chromium,
dismisses the first-visit dialog, expands every group, lays the graph out top to bottom, hides
the side panels, zooms to fit and saves the page as a PNG. Both processes are stopped at the
end, also on failure.

Needs Chromium (Debian: `apt-get install chromium`; or `--chromium PATH`). The browser is
driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`), so the script needs
nothing beyond the standard library and the project's own packages.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGE = "/asset-groups"  # the UI's "Global asset lineage"
START_TIMEOUT_S = 180.0

# Helpers the page-side steps share (evaluated once per page load).
PAGE_HELPERS = """
window.lkgSleep = ms => new Promise(r => setTimeout(r, ms));
window.lkgButtons = icon => [...document.querySelectorAll('button')]
    .filter(b => b.querySelector(`[aria-label="${icon}"]`));
window.lkgByText = t => [...document.querySelectorAll('button, [role=menuitem]')]
    .find(b => b.innerText.trim().startsWith(t));
window.lkgGraphMenu = async item => {
  // the graph's own settings menu is the last "settings" button (the first is the UI's)
  if (!lkgByText(item)) { const g = lkgButtons('settings'); g[g.length - 1].click();
                          await lkgSleep(800); }
  const entry = lkgByText(item);
  if (!entry) throw new Error('the graph menu has no entry ' + item);
  entry.click(); await lkgSleep(1200);
};
window.lkgSkipDialog = async () => {  // the first-visit dialog opens a moment after the page
  for (let i = 0; i < 20; i++) {
    const skip = lkgByText('Skip');
    if (skip) { skip.click(); await lkgSleep(500); return true; }
    await lkgSleep(250);
  }
  return false;
};
window.lkgViewport = () => [...document.querySelectorAll('svg')]
    .filter(s => s.getBoundingClientRect().width > 300).map(s => s.parentElement)[0];
true
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_chromium(given: str | None) -> str:
    for name in [given] if given else ["chromium", "chromium-browser", "google-chrome"]:
        path = shutil.which(name) or (name if name and Path(name).is_file() else None)
        if path:
            return path
    raise SystemExit(
        "no Chromium found: install it (Debian: apt-get install chromium) or pass --chromium PATH"
    )


class Chromium:
    """Headless Chromium driven over the DevTools protocol on fds 3 (commands) and 4 (replies),
    messages as JSON separated by NUL bytes."""

    def __init__(self, binary: str, profile: Path, width: int, height: int) -> None:
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()

        def wire_fds() -> None:  # in the child, before exec: the pipe ends become fds 3 and 4
            a, b = os.dup2(to_browser_r, 100), os.dup2(from_browser_w, 101)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--no-first-run",
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            close_fds=False,
            preexec_fn=wire_fds,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self.commands = os.fdopen(to_browser_w, "wb", buffering=0)
        self.replies = os.fdopen(from_browser_r, "rb", buffering=0)
        self.pending = b""
        self.last_id = 0
        self.session: str | None = None

    def send(self, method: str, params: dict | None = None, browser: bool = False) -> dict:
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params or {}}
        if self.session and not browser:
            message["sessionId"] = self.session
        self.commands.write(json.dumps(message).encode() + b"\0")
        while True:  # events arrive in between: skip them
            while b"\0" not in self.pending:
                chunk = self.replies.read(1 << 16)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self.pending += chunk
            raw, self.pending = self.pending.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open_page(self, width: int, height: int, scale: float) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, browser=True)
        self.session = self.send(
            "Target.attachToTarget",
            {"targetId": target["targetId"], "flatten": True},
            browser=True,
        )["sessionId"]
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": scale, "mobile": False},
        )

    def js(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(details.get("exception", {}).get("description", str(details)))
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.js(expression):
                    return
            except RuntimeError:  # the page is still loading: its context may be replaced
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.5)

    def screenshot(self, out: Path) -> None:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        out.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        stop(self.proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group this script started, SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def start_webserver(home: Path, port: int, log: Path) -> subprocess.Popen:
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    webserver = Path(sys.executable).with_name("dagster-webserver")
    proc = subprocess.Popen(
        [str(webserver), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dagster-webserver exited; its log: {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2):
                return proc
        except OSError:
            time.sleep(1)
    stop(proc)
    raise RuntimeError(f"dagster-webserver did not answer in {START_TIMEOUT_S:.0f} s; log: {log}")


def capture(browser: Chromium, url: str, out: Path) -> None:
    browser.send("Page.navigate", {"url": url})
    browser.wait_for("!!document.querySelector('svg')", "the page")
    browser.js(PAGE_HELPERS)
    # The graph's groups are in the DOM once the code location has loaded.
    browser.wait_for(
        "[...document.querySelectorAll('button')].some("
        "b => b.innerText.trim().startsWith('retrieval'))",
        "the asset groups",
        120,
    )
    browser.js("lkgSkipDialog()")
    # Both settings are kept in the page's localStorage: the reload lays the graph out anew
    # and fits it to the window.
    browser.js("lkgGraphMenu('Expand all groups')")
    browser.js("lkgGraphMenu('Change graph to vertical')")
    browser.send("Page.reload")
    browser.wait_for("!!document.querySelector('svg')", "the page after reload")
    browser.js(PAGE_HELPERS)
    browser.wait_for(
        "[...document.querySelectorAll('svg *')].some("
        "e => e.textContent.trim() === 'recommendations')",
        "the asset nodes",
        120,
    )
    browser.js("""(async () => {
      await lkgSkipDialog();
      lkgByText('Hide navigation')?.click(); await lkgSleep(300);
      lkgButtons('panel_show_right')[0]?.click(); await lkgSleep(800);
      lkgViewport().dispatchEvent(new MouseEvent('dblclick', {bubbles: true}));  // zoom to fit
      await lkgSleep(2500);
      lkgButtons('zoom_out')[0]?.click();  // one step out, so the toolbar covers no node
      await lkgSleep(1500);
    })()""")
    browser.screenshot(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "asset_graph.png")
    parser.add_argument("--chromium", help="the browser binary (default: chromium on PATH)")
    parser.add_argument("--width", type=int, default=1250, help="window width, CSS pixels")
    parser.add_argument("--height", type=int, default=1300, help="window height, CSS pixels")
    parser.add_argument("--scale", type=float, default=1.5, help="device pixels per CSS pixel")
    args = parser.parse_args()
    chromium = find_chromium(args.chromium)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="lkg-asset-graph-") as tmp:
        home, profile = Path(tmp, "dagster_home"), Path(tmp, "profile")
        home.mkdir()
        webserver = start_webserver(home, port, Path(tmp, "webserver.log"))
        try:
            browser = Chromium(chromium, profile, args.width, args.height)
            try:
                browser.open_page(args.width, args.height, args.scale)
                capture(browser, f"http://127.0.0.1:{port}{PAGE}", args.out)
            finally:
                browser.close()
        finally:
            stop(webserver)
    sys.stdout.write(f"wrote {args.out}\n")


if __name__ == "__main__":
    main()
