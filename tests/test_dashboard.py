"""The dashboard: self-contained page and data, the served live page, and the real thing in a
headless Chromium (no console errors, one scatter point per measured plan, a click selects a plan
and redraws its heatmap, the served page refreshes as rows arrive). The browser tests need the
system chromium (`apt-get install chromium`; `make test` installs it) and are skipped without it."""

from __future__ import annotations

import json
import os
import shutil
import threading
import urllib.request
from pathlib import Path

import pytest

from planner.report.dashboard import dashboard_data, write_dashboard
from planner.report.serve import make_server
from planner.report.tables import load_runs
from tests.test_tables import make_run

CHROMIUM = next((p for p in (os.environ.get("PLANNER_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium",
                             shutil.which("chromium-browser"), shutil.which("google-chrome")) if p and Path(p).is_file()),
                None)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _page_data(page: str) -> dict:
    return json.loads(page.split('id="planner-data">', 1)[1].split("</script>", 1)[0])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    r = make_run(tmp_path_factory.mktemp("dash") / "toy")
    p = r.load_problem()
    r.write("sensitivity.json", {"score": "toy", "units": list(p.units), "value": [1.0 + i for i in range(p.n_units)]})
    return r


def test_page_is_self_contained_and_holds_every_plan(run, tmp_path):
    out = write_dashboard([run.path], tmp_path / "d.html")
    page = out.read_text()
    assert "<script src=" not in page and page.count("plotly.js v") == 1
    data = _page_data(page)
    ids = {r.plan_id for r in run.results() if r.error is None}
    assert sorted(data["plans"]["id"]) == sorted(ids) and len(data["plans"]["x"][0]) == 24
    assert data["best"] in ids and data["sensitivity"]["value"][0] == 1.0
    assert set(data["convergence"]) == set(data["hypervolume"]) == {"uniform", "nsga2"}
    assert data["hypervolume"]["nsga2"]["hv"] == sorted(data["hypervolume"]["nsga2"]["hv"])


def test_failed_rows_and_predictions(tmp_path):
    r = make_run(tmp_path / "f", fail_every=5)
    data = dashboard_data(load_runs([r.path]))
    assert data["failed"] == sum(row.error is not None for row in r.results()) > 0
    assert data["predicted"] == {}
    json.dumps(data, allow_nan=False)


def test_server_serves_page_and_fresh_data(run, tmp_path):
    copy = tmp_path / "live"
    shutil.copytree(run.path, copy)
    server = make_server([copy], port=0, refresh=1)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        page = urllib.request.urlopen(base + "/").read().decode()
        assert _page_data(page)["live"] == {"url": "/data.json", "every": 1}
        before = json.load(urllib.request.urlopen(base + "/data.json"))
        _append_new_plan(copy)
        after = json.load(urllib.request.urlopen(base + "/data.json"))
        assert len(after["plans"]["id"]) == len(before["plans"]["id"]) + 1 and after["version"] != before["version"]
    finally:
        server.shutdown()


def _append_new_plan(path: Path) -> None:
    """A row for a plan the run has not measured (what a running search appends)."""
    lines = (path / "results.jsonl").read_text().splitlines()
    row = json.loads(lines[-1])
    row["plan_id"], row["kl"], row["generation"] = "feedc0ffee", row["kl"] * 0.5, row["generation"] + 1
    with open(path / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


@pytest.fixture
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium found (apt-get install chromium, or set PLANNER_CHROMIUM): browser test skipped")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _open(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_function("document.getElementById('scatter').data !== undefined")
    return page, errors


_POINTS = "document.getElementById('scatter').data.filter(t => t.meta === 'plans').reduce((a, t) => a + t.x.length, 0)"
# page coordinates of the plan with the largest size (the 8-bit uniform plan: far from every other point)
_FAR_POINT = """() => {
  const gd = document.getElementById('scatter'), fl = gd._fullLayout, r = gd.getBoundingClientRect();
  let best = null;
  gd.data.filter(t => t.meta === 'plans').forEach(t => t.x.forEach((x, j) => {
    if (best === null || x > best.x) best = {x, y: t.y[j], i: t.customdata[j]};
  }));
  return {px: r.left + fl._size.l + fl.xaxis.l2p(best.x), py: r.top + fl._size.t + fl.yaxis.l2p(Math.log10(best.y)),
          plan: document.getElementById('planner-data') && JSON.parse(document.getElementById('planner-data').textContent).plans.id[best.i]};
}"""
_HEATMAP = "JSON.stringify(document.getElementById('heatmap').data[0].z)"


def test_dashboard_in_chromium(run, browser, tmp_path):
    out = write_dashboard([run.path], tmp_path / "d.html")
    page, errors = _open(browser, out.as_uri())
    n_results = len({r.plan_id for r in run.results()})
    assert len(run.results()) == n_results                  # nsga2 never measures a plan twice: one point per row
    assert page.evaluate(_POINTS) == n_results
    before_plan, before_z = page.get_attribute("#selected", "data-plan"), page.evaluate(_HEATMAP)
    target = page.evaluate(_FAR_POINT)
    assert target["plan"] != before_plan
    page.mouse.move(target["px"], target["py"])
    page.mouse.click(target["px"], target["py"])
    page.wait_for_function(f"document.getElementById('selected').dataset.plan === '{target['plan']}'", timeout=5000)
    assert page.evaluate(_HEATMAP) != before_z
    assert f"--plan {target['plan']}" in page.inner_text("#export")
    page.select_option("#axis", "bpw")
    page.fill("#budget", "3.2")                              # the slider picks the best plan at or under 3.2 bpw
    page.dispatch_event("#budget", "input")
    assert page.get_attribute("#selected", "data-plan") != target["plan"]
    shots = Path(os.environ.get("PLANNER_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / "dashboard-test.png"), full_page=True)
    assert errors == []


def test_served_dashboard_refreshes_in_chromium(run, browser, tmp_path):
    copy = tmp_path / "live"
    shutil.copytree(run.path, copy)
    server = make_server([copy], port=0, refresh=0.3)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        page, errors = _open(browser, f"http://127.0.0.1:{server.server_address[1]}/")
        n = page.evaluate(_POINTS)
        _append_new_plan(copy)
        page.wait_for_function(f"{_POINTS} === {n + 1}", timeout=10_000)
        assert errors == []
    finally:
        server.shutdown()
