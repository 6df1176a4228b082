"""Load a script of this repository (``benchmarks/*.py``, ``docs/*.py``) as a module, so that tests
can call its pure parts (argument parsing, record building) without running it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent


def load_script(path: str, name: str) -> ModuleType:
    """The script at ``path`` (relative to the repository root) executed as module ``name``, which is
    registered in ``sys.modules`` while it runs (dataclasses look their module up there). Two loads
    under different names give two independent modules."""
    spec = importlib.util.spec_from_file_location(name, REPO / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
