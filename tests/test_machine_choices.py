"""Timed choices remembered per machine: measured once, read back after, measured again only on request."""

from __future__ import annotations

import torch

from lorakit import machine_choices
from lorakit.machine_choices import remembered


def test_an_answer_is_measured_once_and_read_back(monkeypatch):
    calls = []
    assert remembered("choice", lambda: calls.append(1) or "first") == "first"
    assert remembered("choice", lambda: calls.append(1) or "second") == "first"
    assert remembered("other choice", lambda: calls.append(1) or None) is None
    assert len(calls) == 2
    monkeypatch.setenv("LORAKIT_RETIME", "1")
    assert remembered("choice", lambda: "second") == "second"
    monkeypatch.delenv("LORAKIT_RETIME")
    assert remembered("choice", lambda: "third") == "second"  # the new answer is kept


def test_another_thread_count_is_another_machine():
    assert remembered("threads", lambda: torch.get_num_threads()) == torch.get_num_threads()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert remembered("threads", lambda: "timed again") == "timed again"
    finally:
        torch.set_num_threads(threads)
    assert remembered("threads", lambda: "not asked") == threads


def test_a_file_that_is_not_an_answer_is_measured_again():
    assert remembered("broken", lambda: True) is True
    (path,) = machine_choices.folder().glob("*.json")
    path.write_text("{half a file")
    assert remembered("broken", lambda: False) is False
    assert remembered("broken", lambda: True) is False
    assert not [p for p in machine_choices.folder().iterdir() if p.name.startswith(".")]  # no temporary left
