"""Test-only: `import timm` where torchvision cannot be imported.

Why: timm 1.0 imports torchvision when it is imported (`FrozenBatchNorm2d` in timm.layers and
timm.utils, the transforms in timm.data), although the ViT and EVA models that the tests build
never use it. PyPI's torchvision wheels are built for one torch build, and beside this project's
torch (2.13.0 CPU) they fail to import ("operator torchvision::nms does not exist"). So timm is
installed with `pip install --no-deps timm pyyaml` and, when the real torchvision does not import,
stub modules stand in for it.

Every attribute of a stub module is a placeholder class. Using one (instantiating or calling it)
raises, and is recorded in `CALLS`, so that a test can assert that the code paths under test never
reached torchvision even where timm would swallow the error.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

STUB_ROOT = "torchvision"
CALLS: list[str] = []  # names of the placeholders that were used (should stay empty)
TIMM_INSTALL = "pip install --no-deps timm==1.0.31 pyyaml"


class _PlaceholderMeta(type):
    """Placeholders answer any attribute with another placeholder (e.g. InterpolationMode.BICUBIC)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args, **kwargs):
        CALLS.append(cls.__qualname__)
        raise RuntimeError(f"{cls.__qualname__} is a test stub of torchvision (see tests/_timm_shim.py): "
                           "this code path needs the real torchvision")


_PLACEHOLDERS: dict[str, type] = {}


def _placeholder(qualname: str) -> type:
    if qualname not in _PLACEHOLDERS:
        cls = _PlaceholderMeta(qualname.rsplit(".", 1)[-1], (), {})
        cls.__qualname__ = qualname
        _PLACEHOLDERS[qualname] = cls
    return _PLACEHOLDERS[qualname]


class _StubModule(types.ModuleType):
    """A package whose every public attribute is a placeholder, and whose submodules are stubs too."""

    __version__ = "0.0.0+jdd-test-stub"

    def __init__(self, name: str):
        super().__init__(name)
        self.__path__ = []  # a package, so that `import torchvision.ops.misc` works

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{self.__name__}.{name}")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == STUB_ROOT or fullname.startswith(STUB_ROOT + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module):
        pass


def _forget(root: str) -> None:
    for name in [n for n in sys.modules if n == root or n.startswith(root + ".")]:
        del sys.modules[name]


def install_torchvision_stub() -> bool:
    """Puts the stub in place unless the real torchvision imports; True when the stub is in use."""
    if any(isinstance(f, _StubFinder) for f in sys.meta_path):
        return True
    try:
        import torchvision  # noqa: F401
        return False
    except Exception:  # absent (ImportError) or built for another torch (RuntimeError at import)
        _forget(STUB_ROOT)  # a half-imported real torchvision must not shadow the stub
    sys.meta_path.insert(0, _StubFinder())
    return True


def import_timm():
    """(timm module, None), or (None, reason to skip) when torch or timm is not installed or timm does not import."""
    for name, hint in (("torch", "pip install -e '.[dev]'"), ("timm", TIMM_INSTALL)):
        if importlib.util.find_spec(name) is None:
            return None, f"{name} is not installed; the timm parity tests need it ({hint})"
    install_torchvision_stub()
    try:
        import timm
    except Exception as err:  # noqa: BLE001  (any import failure means: cannot test against timm here)
        return None, f"timm does not import ({type(err).__name__}: {err}); {TIMM_INSTALL}"
    return timm, None


def is_stub(module) -> bool:
    """Whether ``module`` is one of the stand-ins this shim installs (not the real torchvision)."""
    return isinstance(module, _StubModule)
