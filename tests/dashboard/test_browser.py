"""The dashboard in a real browser (Debian's headless Chromium driven by Selenium) on run folders from tiny
real training runs: the runs table and statuses, a run's curves checked against metrics.jsonl through the
DOM, the settings diff, the samples, a comparison of two adapters, a run followed while its metrics.jsonl
grows, keyboard use and contrast, and the first load with 50 runs. Screenshots go to runs/dashboard-screens/.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from dashboard_support import TRAINED, copy_run, events_of, free_port, serving, trained_runs

from lorakit.dashboard.config import DashboardConfig
from lorakit.dashboard.runs import compare_samples, config_diff
from lorakit.track.samples import read_samples
from lorakit.track.status import read_status, write_status
from lorakit.train.metrics import kept_events

SCREENS = Path(__file__).resolve().parents[2] / "runs" / "dashboard-screens"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LAPTOP = (1366, 768)
A, B = list(TRAINED)


def _chromium() -> tuple[str | None, str | None]:
    return shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    binary, driver_path = _chromium()
    if not (binary and driver_path):
        message = "the dashboard's browser tests need Debian's chromium and chromium-driver"
        if os.geteuid() == 0:  # make setup installs them as root: their absence is a setup failure, not a skip
            pytest.fail(f"{message}: run `make setup` (it runs apt-get install -y chromium chromium-driver)")
        pytest.skip(f"{message}; not root, so make setup cannot install them: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    profile = tempfile.mkdtemp(prefix="lorakit-chromium-")
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1366,900"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": LAPTOP[0], "height": LAPTOP[1], "deviceScaleFactor": 1, "mobile": False})
    SCREENS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Path:
    """The trained runs, and beside them a crashed, a diverged, a half-written run and one in progress."""
    source = trained_runs(tmp_path_factory.getbasetemp())
    root = tmp_path_factory.mktemp("gallery") / "runs"
    for name in TRAINED:
        copy_run(source / name, root / name, with_heavy=True)
    crashed = copy_run(source / A, root / "crashed-at-step-35", with_heavy=True)
    (crashed / "summary.json").unlink()
    (crashed / "samples.jsonl").unlink()
    shutil.rmtree(crashed / "checkpoints" / "step-000040")
    _keep_events(crashed, lambda e: e["step"] <= 35 and (e["kind"] == "train" or e["step"] > 0))
    _status_of_dead_process(crashed)
    diverged = copy_run(source / B, root / "diverged")
    _keep_events(diverged, lambda e: e["step"] <= 9 and e["kind"] == "train")
    (diverged / "summary.json").unlink()
    (diverged / "samples.jsonl").unlink()
    write_status(diverged, "failed", error="DivergenceError: training diverged at step 9 (loss is nan)")
    half = root / "half-written"
    half.mkdir()
    (half / "run_config.yaml").write_text("model: smollm2\ntrain: {lr: 0.001, max_st")
    (half / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 2.5, "lr": 0.001}\n{"kind": "tra')
    old = time.time() - 7200
    for path in half.iterdir():
        os.utime(path, (old, old))
    live = copy_run(source / A, root / "in-progress")
    for name in ("summary.json", "samples.jsonl", "status.json"):
        (live / name).unlink()
    (live / "metrics.jsonl").write_text("")
    write_status(live, "running")  # this test process plays the training process
    return root


def _keep_events(run: Path, keep) -> None:
    kept = [e for e in events_of(run) if keep(e)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in kept))


def _status_of_dead_process(run: Path) -> None:
    import subprocess
    import sys

    write_status(run, "running")
    record = read_status(run)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    record["pid"] = proc.pid
    (run / "status.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def site(gallery):
    with serving(gallery, DashboardConfig(port=free_port(), poll_seconds=0.5)) as url:
        yield url


def _wait(driver, condition, timeout: float = 30, what: str = "the page"):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # the page redraws parts of itself on every poll: an element found a moment ago may be gone; look again
    wait = WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,))
    return wait.until(lambda d: condition(d), message=f"waiting for {what}")


def _open(driver, url: str) -> None:
    driver.get("about:blank")
    driver.get(url)
    _wait(driver, lambda d: d.execute_script("return document.documentElement.dataset.firstRenderMs"), what="first render")


def _shot(driver, name: str) -> None:
    driver.save_screenshot(str(SCREENS / name))


def _console_errors(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def _series(driver, chart: str) -> dict[str, list[tuple[int, float]]]:
    """{series name: [(step, value)]} as the chart's SVG paths carry them."""
    found = driver.execute_script(
        "return [...document.querySelectorAll(`figure[data-chart='${arguments[0]}'] path.series`)]"
        ".map(p => [p.dataset.series, p.dataset.steps, p.dataset.values, p.getAttribute('d')])", chart)
    out = {}
    for name, steps, values, d in found:
        points = list(zip(map(int, steps.split(",")), map(float, values.split(","))))
        assert d.count("L") + d.count("M") == len(points), (name, "every point is drawn")
        out[name] = points
    return out


def _expected(run: Path, kind: str, key: str) -> list[tuple[int, float]]:
    return [(e["step"], e[key]) for e in events_of(run) if e["kind"] == kind and key in e]


def test_runs_table_shows_every_run_with_an_honest_status(browser, site, gallery):
    _open(browser, site + "/")
    rows = _wait(browser, lambda d: d.execute_script(
        "const r = [...document.querySelectorAll('#runs-body tr')].map(t => [t.dataset.run, t.dataset.status]);"
        "return r.length === 6 ? r : null"), what="six runs")
    assert dict(rows) == {A: "finished", B: "finished", "crashed-at-step-35": "resumable", "diverged": "failed",
                          "half-written": "failed", "in-progress": "running"}
    crashed = browser.find_element("css selector", "tr[data-run='crashed-at-step-35'] .badge").get_attribute("title")
    assert "is gone" in crashed and "step 32" in crashed
    text = browser.find_element("css selector", f"tr[data-run='{A}']").text
    assert "ros2" in text and "8 / 16" in text and "40 / 40" in text and "0.0% → 100.0%" in text
    _shot(browser, "01-runs.png")
    assert _console_errors(browser) == []


def test_run_curves_are_the_metrics_jsonl_values(browser, site, gallery):
    _open(browser, site + f"/#/run?name={A}")
    _wait(browser, lambda d: d.find_elements("css selector", "figure[data-chart='task'] path.series"), what="curves")
    run = gallery / A
    loss = _series(browser, "loss")
    assert loss["train loss"] == _expected(run, "train", "loss")
    assert loss["eval loss"] == _expected(run, "eval", "eval_loss")
    assert _series(browser, "lr")["learning rate"] == _expected(run, "train", "lr")
    assert _series(browser, "speed")["tokens/s"] == _expected(run, "train", "tokens_per_s")
    task = _series(browser, "task")
    assert task["exact_match"] == _expected(run, "eval", "eval_exact_match") and [s for s, _ in task["exact_match"]] == [0, 40]
    facts = browser.find_element("css selector", "dl.facts").text
    assert "40 / 40" in facts and "step 32, step 40" in facts
    _shot(browser, "02-run-curves.png")
    assert _console_errors(browser) == []


def test_settings_highlight_the_differences_to_another_run(browser, site, gallery):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    _open(browser, site + f"/#/run?name={A}")
    tab = _wait(browser, lambda d: d.find_element("id", "tab-curves"), what="tabs")
    tab.send_keys(Keys.ARROW_RIGHT)  # the tab list works with arrow keys
    assert browser.switch_to.active_element.get_attribute("id") == "tab-settings"
    Select(_wait(browser, lambda d: d.find_element("id", "settings-vs"), what="settings")).select_by_value(B)
    import yaml

    configs = [yaml.safe_load((gallery / n / "run_config.yaml").read_text()) for n in (A, B)]
    differing = {r["key"] for r in config_diff(*configs) if r["differs"]}
    shown = _wait(browser, lambda d: d.execute_script(
        "const t = document.querySelector('#settings-table');"
        "return t && t.querySelectorAll('thead th').length === 4 ?"
        " [...t.querySelectorAll('tbody tr')].filter(r => r.dataset.differs === 'true').map(r => r.dataset.key) : null"),
        what="the diff")
    assert set(shown) == differing == {"lora.r", "lora.lora_alpha", "train.output_dir"}
    browser.find_element("id", "settings-only-diff").click()
    _wait(browser, lambda d: len(d.find_elements("css selector", "#settings-table tbody tr")) == len(differing), what="only differences")
    _shot(browser, "03-settings-diff.png")


def test_samples_show_base_and_adapter_with_the_verdict(browser, site, gallery):
    _open(browser, site + f"/#/run?name={A}&tab=samples")
    cells = _wait(browser, lambda d: d.execute_script(
        "const rows = [...document.querySelectorAll('#samples-table tbody tr')];"
        "return rows.length ? rows.map(r => [r.children[1].textContent,"
        " r.querySelector('[data-who=base] .out').textContent, r.querySelector('[data-who=adapter] .out').textContent,"
        " Number(r.querySelector('[data-who=adapter] .verdict').dataset.verdict)]) : null"), what="samples")
    expected = [[r["instruction"], r["base"], r["adapter"], r["adapter_scores"]["exact_match"]] for r in read_samples(gallery / A)]
    assert cells == expected
    assert any(v == 1 for *_, v in cells), "the trained adapter gets some right"
    _shot(browser, "04-samples.png")


def test_compare_two_adapters_from_the_runs_table(browser, site, gallery):
    from selenium.webdriver.common.keys import Keys

    _open(browser, site + "/")
    for name in (A, B):
        box = _wait(browser, lambda d, name=name: d.find_element("css selector", f"tr[data-run='{name}'] input[type=checkbox]"),
                    what="checkbox")
        box.send_keys(Keys.SPACE)
    button = browser.find_element("id", "compare-selected")
    assert button.text == "Compare selected (2)" and button.is_enabled()
    button.click()
    rows = _wait(browser, lambda d: d.execute_script(
        "return [...document.querySelectorAll('#compare-table tbody tr')].map(r => [r.dataset.disagreement, r.children[1].textContent])"
        " || null"), what="the comparison")
    expected = compare_samples({n: read_samples(gallery / n) for n in (A, B)})
    assert [tuple(r) for r in rows] == [(r["disagreement"], r["instruction"]) for r in expected["rows"]]
    ranks = ["verdict", "output", "same"]
    assert [ranks.index(d) for d, _ in rows] == sorted(ranks.index(d) for d, _ in rows)  # disagreements first
    assert rows[0][0] == "verdict" and rows[-1][0] == "same"  # the two adapters agree on some rows, not all
    summary = browser.find_element("id", "compare-summary").text
    assert f"{expected['common']} prompts in common" in summary and f"differ on {expected['counts']['verdict']}" in summary
    _shot(browser, "05-compare.png")


def test_follows_a_run_in_progress_as_metrics_jsonl_grows(browser, site, gallery, tmp_path_factory):
    live = gallery / "in-progress"
    events = events_of(trained_runs(tmp_path_factory.getbasetemp()) / A)
    _open(browser, site + "/#/run?name=in-progress")
    _wait(browser, lambda d: d.find_elements("css selector", "figure[data-chart='loss'] .empty"), what="an empty chart")
    assert browser.find_element("css selector", "#run-head .badge").get_attribute("data-status") == "running"
    for upto in (5, 12, 40):
        batch = [e for e in events if e["kind"] in ("train", "eval") and e["step"] <= upto]
        with (live / "metrics.jsonl").open("w") as fh:
            fh.write("".join(json.dumps(e, sort_keys=True) + "\n" for e in batch if e["step"] > 0))
        want = [(e["step"], e["loss"]) for e in batch if e["kind"] == "train"]
        _wait(browser, lambda d, want=want: _series(d, "loss").get("train loss") == want, what=f"the curve up to step {upto}")
        if upto == 5:  # a keyboard user on the chart keeps the focus while it redraws
            browser.find_element("css selector", "figure[data-chart='loss'] svg").click()
        else:
            assert browser.switch_to.active_element.get_attribute("data-focus-key") == "chart:loss"
        if upto == 12:
            _shot(browser, "06-live-in-progress.png")
    shutil.copy(gallery / A / "summary.json", live / "summary.json")
    write_status(live, "finished")
    _wait(browser, lambda d: d.find_element("css selector", "#run-head .badge").get_attribute("data-status") == "finished",
          what="the finished status")
    _shot(browser, "07-live-finished.png")
    assert _console_errors(browser) == []


def test_a_run_rewritten_in_place_then_removed_while_shown(browser, site, gallery):
    run = copy_run(gallery / A, gallery / "reused-then-removed")
    _open(browser, site + "/#/run?name=reused-then-removed")
    _wait(browser, lambda d: _series(d, "loss").get("train loss") == _expected(run, "train", "loss"), what="the curve")
    # a fresh run over the folder empties metrics.jsonl in place and writes past its old size between two polls
    newer = [dict(e, loss=e["loss"] * 2) if "loss" in e else e for e in events_of(gallery / B) * 2]
    with (run / "metrics.jsonl").open("r+") as fh:
        fh.truncate(0)
        fh.write("".join(json.dumps(e, sort_keys=True) + "\n" for e in newer))
    want = [(e["step"], e["loss"]) for e in newer if e["kind"] == "train"]
    _wait(browser, lambda d: _series(d, "loss").get("train loss") == want, what="the rewritten curve alone")
    # a divergence rollback from step 9 to step 4, then steps 5-10 again: the curve shows the kept timeline
    again = [{"kind": "rollback", "step": 9, "to_step": 4, "reason": "loss is nan"}] + [
        {"kind": "train", "step": step, "loss": 0.5 / step, "lr": 1e-4} for step in range(5, 11)]
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write("".join(json.dumps(e, sort_keys=True) + "\n" for e in again))
    want = [(e["step"], e["loss"]) for e in kept_events(newer + again) if e["kind"] == "train"]
    assert len(want) < len([e for e in newer + again if e["kind"] == "train"])  # the rollback dropped some
    _wait(browser, lambda d: _series(d, "loss").get("train loss") == want, what="the kept timeline")
    shutil.rmtree(run)
    _wait(browser, lambda d: d.find_elements("css selector", "[data-gone]"), what="the removed run's notice")
    assert "no longer in the runs folder" in browser.find_element("css selector", "[data-gone]").text
    time.sleep(1.2)  # two more polls: the connection is fine
    live = browser.find_element("css selector", "#live")
    assert "problem" not in live.get_attribute("class") and live.text.startswith("Live: updated"), live.text
    assert [e for e in _console_errors(browser) if "name=reused-then-removed" not in e or "404" not in e] == []


def test_keyboard_labels_and_contrast(browser, site):
    from selenium.webdriver.common.keys import Keys

    _open(browser, site + "/")
    _wait(browser, lambda d: d.find_elements("css selector", "#runs-body tr"), what="runs")
    body = browser.find_element("tag name", "body")
    body.send_keys(Keys.TAB)
    for _ in range(40):  # Tab through skip link, navigation, filter, ... to the first run link
        active = browser.switch_to.active_element
        if (active.get_attribute("data-focus-key") or "").startswith("link:"):
            break
        active.send_keys(Keys.TAB)
    name = active.get_attribute("data-focus-key")[len("link:"):]
    active.send_keys(Keys.ENTER)
    _wait(browser, lambda d: d.switch_to.active_element.tag_name == "h1" and name in d.switch_to.active_element.text,
          what="focus on the run's heading")
    unlabeled = browser.execute_script("""
        return [...document.querySelectorAll('input, select, button, [role=tab], svg[role=img], a')]
          .filter(el => !((el.labels && el.labels.length) || el.getAttribute('aria-label') || el.textContent.trim()))
          .map(el => el.outerHTML.slice(0, 80));""")
    assert unlabeled == []
    _open(browser, site + "/")
    _wait(browser, lambda d: d.find_elements("css selector", "#runs-body tr"), what="runs")
    low = browser.execute_script(CONTRAST_JS)
    assert low == [], low
    browser.execute_script("const p = document.createElement('p'); p.id = 'grey'; p.textContent = 'faint';"
                           "p.style.color = '#aaaaaa'; document.querySelector('main').append(p);")
    assert [entry.split(":")[0] for entry in browser.execute_script(CONTRAST_JS)] == ["P."]  # the check can fail


CONTRAST_JS = """
function rgb(s) { const m = s.match(/[\\d.]+/g).map(Number); return {r: m[0], g: m[1], b: m[2], a: m.length > 3 ? m[3] : 1}; }
function lum(c) { return [c.r, c.g, c.b].map(v => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); })
  .reduce((sum, v, i) => sum + v * [0.2126, 0.7152, 0.0722][i], 0); }
function background(el) { for (; el; el = el.parentElement) { const c = rgb(getComputedStyle(el).backgroundColor); if (c.a > 0.5) return c; }
  return {r: 255, g: 255, b: 255}; }
const low = [];
for (const el of document.querySelectorAll('body *')) {
  if (!el.offsetParent && el.tagName !== 'BODY' || ![...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim())) continue;
  const a = lum(rgb(getComputedStyle(el).color)), b = lum(background(el));
  const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
  if (ratio < 4.5) low.push(el.tagName + '.' + el.className + ': ' + ratio.toFixed(2) + ' ' + el.textContent.trim().slice(0, 30));
}
return low;
"""


def test_first_load_under_a_second_with_50_runs(browser, gallery, tmp_path_factory):
    from lorakit.dashboard.files import find_runs
    from lorakit.dashboard.runs import RunCache, load_run

    root = tmp_path_factory.mktemp("fifty") / "runs"
    for i in range(50):
        copy_run(gallery / (A if i % 2 else B), root / f"sweep-{i:02d}", lr=1e-4 * (i + 1), rank=4 * (1 + i % 4),
                 loss_scale=1 + i / 100)
    timings = []
    for _ in range(3):  # a fresh server each time: its first answer reads every folder
        with serving(root, DashboardConfig(port=free_port())) as url:
            _open(browser, url + "/")
            assert len(browser.find_elements("css selector", "#runs-body tr")) == 50
            timings.append(int(browser.execute_script("return document.documentElement.dataset.firstRenderMs")))
    _shot(browser, "08-fifty-runs.png")
    requests = browser.execute_script(
        "return performance.getEntriesByType('resource').map(r => [r.name.split('/').pop(), Math.round(r.duration)])")
    started = time.process_time()
    rows = [load_run(name, folder, RunCache())["row"] for name, folder in find_runs(root).items()]
    cpu_ms = 1000 * (time.process_time() - started)
    load = os.getloadavg()[0] / os.cpu_count()
    print(f"first render with 50 runs: {timings} ms (three fresh servers); last load's requests (ms): {requests}; "
          f"reading the 50 folders cold: {cpu_ms:.0f} ms CPU; load average per core {load:.1f}")
    assert len(rows) == 50 and cpu_ms < 500  # the server's cold scan, in CPU time (what other work cannot inflate)
    if min(timings) >= 1000 and load > 1.5:
        pytest.skip(f"first render took {min(timings)} ms at best while the machine runs {load:.1f} jobs per core: "
                    "wall time is not judged on an oversubscribed machine")
    assert min(timings) < 1000, timings  # noise only adds time: the fastest of three is the page's own cost
