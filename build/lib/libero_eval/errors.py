"""User-facing errors: a mistake the user can fix costs one line on stderr and exit code 2."""

from __future__ import annotations

import sys
from typing import NoReturn

from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config value is invalid; the message is one line meant for the user."""


class RunError(Exception):
    """A job of a multirun that cannot run; Hydra records it as failed and goes on with the other jobs."""


def root_cause(exc: BaseException) -> BaseException:
    # OmegaConf wraps errors raised in __post_init__; the user needs the original sentence.
    while exc.__cause__ is not None and isinstance(exc, OmegaConfBaseException):
        exc = exc.__cause__
    return exc


def one_line(exc: BaseException) -> str:
    """The first line of the error the user caused, without OmegaConf's wrapping; for a Hydra composition error
    ("Could not override 'quant.x'."), with the first line of its cause, which says why."""
    exc = root_cause(exc)
    lines = str(exc).splitlines()
    line = lines[0] if lines else type(exc).__name__
    if isinstance(exc, HydraException) and exc.__cause__ is not None and str(exc.__cause__):
        line = f"{line.rstrip('.')}: {str(exc.__cause__).splitlines()[0]}"
    return line


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr and exit ``code``; in a Hydra multirun job, an error Hydra records so the sweep goes on.

    Works with or without ``@hydra.main`` (the run, the server, the tools).
    """
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        # Exiting here would end the whole sweep and leave this job in the sweep index as still running.
        raise RunError(message) from None
    print(f"error: {message}", file=sys.stderr)
    # Half-built simulator objects complain from their destructors at exit; after the error that is noise.
    sys.unraisablehook = lambda unraisable: None
    sys.exit(code)
