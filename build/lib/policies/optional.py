"""Importing an optional dependency with an error that says what is really missing."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType


class DependencyUnavailable(ValueError):
    """An optional dependency cannot be imported; the message names what is missing and how to get it."""


def import_optional(module: str, install_hint: str, who: str = "") -> ModuleType:
    """Import ``module``; if that fails, say whether the package itself is absent (``install_hint``) or a module it
    imports is (named, so a broken environment is not mistaken for a missing install). ``who`` prefixes that message
    (e.g. ``"policy 'openpi_pi05': "``)."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is not None and (err.name == top or err.name.startswith(top + ".")) and _absent(top):
            raise DependencyUnavailable(install_hint) from None
        raise DependencyUnavailable(
            f"{who}{top} is installed but importing {module} failed: No module named {err.name!r} "
            f"(a dependency of {top} is missing from this environment; install it, e.g. pip install {_dist(err.name)})"
        ) from None
    except ImportError as err:
        raise DependencyUnavailable(f"{who}{top} is installed but importing {module} failed: {err}") from None


def _absent(top: str) -> bool:
    try:
        return importlib.util.find_spec(top) is None
    except (ImportError, ValueError):
        return True


def _dist(name: str | None) -> str:
    return (name or "?").split(".")[0].replace("_", "-")
