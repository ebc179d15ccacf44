"""llama.cpp, the tests' and benchmarks' oracle, on CPUs that report AMX (Sapphire Rapids and later) in VMs
where ggml-cpu's AMX buffers fault at their first tile instruction (ldtilecfg: a general protection fault, the
process dies with SIGSEGV; seen with llama-cpp-python 0.3.36 here). ggml uses AMX only when the kernel grants
the permission (arch_prctl ARCH_REQ_XCOMP_PERM, ggml-cpu/amx/common.h); a seccomp filter that refuses that one
request makes ggml skip its AMX buffers exactly as on a CPU without AMX, and its other repacked buffers
(CPU_REPACK) stay: llama.cpp keeps the defaults it has on such a CPU. Never used at run time.

Call `guard()` before the first `import llama_cpp` of a process (its threads inherit the filter).
HOTCOLD_LLAMA_AMX=1 lets llama.cpp use AMX (where it works), =0 always refuses it.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

_SYS_ARCH_PRCTL = 158          # x86-64
_ARCH_REQ_XCOMP_PERM = 0x1023
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2
_installed = False


def cpu_has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def guard() -> bool:
    """Refuse AMX to llama.cpp in this process where the CPU has it (unless HOTCOLD_LLAMA_AMX=1); whether the
    filter is in place."""
    global _installed
    want = os.environ.get("HOTCOLD_LLAMA_AMX")
    if _installed or want == "1" or (want != "0" and not cpu_has_amx()):
        return _installed
    os.environ["HOTCOLD_LLAMA_AMX"] = "0"   # child processes decide the same

    class Insn(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]

    # classic BPF over seccomp_data: nr at offset 0, args[0] (low word) at 16; EPERM for arch_prctl(REQ_XCOMP_PERM)
    prog = [(0x20, 0, 0, 0), (0x15, 0, 3, _SYS_ARCH_PRCTL), (0x20, 0, 0, 16), (0x15, 0, 1, _ARCH_REQ_XCOMP_PERM),
            (0x06, 0, 0, 0x00050000 | 1), (0x06, 0, 0, 0x7FFF0000)]
    insns = (Insn * len(prog))(*[Insn(*p) for p in prog])
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
            libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(Prog(len(prog), insns)), 0, 0) != 0:
        return False
    _installed = True
    return True
