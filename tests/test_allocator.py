"""glibc's thresholds, read back from glibc itself: a block the encoder's activations could be
is mapped afresh by default, and comes from the heap once an encoder is built on the CPU.

Each check runs in a fresh interpreter, since the setting is per process and cannot be undone.
"""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

PLATFORM = str(Path(__file__).resolve().parents[1] / "platform")

# Prints 1 when a 48 MiB block gets its own mmap (glibc's default: its threshold never rises
# above 32 MiB by itself), 0 when it comes from the heap; before and after `ACTION`.
PROBE = """
import ctypes
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def mapped():
    before = libc.mallinfo2().hblks
    block = libc.malloc(48 << 20)
    after = libc.mallinfo2().hblks
    libc.free(block)
    return after - before
print(mapped())
ACTION
print(mapped())
"""


def probe(action: str) -> list[int]:
    env = {**os.environ, "PYTHONPATH": PLATFORM}
    out = subprocess.run([sys.executable, "-c", PROBE.replace("ACTION", action)], env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return [int(line) for line in out.split()]


def test_reuse_freed_memory_keeps_large_blocks_in_the_heap() -> None:
    assert probe("from posmine.models.allocator import reuse_freed_memory; "
                 "assert reuse_freed_memory()") == [1, 0]


@pytest.mark.parametrize("reuse, expected", [(True, [1, 0]), (False, [1, 1])])
def test_cpu_encoder_sets_it_unless_told_not_to(tiny_model: str, reuse: bool, expected: list[int]) -> None:
    build = ("from posmine.config import TeacherConfig; from posmine.stages.embed import Encoder; "
             f"Encoder(TeacherConfig(model={tiny_model!r}, device='cpu', reuse_memory={reuse}))")
    assert probe(build) == expected
