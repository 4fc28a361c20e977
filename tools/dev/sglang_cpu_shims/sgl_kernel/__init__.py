"""Import-only stand-in for sgl_kernel, for running SGLang's CPU engine in tests (tools/dev scaffolding).

SGLang 0.5.23 imports sgl_kernel when its CPU engine is on (kvcache cache_move); the CPU build of sgl_kernel is not
on PyPI and its fast paths need AVX-512 + AMX. Without them SGLang falls back to torch-native attention and
linear layers and, for Llama/Qwen2, calls nothing from here: every attribute is a function that raises if called,
so a path that does need a real kernel fails loudly instead of computing something else.
Only on sys.path inside SGLang teacher processes (KDSCALE_SGLANG_SHIMS); see tools/dev/install_sglang_cpu.sh.
"""

__version__ = "0.0.0+kdscale-shim"


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def _missing(*args, **kwargs):
        raise RuntimeError(f"sgl_kernel.{name} called: sgl_kernel is only an import shim here (kdscale CPU test path)")

    _missing.__name__ = name
    return _missing
