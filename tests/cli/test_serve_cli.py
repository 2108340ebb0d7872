"""`lorakit serve` as a user runs it: a real subprocess on a loopback port, the key from the environment."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

import lorakit
from conftest import TOY_TARGETS, perturb, toy_model_folder
from lorakit.cli import main
from lorakit.models import load_causal_lm


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_command(tmp_path):
    folder = toy_model_folder(tmp_path / "model")
    model = lorakit.inject(
        load_causal_lm(folder), lorakit.LoraConfig(r=4, target_modules=TOY_TARGETS), "ros2"
    )
    perturb(model, "ros2", std=0.2)
    lorakit.save_adapter(model, tmp_path / "ros2", "ros2")
    port = free_port()
    env = {**os.environ, "LORAKIT_API_KEY": "k"}
    command = [
        sys.executable,
        "-m",
        "lorakit",
        "serve",
        "--model",
        str(folder),
        "--served-model-name",
        "toy",
        "--adapter",
        f"ros2={tmp_path / 'ros2'}",
        "--port",
        str(port),
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["toy", "ros2"]
        got = client.completions.create(model="ros2", prompt="say red", max_tokens=4, temperature=0)
        assert got.usage.completion_tokens >= 1
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
        # the scheme is case-insensitive; one model by name, as the openai client's models.retrieve asks
        one = httpx.get(f"http://127.0.0.1:{port}/v1/models/ros2", headers={"Authorization": "bearer k"})
        assert one.status_code == 200 and one.json()["parent"] == "toy"
        assert client.models.retrieve("toy").id == "toy"
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.models.retrieve("nope")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130  # as any lorakit command stopped by Ctrl-C
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)


def test_serve_command_reports_a_bad_adapter_in_one_line(tmp_path, capsys):
    folder = toy_model_folder(tmp_path / "model")
    capsys.readouterr()  # the progress bars of writing the model
    assert main(["serve", "--model", str(folder), "--adapter", f"x={tmp_path / 'none'}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar of loading it
    assert error.startswith("lorakit serve: error:") and "adapter_config.json" in error
    assert main(["serve", "--model", str(folder), "--adapter", f"../x={tmp_path / 'none'}"]) == 2
    assert "is not allowed" in capsys.readouterr().err


def test_an_empty_api_key_is_refused_rather_than_serving_without_one(tmp_path, capsys, monkeypatch):
    """`--api-key "$KEY"` with KEY unset used to start a server open to anyone; LORAKIT_API_KEY set but empty, one
    that refused every request. Both are refused before the model loads."""
    from cli_support import cli

    monkeypatch.delenv("LORAKIT_API_KEY", raising=False)
    code, lines = cli(capsys, "serve", "--model", str(tmp_path / "no-model"), "--api-key", "")
    assert code == 2 and lines == [
        "lorakit serve: error: --api-key: empty; give the key clients must send, or leave --api-key out for none"]
    monkeypatch.setenv("LORAKIT_API_KEY", "")
    code, lines = cli(capsys, "serve", "--model", str(tmp_path / "no-model"))
    assert code == 2 and lines == ["lorakit serve: error: $LORAKIT_API_KEY: empty; give the key clients must send, "
                                   "or leave $LORAKIT_API_KEY out for none"]
