"""report.html: self-contained, and it renders in headless Chromium with its gallery and no console error.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: NUL-separated JSON on
file descriptors 3 and 4), so the test needs no websocket client and no browser download, only Debian's
`chromium` (installed by .ci/run).
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest
import report_fixtures as rf
from PIL import Image

from vopd_bench import analysis
from vopd_bench.html_report import gallery_cases, write_html_report
from vopd_bench.samples import Sample

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--remote-debugging-pipe", "about:blank"]


class Chromium:
    """A headless Chromium and one page, over the DevTools pipe. Collects console errors, uncaught exceptions
    and error log entries (failed loads) of the page."""

    def __init__(self, timeout: float = 30.0):
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        assert exe, "Chromium is required for this test (Debian: apt-get install -y chromium)"
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="vopd-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def wire_fds() -> None:  # in the child: the protocol wants to read fd 3 and write fd 4
            a = fcntl.fcntl(to_child_r, fcntl.F_DUPFD_CLOEXEC, 10)
            b = fcntl.fcntl(from_child_w, fcntl.F_DUPFD_CLOEXEC, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}"],
                                     preexec_fn=wire_fds, close_fds=False,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_child, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buf += chunk
        raw, _, self._buf = self._buf.partition(b"\0")
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, session: bool = False) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            m = self._read_message(deadline)
            if m.get("id") == self._next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m["result"]
            if "method" in m:
                self.events.append(m)

    def wait_for(self, method: str) -> dict:
        deadline = time.monotonic() + self.timeout
        for i, e in enumerate(self.events):
            if e["method"] == method:
                return self.events.pop(i)
        while True:
            m = self._read_message(deadline)
            if m.get("method") == method:
                return m
            if "method" in m:
                self.events.append(m)

    def load(self, url: str, width: int = 1280, height: int = 900) -> None:
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=True)
        self.call("Page.navigate", {"url": url}, session=True)
        self.wait_for("Page.loadEventFired")
        self.evaluate("1")  # drain events queued before the load finished

    def evaluate(self, expression: str):
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def errors(self) -> list[str]:
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif e["method"] == "Runtime.exceptionThrown":
                out.append("exception: " + p["exceptionDetails"].get("text", ""))
            elif e["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
        return out

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=True)
        path.write_bytes(base64.b64decode(data["data"]))
        return path

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, OSError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_child)
        os.close(self._from_child)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    b = Chromium()
    yield b
    b.close()


N = 24
PROCEDURAL = "procedural-toy"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real run on a local benchmark, plus a copy of its records posing as a procedural benchmark (no image
    path; images only through the sample lookup)."""
    tmp = tmp_path_factory.mktemp("html")
    bench = rf.write_benchmark(tmp / "data", N)
    result = rf.run(bench, tmp / "run", rf.before, "toy-before")
    procedural = [replace(r, benchmark=PROCEDURAL, image=None, key=r.key + "p") for r in result.records]
    records = result.records + procedural
    summary = analysis.summarize(records)
    run_info = json.loads((tmp / "run" / "run.json").read_text())
    return tmp, records, summary, run_info


def lookup(benchmark: str, sample_id: str) -> Sample | None:
    if benchmark != PROCEDURAL:
        return None
    i = int(sample_id[1:])
    img, box = rf.draw_sample(i)
    return Sample(sample_id, lambda: rf.draw_sample(i)[0], rf.question(i), tuple(rf.NAMES), rf.answer_letter(i),
                  boxes=(tuple(box),))


def recoverable_ids(outcome) -> list[int]:
    return [i for i in range(N) if outcome(i, "full") != "right" and outcome(i, "crop") == "right"]


def test_report_renders_in_chromium_with_gallery(run, browser, tmp_path):
    tmp, records, summary, run_info = run
    path = write_html_report(tmp_path, summary, records, run_info, sample_lookup=lookup)
    page = path.read_text()
    # Self-contained: nothing fetched from anywhere.
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", page)

    browser.load(path.resolve().as_uri())
    assert browser.errors() == []
    assert browser.evaluate("performance.getEntriesByType('resource').length") == 0

    n_rec = len(recoverable_ids(rf.before))  # per benchmark, by the fixture's script
    assert n_rec == 11  # 11 of 24 by the script's arithmetic (see report_fixtures.before)
    cards = browser.evaluate("""Array.from(document.querySelectorAll('.gallery .case')).map(c => ({
        id: c.querySelector('h3').firstChild.textContent.trim(),
        bench: c.querySelector('h3 small').textContent.split(' · ')[0],
        imgs: Array.from(c.querySelectorAll('img')).map(i => [i.complete, i.naturalWidth, i.naturalHeight]),
        right: c.querySelector('li.right').textContent,
        verdicts: Array.from(c.querySelectorAll('table.answers tr td:nth-child(3)')).map(t => t.textContent)}))""")
    assert len(cards) == 2 * n_rec  # both benchmarks, all cases (under the default cap of 60)
    assert {c["bench"] for c in cards} == {"local:toyset", PROCEDURAL}
    for c in cards:
        assert len(c["imgs"]) == 2, c  # full image with its box, and the crop
        assert all(complete and w > 0 and h > 0 for complete, w, h in c["imgs"]), c
        i = int(c["id"][1:])
        assert i in recoverable_ids(rf.before)
        assert c["right"].startswith(f"({rf.answer_letter(i)}) {rf.NAMES[i % 4]}")
        assert c["verdicts"][:2] == ["✗ wrong", "✓ right"]  # full, crop
    figures = browser.evaluate("Array.from(document.querySelectorAll('.figures img')).map(i => i.naturalWidth)")
    assert len(figures) == 3 and all(w > 0 for w in figures)
    assert f"Showing {2 * n_rec} of {2 * n_rec} recoverable cases" in browser.evaluate("document.body.innerText")

    shot = browser.screenshot(tmp_path / "report.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(shot).convert("RGB")
    assert img.width > 1200 and img.height > 2000  # the whole page (less a scrollbar), gallery included
    assert len(img.getcolors(1 << 20) or range(1 << 20)) > 200  # not a blank page


def test_outline_is_drawn_on_the_evidence(run, tmp_path):
    """The first gallery image of a case shows a red outline around the evidence box, in thumbnail pixels."""
    tmp, records, summary, run_info = run
    path = write_html_report(tmp_path, summary, records, run_info, sample_lookup=lookup, max_gallery=4)
    page = path.read_text()
    cases = re.findall(r'<article class="case" id="case-([^"]+)-(s\d+)">.*?<img src="data:image/jpeg;base64,([^"]+)"',
                       page, flags=re.S)
    assert len(cases) == 4
    for _, sid, b64 in cases:
        i = int(sid[1:])
        thumb = Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")
        src, (x1, y1, x2, y2) = rf.draw_sample(i)
        s = thumb.width / src.width
        # 1 px outside the box's left edge, at its vertical middle: the 2 px outline lies there.
        px = thumb.getpixel((int(x1 * s) - 1, int((y1 + y2) / 2 * s)))
        assert px[0] > 170 and px[1] < 90 and px[2] < 90, (sid, px)
        # The canvas far from the box stays grey.
        far = thumb.getpixel((2, 2)) if x1 > 20 or y1 > 20 else thumb.getpixel((thumb.width - 3, thumb.height - 3))
        assert abs(far[0] - far[1]) < 20, (sid, far)


def test_gallery_cap_order_and_missing_images(run, tmp_path):
    tmp, records, summary, run_info = run
    cases, totals = gallery_cases(records, max_gallery=5)
    assert totals == {"local:toyset": 11, PROCEDURAL: 11}
    # Round-robin across benchmarks (3 + 2), each smallest evidence first.
    assert [c.benchmark for c in cases] == ["local:toyset"] * 3 + [PROCEDURAL] * 2
    areas = {r.sample_id: r.evidence_area for r in records if r.benchmark == PROCEDURAL and r.view == "full"}
    smallest = sorted((areas[f"s{i:03d}"], f"s{i:03d}") for i in recoverable_ids(rf.before))
    assert [c.sample_id for c in cases[:3]] == [sid for _, sid in smallest[:3]]
    assert [c.sample_id for c in cases[3:]] == [sid for _, sid in smallest[:2]]

    # Without a lookup the procedural cases say why they have no image, and the page has no broken <img>.
    path = write_html_report(tmp_path, summary, records, run_info, max_gallery=5)
    page = path.read_text()
    assert "Showing 5 of 22 recoverable cases (local:toyset: 3 of 11; procedural-toy: 2 of 11)" in page
    assert page.count("image not shown: no image reference") == 2
    assert page.count('<img src="data:image/jpeg') == 2 * 3


LONG = "local:field-photos-of-street-signs-2026-q3"


def test_results_fit_1300_px_with_every_column_and_warn_of_parse_failures(run, browser, tmp_path):
    """At 1,300 px nothing scrolls sideways, no table hides a column, no header cell is blank, and a benchmark
    whose answers often fail to parse gets a warning right under the results table."""
    tmp, records, _, run_info = run
    # a third benchmark with a long name, whose full-view answers fail to parse on every other sample
    long = [replace(r, benchmark=LONG, key=r.key + "l", image=None,
                    **({"parsed": None, "parse_failed": True, "correct": False}
                       if r.view == "full" and int(r.sample_id[1:]) % 2 else {}))
            for r in records if r.benchmark == PROCEDURAL]
    all_records = records + long
    summary = analysis.summarize(all_records, n_boot=200)
    path = write_html_report(tmp_path, summary, all_records, run_info, sample_lookup=lookup, max_gallery=4)
    browser.load(path.resolve().as_uri(), width=1300)
    assert browser.evaluate("document.documentElement.scrollWidth") <= 1300
    hidden = browser.evaluate("""Array.from(document.querySelectorAll('table'))
        .filter(t => t.scrollWidth > t.clientWidth + 1 || t.getBoundingClientRect().right > 1300)
        .map(t => t.rows[0].innerText)""")
    assert hidden == []
    headers = browser.evaluate("Array.from(document.querySelectorAll('th')).map(th => th.innerText.trim())")
    assert headers and "" not in headers
    results = browser.evaluate("""(() => { const t = document.querySelector('h2 + table');
        return [t.previousElementSibling.innerText, t.rows.length, t.rows[0].cells.length,
                t.nextElementSibling.tagName, t.nextElementSibling.innerText]; })()""")
    title, n_rows, n_cols, after, warning = results
    assert title == "Results" and n_rows == 4 and n_cols == 12  # header + 3 benchmarks; nothing left out
    assert after == "BLOCKQUOTE" and "could not be parsed" in warning
    half = 100 * sum(int(r.sample_id[1:]) % 2 for r in long if r.view == "full") / N
    assert f"{LONG} (full {half:.0f}%)" in warning  # 12 of 24: 50%
    assert "local:toyset" not in warning  # its crop view fails on 1 of 24, under the 10% bar


def test_browser_check_catches_errors(browser, tmp_path):
    """The console and load checks above can fail: a page with a script error and a missing image trips them."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!doctype html><html><head><link rel="icon" href="data:,"></head><body>'
                   '<img id="i" src="missing.png"><script>console.error("boom")</script></body></html>')
    browser.load(bad.resolve().as_uri())
    errors = browser.errors()
    assert any("boom" in e for e in errors), errors
    assert any("missing.png" in e for e in errors), errors
    assert browser.evaluate("document.getElementById('i').naturalWidth") == 0
    browser.events.clear()
