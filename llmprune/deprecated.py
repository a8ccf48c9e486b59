"""The module paths of llmprune 0.1 (``llmprune.export``, ``llmprune.calibrate``, ...), kept for
one release as deprecated aliases of the modules that own their names now.

Each old path is a module object whose attributes are looked up, on first use, in the new
modules listed for it (in order); the first lookup warns with a DeprecationWarning that names
the new path. Nothing is imported until an old path is used. :func:`install_moved_modules` puts
them into ``sys.modules`` and adds a finder that makes them again if one is removed.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

# old module path -> the modules that define its names now, searched in order
MOVED: dict[str, tuple[str, ...]] = {
    "llmprune.errors": ("llmprune.core.errors",),
    "llmprune.masks": ("llmprune.core.masks", "llmprune.core.sparsity"),
    "llmprune.calibrate": ("llmprune.engine.calibrate",),
    "llmprune.streaming": ("llmprune.runs.streaming", "llmprune.engine.streaming",
                           "llmprune.io.safetensors"),
    "llmprune.distributed": ("llmprune.engine.distributed",),
    "llmprune.device_map": ("llmprune.engine.device_map",),
    "llmprune.allocation": ("llmprune.engine.allocation",),
    "llmprune.data": ("llmprune.io.data",),
    "llmprune.loading": ("llmprune.io.loading",),
    "llmprune.export": ("llmprune.io.export", "llmprune.io.checkpoints", "llmprune.io.sources",
                        "llmprune.io.shards", "llmprune.io.compact_reader", "llmprune.io.meta",
                        "llmprune.io.safetensors", "llmprune.io.checksums", "llmprune.io.loading",
                        "llmprune.core.errors"),
    "llmprune.compact": ("llmprune.io.compact",),
    "llmprune.output": ("llmprune.io.output",),
    "llmprune.hub": ("llmprune.io.hub",),
    "llmprune.inspection": ("llmprune.io.inspection",),
    "llmprune.sparse_linear": ("llmprune.sparse.linear", "llmprune.sparse.apply"),
    "llmprune.structured_run": ("llmprune.runs.structured",),
    "llmprune.bonsai": ("llmprune.structured.bonsai", "llmprune.runs.structured"),
    "llmprune.loraprune": ("llmprune.structured.loraprune", "llmprune.runs.structured"),
    "llmprune.perp": ("llmprune.retrain.perp", "llmprune.runs.perp"),
    "llmprune.dare": ("llmprune.delta.dare",),
    "llmprune.darex": ("llmprune.delta.darex",),
    "llmprune.merge": ("llmprune.delta.merge",),
    "llmprune.lmeval": ("llmprune.evaluate.lmeval",),
}


class MovedModule(types.ModuleType):
    """An old module path: attribute lookups go to the new modules, with one warning."""

    def __init__(self, name: str, targets: tuple[str, ...]):
        super().__init__(name, f"Deprecated alias of {', '.join(targets)}.")
        self.__dict__["_targets"] = targets
        self.__dict__["_warned"] = False

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        targets = self.__dict__["_targets"]
        if not self.__dict__["_warned"]:
            self.__dict__["_warned"] = True
            warnings.warn(f"{self.__name__} is deprecated; import from {' or '.join(targets)}",
                          DeprecationWarning, stacklevel=2)
        for target in targets:
            module = importlib.import_module(target)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}")

    def __dir__(self):
        names: set[str] = set()
        for target in self.__dict__["_targets"]:
            names |= set(dir(importlib.import_module(target)))
        return sorted(names)


class MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old path as a :class:`MovedModule`."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return MovedModule(spec.name, MOVED[spec.name])

    def exec_module(self, module) -> None:
        pass


def install_moved_modules() -> None:
    """Put every old path into ``sys.modules`` (one already there stays), and the finder that
    imports an old path anew into ``sys.meta_path``. Filling ``sys.modules`` up front keeps
    ``llmprune.perp`` the function: importing a submodule through a finder would set the
    package's attribute of that name to the module."""
    if not any(isinstance(f, MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedFinder())
    for old, targets in MOVED.items():
        sys.modules.setdefault(old, MovedModule(old, targets))
