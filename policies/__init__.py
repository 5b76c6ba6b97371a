"""Policy adapters and the factory that builds one by name."""

from __future__ import annotations

import importlib

from policies.base import ObservationBatch, ObsMode, Policy, collate

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


def make_policy(name: str, path: str | None = None, device: str = "auto") -> Policy:
    """Build the policy registered as ``name``; ``path`` and ``device`` go to its constructor."""
    if name not in REGISTRY:
        raise UnknownPolicyError(f"policy {name!r} is not registered; available: {', '.join(sorted(REGISTRY))}")
    module_name, class_name = REGISTRY[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls.from_config(path=path, device=device)


__all__ = ["ObservationBatch", "ObsMode", "Policy", "collate", "make_policy", "REGISTRY", "UnknownPolicyError"]
