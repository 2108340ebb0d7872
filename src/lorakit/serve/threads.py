"""Run the server's PyTorch work outside the threads that serve HTTP, so the decode steps keep their speed.

PyTorch's CPU ops run their parallel parts on an OpenMP thread team, one team per thread that calls
them, and a team lives as long as its thread. With more team threads than cores, libgomp stops
spinning between parallel regions and puts its threads to sleep, so every parallel op then waits
for them to wake. A server whose main thread had loaded the model (a team there) decoded on its
worker thread (a second team) at about half speed on 2 cores: 55 against 29 ms a step of one row,
fp32, SmolLM2-135M, and 35 against 17 ms on int8 weights. Work done on a thread that then ends
leaves no team behind: `on_a_thread_of_its_own` runs the loading there, and the worker's team is
the only one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def on_a_thread_of_its_own(fn: Callable[..., T], *args) -> T:
    """fn(*args) on a new thread that ends when it returns; its result, or its exception raised here."""
    result: list = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn(*args))
        except BaseException as err:  # handed to the caller's thread
            error.append(err)

    thread = threading.Thread(target=run, name="lorakit-load", daemon=True)  # Ctrl-C while loading still exits
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
