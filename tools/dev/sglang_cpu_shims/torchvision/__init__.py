"""Import-only stand-in for torchvision, for running SGLang's CPU engine in tests (tools/dev scaffolding).

SGLang 0.5.23 imports torchvision at module level (a vision-model config utility) even for text models, and PyPI's
torchvision does not load beside the CPU torch wheel ("operator torchvision::nms does not exist"). kdscale's text
teachers never call it: any attribute is an inert placeholder that raises if it is ever *called*.
Only on sys.path inside SGLang teacher processes (KDSCALE_SGLANG_SHIMS); see tools/dev/install_sglang_cpu.sh.
"""

import sys
import types

__version__ = "0.28.0"


class _Placeholder:
    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} called: torchvision is only an import shim here (kdscale CPU test path)")

    def __mro_entries__(self, bases):
        return (object,)


class _ShimModule(types.ModuleType):
    __path__: list = []  # a package, so that "import torchvision.x.y" resolves through the finder below

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(f"{self.__name__}.{attr}")


class _Finder:
    """Resolves every torchvision.* submodule to a _ShimModule."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if not name.startswith("torchvision."):
            return None
        import importlib.machinery

        return importlib.machinery.ModuleSpec(name, _Finder, is_package=True)

    @staticmethod
    def create_module(spec):
        return _ShimModule(spec.name)

    @staticmethod
    def exec_module(module):
        module.__path__ = []


sys.meta_path.insert(0, _Finder)
sys.modules[__name__].__class__ = _ShimModule
