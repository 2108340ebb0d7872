"""ServeConfig's checks and the request defaults it bounds: each problem one line naming the setting."""

from __future__ import annotations

import pytest

from lorakit.config import ConfigError
from lorakit.serve.config import ServeConfig
from lorakit.serve.protocol import parse_ask


@pytest.mark.parametrize(("settings", "message"), [
    ({"batch_wait_ms": float("inf")}, "batch_wait_ms must be a number from 0 to 60000 (got inf)"),
    ({"batch_wait_ms": float("nan")}, "batch_wait_ms must be a number from 0 to 60000 (got nan)"),
    ({"batch_wait_ms": -1.0}, "batch_wait_ms must be a number from 0 to 60000 (got -1.0)"),
    ({"api_key": " "}, "api_key is empty"),
    ({"adapters_root": "/nonexistent/adapters"}, "adapters_root '/nonexistent/adapters' is not a folder"),
])
def test_a_setting_the_server_cannot_run_with_is_refused_at_start(settings, message):
    """An infinite --batch-wait-ms used to kill the worker thread at the first request (every request then hung);
    a missing --adapters-root started a server whose every adapter load named the wrong problem."""
    with pytest.raises(ConfigError, match="serve: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        ServeConfig(**settings)


def test_a_completion_without_max_tokens_gets_openais_default_within_the_limit():
    """OpenAI's default of 16 new tokens used to be refused by a server whose --max-tokens is below it."""
    small = ServeConfig(max_tokens=8)
    assert parse_ask({"model": "m", "prompt": "hi"}, False, small, None).max_tokens == 8
    assert parse_ask({"model": "m", "prompt": "hi"}, False, ServeConfig(), None).max_tokens == 16
