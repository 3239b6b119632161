"""Optional dependencies: each lives in an extra of the package (``pip install 'owl_lightning[NAME]'``),
and importing one that is missing says which extra installs it."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """Import an application's optional dependency, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module.split(".")[0]:
            raise
        raise ModuleNotFoundError(
            f"{module} is not installed: pip install 'owl_lightning[{extra}]' (or `make install`, which installs every extra)",
            name=err.name,
        ) from None
