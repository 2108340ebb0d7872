import mmap
import sys

import pytest
import torch

from lorakit.lora.fused_siblings import pack
from lorakit.mapped_pages import drop_file_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps is Linux's")


def mapped_rss_kb(path) -> int:
    """Resident kB of this process's mappings of `path`, from /proc/self/smaps."""
    total, inside = 0, False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            fields = line.split()
            if "-" in fields[0] and len(fields[0].split("-")) == 2 and ":" not in fields[0]:
                inside = len(fields) >= 6 and fields[5] == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


def mapped_tensor(tmp_path, values: torch.Tensor):
    path = tmp_path / "weights.bin"
    path.write_bytes(values.numpy().tobytes())
    with open(path, "rb") as fh:
        region = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)  # private, as a read-only weights map
    return path, region, torch.frombuffer(region, dtype=values.dtype)


def test_the_pages_of_a_file_mapped_tensor_leave_the_resident_set_and_its_values_stay(tmp_path):
    values = torch.arange(2**21, dtype=torch.float32)  # 8 MiB
    path, region, tensor = mapped_tensor(tmp_path, values)
    assert torch.equal(tensor, values)  # reads every page
    assert mapped_rss_kb(path) >= 8 * 1024 - 8

    dropped = drop_file_pages([(tensor.data_ptr(), tensor.numel() * 4)])

    assert dropped >= 8 * 2**20 - 2 * mmap.PAGESIZE
    assert mapped_rss_kb(path) <= 2 * mmap.PAGESIZE // 1024
    assert torch.equal(tensor, values)  # read back from the file
    del tensor
    region.close()


def test_anonymous_memory_is_left_alone():
    tensor = torch.full((2**20,), 3.0)
    assert drop_file_pages([(tensor.data_ptr(), tensor.numel() * 4)]) == 0
    assert torch.equal(tensor, torch.full((2**20,), 3.0))


def test_packing_file_mapped_weights_keeps_their_values_and_drops_the_source_pages(tmp_path):
    values = torch.randn(3 * 512 * 256)
    path, region, flat = mapped_tensor(tmp_path, values)
    weights = [torch.nn.Parameter(flat[i * 512 * 256 : (i + 1) * 512 * 256].view(512, 256), requires_grad=False)
               for i in range(3)]
    assert torch.equal(flat, values)  # the weights were read, as a forward pass reads them
    before = mapped_rss_kb(path)
    assert before >= 3 * 512 * 256 * 4 // 1024 - 8

    buffer = pack(weights)

    assert mapped_rss_kb(path) < before // 10
    assert all(w.data_ptr() != flat.data_ptr() for w in weights)
    assert torch.equal(buffer, values.view(3 * 512, 256))
    assert all(torch.equal(w, values.view(3, 512, 256)[i]) for i, w in enumerate(weights))
    del weights, flat
    region.close()
