"""Shared by the SGLang test modules: the install gate and the checks that nothing is left behind."""

from __future__ import annotations

import importlib.util
import os

import pytest

# SGLang's /dev/shm files: load snapshots, shared-memory queues, and multiprocessing semaphores of its processes
SHM_PREFIXES = ("sglang_", "sgl_shm", "sem.mp-")


def require_sglang() -> None:
    """Call at module level: skip the module without SGLang, except in CI (CI set), where a missing SGLang means
    tools/dev/install_sglang_cpu.sh failed and must not pass as skipped."""
    if importlib.util.find_spec("sglang") is None:
        if os.environ.get("CI"):
            raise RuntimeError("CI must run the SGLang tests: tools/dev/install_sglang_cpu.sh did not install sglang")
        pytest.skip("sglang is not installed (run tools/dev/install_sglang_cpu.sh)", allow_module_level=True)
    assert os.environ.get("KDSCALE_SGLANG_SHIMS"), "tests/conftest.py sets KDSCALE_SGLANG_SHIMS"


def shm_files() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith(SHM_PREFIXES)}


def sglang_processes(*, own: bool, replicas: bool = False) -> dict[int, str]:
    """SGLang engine processes (and, with ``replicas``, kdscale teacher replicas): this process's descendants
    (``own``) or all others on the machine."""
    import psutil

    mine = {p.pid for p in psutil.Process().children(recursive=True)}
    found = {}
    for proc in psutil.process_iter():
        try:
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if (proc.pid in mine) != own or proc.pid == os.getpid():
            continue
        if cmdline.startswith("sglang::") or (replicas and "TeacherReplica" in cmdline):
            found[proc.pid] = cmdline[:120]
    return found
