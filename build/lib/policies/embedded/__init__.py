"""The embedded default policy: a small VLA-shaped flow-matching policy shipped with its weights."""

from policies.embedded.policy import DEFAULT_WEIGHTS, EmbeddedPolicy

__all__ = ["DEFAULT_WEIGHTS", "EmbeddedPolicy"]
