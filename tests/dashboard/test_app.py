"""The dashboard over real HTTP on loopback: its API on real run folders, path traversal, the Host check,
the API key, and `lorakit dashboard` itself (loopback by default; other hosts need a key)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from dashboard_support import TRAINED, copy_run, events_of, free_port, serving, trained_runs

from lorakit.cli import main
from lorakit.dashboard.config import DashboardConfig
from lorakit.track.samples import read_samples

SECRET = "do-not-read-this-7f3a"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The trained runs plus traps: a file and a run folder outside the runs folder, linked from inside."""
    source = trained_runs(tmp_path_factory.getbasetemp())
    root = tmp_path_factory.mktemp("app") / "runs"
    for name in TRAINED:
        copy_run(source / name, root / name, with_heavy=True)
    copy_run(source / "toy-r4", root / "toy-r4-copy")
    outside = root.parent / "outside"
    (outside / "run").mkdir(parents=True)
    (outside / "secret.json").write_text(json.dumps({"secret": SECRET}))
    (outside / "run" / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 1, "note": SECRET}) + "\n")
    (root / "linked-out").symlink_to(outside / "run")
    (root / "toy-r8" / "leak.json").symlink_to(outside / "secret.json")
    return root


def test_api_on_real_runs(runs):
    with serving(runs) as url:
        listed = httpx.get(f"{url}/api/runs").json()["runs"]
        assert sorted(r["name"] for r in listed) == sorted([*TRAINED, "toy-r4-copy"])
        row = next(r for r in listed if r["name"] == "toy-r8")
        assert row["status"] == "finished" and row["step"] == 40 and row["settings"]["r"] == 8 and row["has_samples"]
        metrics = httpx.get(f"{url}/api/metrics", params={"name": "toy-r8"}).json()
        assert metrics["events"] == events_of(runs / "toy-r8")
        again = httpx.get(f"{url}/api/metrics", params={"name": "toy-r8", "offset": metrics["offset"]}).json()
        assert again["events"] == [] and not again["reset"]
        samples = httpx.get(f"{url}/api/samples", params={"name": "toy-r8"}).json()
        assert samples["rows"] == read_samples(runs / "toy-r8") and samples["metric"] == "exact_match"
        diff = httpx.get(f"{url}/api/diff", params={"a": "toy-r8", "b": "toy-r4"}).json()
        assert {r["key"] for r in diff["rows"] if r["differs"]} == {"lora.r", "lora.lora_alpha", "train.output_dir"}
        compare = httpx.get(f"{url}/api/compare", params=[("name", n) for n in [*TRAINED, "toy-r4-copy"]]).json()
        assert compare["runs"] == [*TRAINED, "toy-r4-copy"] and compare["common"] == len(read_samples(runs / "toy-r8"))
        assert [r["outputs"][1] for r in compare["rows"]] == [r["outputs"][2] for r in compare["rows"]]
        png = httpx.get(f"{url}/api/file", params={"name": "toy-r8", "path": "curves.png"})
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
        page = httpx.get(url + "/")
        assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
        assert "cdn" not in page.text.lower() and "http" not in page.text.split("<body>")[1]  # everything local


TRAVERSALS = [
    ("/api/run", {"name": "../outside/run"}),
    ("/api/run", {"name": "linked-out"}),
    ("/api/metrics", {"name": "linked-out"}),
    ("/api/metrics", {"name": "toy-r8/../../outside/run"}),
    ("/api/metrics", {"name": "/etc"}),
    ("/api/samples", {"name": ".."}),
    ("/api/file", {"name": "toy-r8", "path": "../../outside/secret.json"}),
    ("/api/file", {"name": "toy-r8", "path": "leak.json"}),
    ("/api/file", {"name": "toy-r8", "path": "/etc/passwd"}),
    ("/api/file", {"name": "toy-r8", "path": "adapter/../../../outside/secret.json"}),
    ("/api/file", {"name": "toy-r8", "path": "..%2F..%2Foutside%2Fsecret.json"}),
    ("/api/file", {"name": "toy-r8", "path": "checkpoints/step-000040/optimizer.pt"}),  # not a served type
    ("/api/file", {"name": "..", "path": "outside/secret.json"}),
    ("/api/diff", {"a": "toy-r8", "b": "../outside/run"}),
    ("/api/compare", [("name", "toy-r8"), ("name", "../outside/run")]),
]
RAW_TRAVERSALS = ["/static/..%2F..%2F..%2Fconfig.py", "/static/../app.py", "/api/../../etc/passwd",
                  "/api/file?name=toy-r8&path=%2e%2e/%2e%2e/outside/secret.json", "/%2e%2e/outside/secret.json"]


def test_metrics_written_afresh_in_place_past_the_old_size_are_read_afresh(tmp_path):
    source = trained_runs(tmp_path.parent)
    a, b = list(TRAINED)
    run = copy_run(source / a, tmp_path / "runs" / "reused")
    with serving(tmp_path / "runs") as url:
        first = httpx.get(f"{url}/api/metrics", params={"name": "reused"}).json()
        grown = httpx.get(f"{url}/api/metrics", params={"name": "reused", **_poll(first)}).json()
        assert grown["events"] == [] and not grown["reset"] and grown["head"] == first["head"]
        # a fresh run over the same folder empties the file in place and writes past the old size between two polls
        newer = [dict(e, loss=e["loss"] + 1) if "loss" in e else e for e in events_of(source / b)] * 2
        with (run / "metrics.jsonl").open("r+") as fh:
            fh.truncate(0)
            fh.write("".join(json.dumps(e) + "\n" for e in newer))
        afresh = httpx.get(f"{url}/api/metrics", params={"name": "reused", **_poll(grown)}).json()
        assert afresh["reset"] and afresh["events"] == newer


def _poll(answer: dict) -> dict:
    return {"offset": answer["offset"], "head": answer["head"]}


def test_path_traversal_gets_404_or_400_and_reads_nothing_outside(runs):
    outside = str(runs.parent / "outside")
    opened: list[str] = []
    recording = [False]

    def audit(event, args):
        if recording[0] and event in ("open", "os.scandir", "os.listdir") and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.fsdecode(args[0])
            if os.path.realpath(path).startswith(outside):
                opened.append(path)

    sys.addaudithook(audit)
    with serving(runs) as url:
        httpx.get(f"{url}/api/runs")  # warm up (lazy imports), then record
        recording[0] = True
        for path, params in TRAVERSALS:
            response = httpx.get(url + path, params=params)
            assert response.status_code in (400, 404), (path, params, response.status_code)
            assert SECRET not in response.text
        with httpx.Client(base_url=url) as client:
            for raw in RAW_TRAVERSALS:  # sent as written, no client-side normalisation
                response = client.send(client.build_request("GET", httpx.URL(url + raw)))
                assert response.status_code in (400, 404), (raw, response.status_code)
                assert SECRET not in response.text
        listed = httpx.get(f"{url}/api/runs").text
        recording[0] = False
    assert SECRET not in listed and "linked-out" not in listed
    assert opened == []


def test_only_loopback_host_names_are_answered(runs):
    with serving(runs) as url:
        assert httpx.get(f"{url}/api/runs", headers={"Host": "localhost:1"}).status_code == 200
        rebinding = httpx.get(f"{url}/api/runs", headers={"Host": "attacker.example"})
        assert rebinding.status_code == 400 and "toy" not in rebinding.text


def test_api_key_by_header_or_by_the_cookie_the_key_link_sets(runs):
    config = DashboardConfig(host="0.0.0.0", port=free_port(), api_key="s3cret-key")
    with serving(runs, config) as url:
        assert httpx.get(f"{url}/api/runs").status_code == 401
        assert httpx.get(f"{url}/").status_code == 401
        assert httpx.get(f"{url}/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{url}/api/runs", headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        with httpx.Client(base_url=url) as browser:
            assert browser.get("/?key=wrong").status_code == 401
            first = browser.get("/?key=s3cret-key")
            assert first.status_code == 303 and first.headers["location"] == "/"
            assert "httponly" in first.headers["set-cookie"].lower()
            assert browser.get("/api/runs").status_code == 200


def _dashboard(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lorakit", "dashboard", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def test_cli_refuses_another_host_without_a_key_and_a_missing_folder(runs, monkeypatch, capsys):
    monkeypatch.delenv("LORAKIT_API_KEY", raising=False)
    assert main(["dashboard", str(runs), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--api-key" in err and "LORAKIT_API_KEY" in err
    assert main(["dashboard", str(runs / "no-such-folder")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_cli_listens_on_loopback_by_default(runs, monkeypatch, capsys):
    from lorakit.cli import listening

    called = {}

    def serve_on(app, sock, log_level):  # the socket the CLI bound, read back instead of served
        called["address"] = sock.getsockname()
        sock.close()

    monkeypatch.setattr(listening, "serve_on", serve_on)
    assert main(["dashboard", str(runs), "--port", "0"]) == 0
    host, port = called["address"]
    assert host == "127.0.0.1" and port > 0
    out, err = capsys.readouterr()
    assert f"http://127.0.0.1:{port}/" in out and err == ""


def test_cli_on_another_host_warns_and_serves_with_the_key(runs):
    port = free_port()
    proc = _dashboard(str(runs), "--host", "0.0.0.0", "--port", str(port), env={"LORAKIT_API_KEY": "k-123"})
    try:
        deadline, status = time.time() + 180, None
        while time.time() < deadline and proc.poll() is None:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/api/runs", headers={"Authorization": "Bearer k-123"}).status_code
                break
            except httpx.TransportError:
                time.sleep(0.3)
        assert status == 200
        assert httpx.get(f"http://127.0.0.1:{port}/api/runs").status_code == 401
        listening = [line.split()[1] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                     if line.split()[3] == "0A" and line.split()[1].endswith(f":{port:04X}")]
        assert listening == [f"00000000:{port:04X}"]  # all addresses, as asked
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert "warning: listening on 0.0.0.0" in err and "k-123" not in out + err


def test_runs_a_page_cannot_show_as_is_are_answered_not_failed(tmp_path, monkeypatch):
    """A diverged run's NaN losses read as null, a folder whose name is not UTF-8 is left out, a status.json with a
    pid past any process's is not running: every answer a 200, the other runs still listed. A long metrics.jsonl
    comes over several polls, each at most MAX_EVENT_BYTES."""
    import socket

    from lorakit.dashboard import files

    root = tmp_path / "runs"
    diverged = root / "diverged"
    diverged.mkdir(parents=True)
    (diverged / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 2.5}\n'
                                            '{"kind": "eval", "step": 2, "eval_loss": NaN, "grad_norm": Infinity}\n')
    (diverged / "summary.json").write_text('{"steps": 2, "best_metric": NaN}')
    (diverged / "status.json").write_text(json.dumps({"state": "running", "pid": 10**20, "host": socket.gethostname()}))
    os.mkdir(os.fsencode(root) + b"/bad\xffname")
    (Path(os.fsdecode(os.fsencode(root) + b"/bad\xffname")) / "run_config.yaml").write_text("model: m\n")
    long_run = root / "long"
    long_run.mkdir()
    line = json.dumps({"kind": "train", "step": 1, "loss": 1.0}) + "\n"
    (long_run / "metrics.jsonl").write_text(line * 40)
    monkeypatch.setattr(files, "MAX_EVENT_BYTES", 10 * len(line))
    with serving(root) as url:
        listed = httpx.get(f"{url}/api/runs")
        assert listed.status_code == 200, listed.text
        rows = {r["name"]: r for r in listed.json()["runs"]}
        assert set(rows) == {"diverged", "long"} and rows["diverged"]["status"] != "running"
        metrics = httpx.get(f"{url}/api/metrics", params={"name": "diverged"})
        assert metrics.status_code == 200 and metrics.json()["events"][1]["eval_loss"] is None
        assert httpx.get(f"{url}/api/run", params={"name": "diverged"}).status_code == 200
        offset, seen = 0, 0
        for _ in range(4):
            page = httpx.get(f"{url}/api/metrics", params={"name": "long", "offset": offset}).json()
            assert len(page["events"]) <= 10
            offset, seen = page["offset"], seen + len(page["events"])
        assert seen == 40


def test_damaged_runs_never_hide_the_others_or_fail_an_answer(tmp_path):
    """A status.json nested past what json reads, a YAML anchor that holds itself, a metric_for_best that is a list,
    1e999 in summary.json and metrics.jsonl, NaN in samples.jsonl, a lone surrogate, !!binary in the config, scores
    that are no mapping: every answer a 200 and every run still listed; a run compared with itself."""
    root = tmp_path / "runs"
    events = '{"kind": "train", "step": 1, "loss": 1.0}\n{"kind": "eval", "step": 1, "eval_loss": 0.5}\n'
    sample = {"id": 0, "instruction": "a", "prompt": "a", "reference": "r", "base": None, "adapter": "x"}
    files = {
        "deep": {"status.json": "[" * 100_000 + "]" * 100_000},
        "anchor": {"run_config.yaml": "model: tiny\nx: &a [*a]\n"},
        "listed-metric": {"run_config.yaml": "train: {metric_for_best: [a, b]}\n"},
        "overflow": {"summary.json": '{"steps": 3, "seconds": 1e999}',
                     "metrics.jsonl": events + '{"kind": "train", "step": 4, "loss": 1e999}\n'},
        "surrogate": {"metrics.jsonl": events + '{"kind": "train", "step": 4, "loss": 0.5, "note": "\\ud800"}\n'},
        "binary": {"run_config.yaml": "model: tiny\nblob: !!binary /w==\n"},
        "nan-scores": {"samples.jsonl": json.dumps({**sample, "adapter_scores": {"bleu": float("nan")}}) + "\n"},
        "list-scores": {"samples.jsonl": json.dumps({**sample, "adapter_scores": [1]}) + "\n"},
    }
    for name, contents in files.items():
        (root / name).mkdir(parents=True)
        (root / name / "metrics.jsonl").write_text(events)
        for file_name, text in contents.items():
            (root / name / file_name).write_text(text)
    with serving(root) as url:
        listed = httpx.get(f"{url}/api/runs")
        assert listed.status_code == 200, listed.text
        assert {r["name"] for r in listed.json()["runs"]} == set(files)
        for name in files:
            for api in ("run", "metrics", "samples"):
                answer = httpx.get(f"{url}/api/{api}", params={"name": name})
                assert answer.status_code == 200, (name, api, answer.text)
        assert httpx.get(f"{url}/api/metrics", params={"name": "overflow"}).json()["events"][-1]["loss"] is None
        compared = httpx.get(f"{url}/api/compare", params=[("name", "nan-scores"), ("name", "list-scores")])
        assert compared.status_code == 200, compared.text
        same = httpx.get(f"{url}/api/diff", params={"a": "binary", "b": "binary"})
        assert same.status_code == 200 and not any(row["differs"] for row in same.json()["rows"])


def test_the_loopback_address_the_page_was_given_is_answered(runs):
    """--host 127.0.0.2 is loopback: its own address in the Host header is answered, another name is not."""
    config = DashboardConfig(host="127.0.0.2", port=free_port())
    with serving(runs, config) as url:
        assert httpx.get(f"{url}/api/runs", headers={"Host": f"127.0.0.2:{config.port}"}).status_code == 200
        assert httpx.get(f"{url}/api/runs", headers={"Host": "127.0.0.3"}).status_code == 400


@pytest.mark.parametrize("poll", [float("nan"), float("inf"), 1e-9, 0.0])
def test_a_poll_interval_out_of_range_is_refused(poll):
    from lorakit.config import ConfigError

    with pytest.raises(ConfigError, match="--poll-seconds: given .*, expected 0.1 to 3600 seconds"):
        DashboardConfig(poll_seconds=poll)
