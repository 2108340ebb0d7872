"""lorakit/cli/listening.py: a port in use or a host that does not resolve is one line naming the flag, exit 2."""

from __future__ import annotations

import socket

import pytest

from lorakit.cli import main
from lorakit.cli.listening import listening_socket
from lorakit.config import ConfigError


def test_a_port_in_use_and_an_unknown_host_name_their_flag():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        in_use = rf"--port {port}: cannot listen on 127.0.0.1:{port} \(Address already in use\)"
        with pytest.raises(ConfigError, match=in_use):
            listening_socket("127.0.0.1", port)
    with pytest.raises(ConfigError, match=r"--host no.such.host.invalid: cannot be resolved"):
        listening_socket("no.such.host.invalid", 0)
    with listening_socket("127.0.0.1", 0) as free:  # port 0: any free port, the one taken is read back
        assert free.getsockname()[1] > 0


def test_the_dashboard_on_a_taken_port_is_one_line_and_exit_2(tmp_path, capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        code = main(["dashboard", str(tmp_path), "--port", str(taken.getsockname()[1])])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("lorakit dashboard: error: --port"), err
