"""on_a_thread_of_its_own: fn runs on a new thread that has ended when the call returns; results and errors
come back to the caller."""

from __future__ import annotations

import threading

import pytest

from lorakit.serve.threads import on_a_thread_of_its_own


def test_the_work_runs_on_a_thread_that_has_ended_when_it_returns():
    seen = []
    result = on_a_thread_of_its_own(lambda a, b: seen.append(threading.current_thread()) or a + b, 2, 3)
    assert result == 5
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()


def test_its_error_is_raised_in_the_callers_thread():
    def fail():
        raise KeyError("adapter 'x'")

    with pytest.raises(KeyError, match="adapter 'x'"):
        on_a_thread_of_its_own(fail)
