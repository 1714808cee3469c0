"""The built docs and the comparison report, as headless Chromium renders them.

Reuses ``docs/_build/html`` when ``make docs`` has built it (else builds it into a
temporary folder). Each page is copied with a small script that, after layout, writes the
page's ``scrollWidth`` and ``clientWidth`` and counts of its tables, images and ``<pre>``
blocks into the title; ``chromium --dump-dom`` prints the result. Screenshots are left in
the test's temporary folder. Skipped where Chromium is not installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed"),
]

PROBE = """<script>
window.addEventListener("load", function () {
  var d = document.documentElement;
  document.title = "PROBE " + JSON.stringify({
    scroll: d.scrollWidth, client: d.clientWidth,
    tables: document.querySelectorAll("table").length,
    imgs: Array.from(document.querySelectorAll("img")).filter(function (i) {
      return i.complete && i.naturalWidth > 0; }).length,
    wide: Array.from(document.querySelectorAll("table")).filter(function (t) {
      var p = t.parentElement; return t.scrollWidth > p.clientWidth + 2; }).length,
    text: document.body.innerText.indexOf("# %% [markdown]") >= 0
  });
});
</script>"""


def _chromium(tmp: Path, *args: str) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=5000",
           *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _probe(page: Path, tmp: Path, width: int = 1200) -> dict:
    import json

    probed = page.with_name(page.stem + ".probe.html")
    text = page.read_text(encoding="utf-8")
    probed.write_text(text.replace("</body>", PROBE + "</body>", 1), encoding="utf-8")
    try:
        dom = _chromium(tmp, f"--window-size={width},900", "--dump-dom", probed.as_uri())
        shot = tmp / f"{page.stem}.png"
        _chromium(tmp, f"--window-size={width},1600", f"--screenshot={shot}", page.as_uri())
    finally:
        probed.unlink()
    m = re.search(r"<title>PROBE (.*?)</title>", dom)
    assert m, f"the probe did not run on {page.name}"
    return json.loads(m.group(1).replace("&quot;", '"'))


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    built = DOCS / "_build" / "html"
    out = tmp_path_factory.mktemp("site")
    if not (built / "index.html").exists():
        pytest.importorskip("sphinx")
        env = dict(os.environ, MPLBACKEND="Agg")
        proc = subprocess.run([sys.executable, "-m", "sphinx", "-q", "-b", "html", str(DOCS),
                               str(out / "html")], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return out / "html"
    shutil.copytree(built, out / "html")  # a copy: probes are written next to the pages
    return out / "html"


def test_pages_fit_the_width_and_tables_are_tables(html: Path, tmp_path: Path) -> None:
    for page in ("index", "results", "huggingface"):
        r = _probe(html / f"{page}.html", tmp_path)
        assert r["scroll"] <= r["client"] + 2, (page, r)
        assert r["wide"] == 0, (page, r)
        assert not r["text"], page
    assert _probe(html / "results.html", tmp_path)["tables"] >= 1
    assert _probe(html / "index.html", tmp_path)["imgs"] >= 1


def test_tutorial_pages_render_outputs(html: Path, tmp_path: Path) -> None:
    for page in sorted((html / "_generated" / "tutorials").glob("*.html")):
        if page.name.endswith(".probe.html"):
            continue
        r = _probe(page, tmp_path)
        assert not r["text"], page.name
        assert r["scroll"] <= r["client"] + 2, (page.name, r)
        if page.stem != "text_classification":
            assert r["imgs"] >= 1, (page.name, r)


def test_comparison_report_has_real_tables(tmp_path: Path) -> None:
    report = DOCS / "results" / "report.html"
    if not report.exists():
        pytest.skip("no committed docs/results/report.html")
    copy = tmp_path / "report" / "report.html"
    shutil.copytree(report.parent, copy.parent)
    r = _probe(copy, tmp_path)
    assert r["tables"] >= 1, r
    assert r["scroll"] <= r["client"] + 2, r
