"""The one way a config is built: Hydra composes ``conf/`` with the user's overrides into a typed dataclass.

``libero-eval`` composes through ``@hydra.main`` (for multiruns and launchers);
the server, the benchmarks and the tests call :func:`compose`; all of them turn
the result into dataclasses with :func:`build_run_config`, so paths, resume and
validation behave the same everywhere.
"""

from __future__ import annotations

import copy
import os
from importlib.resources import files
from pathlib import Path
from typing import Any, Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from libero_eval.config import RunConfig
from libero_eval.errors import ConfigError, one_line
from libero_eval.results import flatten_config, read_results
from libero_eval.suites import check_suite_names

CONFIG_MODULE = "libero_eval.conf"  # the repository's conf/, installed as package data
_ABSENT = object()


def register_schema(name: str, node: type) -> None:
    """Make a dataclass the schema a config file can list in its defaults (``run_schema``, ``serve_schema``)."""
    ConfigStore.instance().store(name=name, node=node)


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """``conf/<config_name>.yaml`` with ``overrides`` applied (:func:`suite_overrides` first), outside
    ``@hydra.main``; overrides that do not compose raise a one-line :class:`ConfigError`."""
    register_schema("run_schema", RunConfig)
    GlobalHydra.instance().clear()
    with initialize_config_module(CONFIG_MODULE, version_base=None):
        try:
            return hydra_compose(config_name, overrides=suite_overrides(overrides))
        except (HydraException, OmegaConfBaseException) as exc:  # Hydra's message is several lines
            raise ConfigError(_composition_error(exc)) from None


def suite_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides with ``suite=[a,b]`` written as ``suites=[a,b]`` (a multi-suite run); a ``suite=`` name that is
    unknown or cannot run raises :class:`ConfigError` listing the runnable ones, before Hydra looks for its file."""
    out = []
    for text in overrides:
        if not text.startswith("suite="):
            out.append(text)
            continue
        override = OverridesParser.create().parse_override(text)
        value = override.value()
        if isinstance(value, list):
            check_suite_names(value, key="suites")
            out.append(f"suites=[{','.join(value)}]")
            continue
        if override.is_choice_sweep() or not override.is_sweep_override():  # a glob matches existing files only
            check_suite_names(override.sweep_string_iterator() if override.is_sweep_override() else [str(value)])
        out.append(text)
    return out


def check_overrides(argv: Sequence[str]) -> None:
    """Compose the command line's config before Hydra starts: once, or in a multirun once per value of each
    choice sweep (``quant=fp,w5a8``), so that an unknown option or key, or a value of the wrong type, is one
    :class:`ConfigError` (Hydra would print several lines and exit 1, and a multirun would find it only when it
    reaches that job). Hydra's own flags and ``hydra.*`` overrides are left to Hydra."""
    flags = [arg for arg in argv if arg.startswith("-")]
    if any(flag not in ("-m", "--multirun") for flag in flags):
        return  # another config file or a Hydra command (--cfg, --help, ...): nothing to pre-compose
    hydras = ("hydra.", "hydra/")
    overrides = [arg for arg in argv if not arg.startswith("-") and not arg.lstrip("+~").startswith(hydras)]
    if not flags:
        compose(overrides)
        return
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError(_composition_error(exc)) from None
    fixed = [text for text, o in zip(overrides, parsed) if not o.is_sweep_override()]
    values = [[f"{o.get_key_element()}={v}"] for o in parsed if o.is_choice_sweep() for v in o.sweep_string_iterator()]
    for variant in [[], *values]:
        compose([*fixed, *variant])


def _composition_error(exc: BaseException) -> str:
    line = one_line(exc)
    if getattr(exc, "override", None):  # Hydra's parser names neither the override nor its grammar in one line
        grammar = "https://hydra.cc/docs/advanced/override_grammar/basic"
        return f"cannot parse the override {exc.override!r}: {line} (grammar: {grammar})"
    if line.startswith("Ambiguous value"):  # Hydra's hint, in one line
        return f"{line}: sweep it with -m, write a list as key=[a,b] or quote a string as key=\\'a,b\\'"
    options = getattr(exc, "options", None)  # a group option that does not exist: say which do
    return line + (f"; available: {', '.join(options)}" if options else "")


def suite_file(name: str) -> DictConfig:
    """A suite's own config, ``conf/suite/<name>.yaml``."""
    return OmegaConf.create((files(CONFIG_MODULE) / "suite" / f"{name}.yaml").read_text())


def suite_runs(dcfg: DictConfig, overrides: Sequence[str] = ()) -> list[DictConfig]:
    """The runs a composed config stands for: itself, or for a multi-suite config (``suites``) one run per suite,
    in order, each with that suite's own config plus the keys the given suite config sets differently from its
    file (``suite.max_steps=10`` applies to every suite). ``resume=FILE`` of a multi-suite run continues the run
    of FILE's suite, then starts the suites after it; those before it finished first (their files are complete)."""
    if dcfg.resume is not None:
        adopt_interrupted_config(dcfg, overrides)
    if dcfg.suites is None:
        return [dcfg]
    names = list(dcfg.suites)
    check_suite_names(names, key="suites")
    first = names[0]
    if dcfg.resume is not None:
        first = (read_results(Path(user_path(dcfg.resume))).get("config") or {}).get("suite", {}).get("name")
        if first not in names:
            raise ConfigError(f"resume: {dcfg.resume} is a run of {first}, which suites={names} does not hold")
    given = OmegaConf.to_container(dcfg.suite)
    own = OmegaConf.to_container(suite_file(given["name"]))
    changed = {k: v for k, v in given.items() if k != "name" and own.get(k) != v}
    runs = []
    for name in names[names.index(first):]:
        run = copy.deepcopy(dcfg)
        for key, value in {**OmegaConf.to_container(suite_file(name)), **changed}.items():
            run.suite[key] = value
        run.resume = dcfg.resume if name == first else None
        runs.append(run)
    return runs


def user_path(value: str | None) -> str | None:
    """A relative path against the directory the command ran in (a launcher or hydra.job.chdir may have moved
    this job); an address such as ``ws://host:port`` as given."""
    return value if value is None or "://" in value else to_absolute_path(value)


def adopt_interrupted_config(dcfg: DictConfig, overrides: Sequence[str]) -> None:
    """Give every key the command line leaves unset the interrupted run's value, so ``resume=FILE`` alone (what
    an interrupted run prints) continues it as configured; keys set on the command line must still match."""
    explicit = [o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides))]
    recorded = read_results(Path(user_path(dcfg.resume))).get("config") or {}
    for key, value in flatten_config(recorded).items():
        if key == "resume" or any(key == k or key.startswith(f"{k}.") for k in explicit):
            continue
        if OmegaConf.select(dcfg, key, default=_ABSENT) is not _ABSENT:  # a key of an older schema is left out
            OmegaConf.update(dcfg, key, value, merge=False)


def check_writable(folder: Path, key: str) -> None:
    """Refuse, before anything loads or is written, a folder that cannot be created or written into."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ValueError(f"{key}={folder} cannot be a folder: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{key}={folder} is not writable ({existing} refuses writes: read-only or not yours)")


def check_save_folder(save: str | None) -> None:
    """``quant.save`` is written only after calibration: a folder that cannot take it is refused before anything
    loads, not after the calibration it would have kept."""
    if save is not None:
        check_writable(Path(save), "quant.save")


def build_run_config(dcfg: DictConfig, overrides: Sequence[str] = ()) -> tuple[RunConfig, dict[str, Any]]:
    """The typed run config and the resolved plain one the results record. ``overrides`` are the user's, so a
    resumed run knows which keys they set. Raises ``ValueError`` (one line) for a bad value."""
    if dcfg.resume is not None:
        adopt_interrupted_config(dcfg, overrides)
    cfg: RunConfig = OmegaConf.to_object(dcfg)
    cfg.results_dir, cfg.resume = user_path(cfg.results_dir), user_path(cfg.resume)
    cfg.policy.path, cfg.policy.tokenizer = user_path(cfg.policy.path), user_path(cfg.policy.tokenizer)
    cfg.quant.save, cfg.quant.load = user_path(cfg.quant.save), user_path(cfg.quant.load)
    check_writable(Path(cfg.results_dir), "results_dir")
    check_save_folder(cfg.quant.save)
    return cfg, OmegaConf.to_container(dcfg, resolve=True)
