"""Device helpers: the CPU allocator setting that training applies (``cdpdnet.device.keep_freed_memory``)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# A 24 MiB block (the size of a `lite-wide` step's activations) is allocated, written, freed, and
# allocated and written again: the page faults of the second time, and whether the first came from mmap.
_REUSE = """
import ctypes, resource, sys
import torch  # noqa: F401  (imported first, as in a training process)
if sys.argv[1] == "keep":
    from cdpdnet.device import keep_freed_memory
    assert keep_freed_memory() and keep_freed_memory()  # applies; a second call is a no-op that agrees
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 24 << 20
mapped = libc.mallinfo2().hblkhd
p = libc.malloc(size)
mapped = libc.mallinfo2().hblkhd - mapped
ctypes.memset(p, 1, size)
libc.free(p)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = libc.malloc(size)
ctypes.memset(p, 1, size)
print(mapped, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _reuse(mode: str) -> tuple[int, int]:
    r = subprocess.run([sys.executable, "-c", _REUSE, mode], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    mapped, faults = r.stdout.split()[-2:]
    return int(mapped), int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's; elsewhere keep_freed_memory returns False and changes nothing")
def test_keep_freed_memory_lets_the_next_step_reuse_freed_pages():
    # glibc's defaults: the block is mmapped and unmapped at free, so writing the next one faults its
    # 6,144 pages of 4 KiB in again; kept, it comes from the heap, stays there when freed, and is reused
    default_mapped, default_faults = _reuse("default")
    kept_mapped, kept_faults = _reuse("keep")
    assert default_mapped >= 24 << 20 and default_faults > 5_000, (default_mapped, default_faults)
    assert kept_mapped == 0 and kept_faults < 100, (kept_mapped, kept_faults)
