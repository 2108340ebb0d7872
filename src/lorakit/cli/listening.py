"""The socket `lorakit serve` and `lorakit dashboard` listen on, bound before uvicorn starts: a port in use or a
host that does not resolve is one line naming the flag (exit 2), not uvicorn's log and exit 3."""

from __future__ import annotations

import socket

from lorakit.config import ConfigError


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) and listening; ConfigError naming --host or --port where it cannot be."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise ConfigError(f"--host {host}: cannot be resolved ({err}); expected a name or address of this machine") \
            from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        flag = f"--port {port}" if err.errno in (98, 13, 48) else f"--host {host}"  # in use, denied, in use (BSD)
        raise ConfigError(f"{flag}: cannot listen on {host}:{port} ({err.strerror or err})") from None
    return sock


def serve_on(app, sock: socket.socket, log_level: str) -> int:
    """Run `app` under uvicorn on an already-bound socket until a signal stops it (uvicorn shuts down gracefully);
    the command's exit code: 130, as for any lorakit command stopped by Ctrl-C."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
    return 130
