"""Policy adapters and the factory that builds one by name."""

from __future__ import annotations

import importlib
import inspect

from policies.base import ObservationBatch, ObsMode, Policy, PolicyWrapper, collate

# name -> "module:Class"; imported lazily so a missing optional extra only fails when chosen.
REGISTRY: dict[str, str] = {
    "scripted_expert": "policies.scripted_expert:ScriptedExpert",
    "embedded": "policies.embedded:EmbeddedPolicy",
    "remote": "policies.remote:RemotePolicy",
    "openpi_pi05": "policies.openpi_policy:OpenpiPi05",
    "openpi_pi0": "policies.openpi_policy:OpenpiPi0",
    "lerobot_smolvla": "policies.lerobot_policy:LeRobotSmolVLA",
    "lerobot_pi05": "policies.lerobot_policy:LeRobotPi05",
    "lerobot_pi0": "policies.lerobot_policy:LeRobotPi0",
}


class UnknownPolicyError(ValueError):
    pass


def make_policy(name: str, path: str | None = None, device: str = "auto", **options: str | None) -> Policy:
    """Build the policy registered as ``name``; the other arguments go to its ``from_config``.

    ``options`` that are set (not None), such as ``tokenizer`` (a local tokenizer directory) or ``compile``, go
    only to policies whose ``from_config`` takes them; any other policy refuses them.
    """
    if name not in REGISTRY:
        raise UnknownPolicyError(f"policy {name!r} is not registered; available: {', '.join(sorted(REGISTRY))}")
    module_name, class_name = REGISTRY[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    given = {key: value for key, value in options.items() if value is not None}
    accepted = inspect.signature(cls.from_config).parameters
    for key, value in given.items():
        if key not in accepted:
            raise ValueError(f"policy {name!r} takes no {key} (got policy.{key}={value!r})")
    return cls.from_config(path=path, device=device, **given)


__all__ = ["ObservationBatch", "ObsMode", "Policy", "PolicyWrapper", "collate", "make_policy", "REGISTRY", "UnknownPolicyError"]
