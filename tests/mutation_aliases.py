"""Let mutmut reach ``callbacks/`` and ``recipes/``, which install as ``advtrain.callbacks`` and ``advtrain.recipes``.

mutmut names a mutant after its file's path (``callbacks.layerwise_adversarial_training.x_…``) and
activates it only in functions whose ``__module__`` is that name. Imported as
``advtrain.callbacks.…``, the module would carry the other name and every mutant would be tested
against the original code. Under mutmut (the working directory is its ``mutants/`` copy), the
finder below hands out the path-named modules of that copy for the installed names, so one module
object answers to both names and its functions carry the path name.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from pathlib import Path
from types import ModuleType

ALIASES = {"advtrain.callbacks": "callbacks", "advtrain.recipes": "recipes"}


def path_name(fullname: str) -> str | None:
    """The path-named module behind an installed name, or None for a name outside ``ALIASES``."""
    for installed, top in ALIASES.items():
        if fullname == installed or fullname.startswith(installed + "."):
            return top + fullname[len(installed):]
    return None


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: importing the path-named module ran it."""


class PathNamedModules(importlib.abc.MetaPathFinder):
    """Answers ``advtrain.callbacks.x`` with the module ``callbacks.x`` (the same object)."""

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        target_name = path_name(fullname)
        if target_name is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(target_name))


def under_mutmut(cwd: Path | None = None) -> bool:
    """Whether pytest runs inside mutmut's ``mutants/`` copy of the repository."""
    cwd = Path.cwd() if cwd is None else cwd
    return cwd.name == "mutants" and all((cwd / top / "__init__.py").is_file() for top in ALIASES.values())


def install_if_mutating() -> bool:
    """Put the finder first on ``sys.meta_path`` when running under mutmut; returns whether it did."""
    if not under_mutmut() or any(isinstance(finder, PathNamedModules) for finder in sys.meta_path):
        return False
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    sys.meta_path.insert(0, PathNamedModules())
    return True
