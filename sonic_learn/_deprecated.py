"""Old names that moved, kept working for a while with a ``DeprecationWarning``.

A module whose public name was renamed ends with ``__getattr__ = renamed(__name__, globals(), {old: new})``:
Python calls a module's ``__getattr__`` only for names the module does not define, so the new name
costs nothing and the old one warns once per use and returns the same object.
"""

from __future__ import annotations

import warnings


def renamed(module: str, namespace: dict, renames: dict[str, str]):
    """A module ``__getattr__`` that maps each old name in ``renames`` to its new name in ``namespace``."""

    def __getattr__(name: str):
        if name in renames:
            new = renames[name]
            warnings.warn(f"{module}.{name} is now {module}.{new}", DeprecationWarning, stacklevel=2)
            return namespace[new]
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
