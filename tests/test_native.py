"""lorakit/native.py: a C source is built once into the cache, and built anew when it or a local header changes."""

from __future__ import annotations

import ctypes
import shutil

import pytest

from lorakit import native

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler here")


def test_a_local_header_is_part_of_what_a_library_is_built_from(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "answer.h").write_text("#define ANSWER 41\n")
    source = tmp_path / "probe.c"
    source.write_text('#include "answer.h"\nint answer(void) { return ANSWER + 1; }\n')
    first = native.built(source)
    assert ctypes.CDLL(str(first)).answer() == 42
    assert native.built(source) == first  # built once
    (tmp_path / "answer.h").write_text("#define ANSWER 6\n")
    again = native.built(source)
    assert again != first and ctypes.CDLL(str(again)).answer() == 7
