"""Which ``nn.Linear`` modules of a model get quantized."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn


@dataclass
class LayerSelection:
    """Regexes (``re.search`` on qualified module names) and explicit names; ``exclude`` wins.

    With neither ``include`` nor ``names`` every ``nn.Linear`` is a candidate.
    """

    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for kind in ("include", "exclude"):
            for pattern in getattr(self, kind):
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"LayerSelection.{kind} has an invalid regex {pattern!r}: {err}") from None

    def wants(self, name: str) -> bool:
        if any(re.search(p, name) for p in self.exclude):
            return False
        if not self.include and not self.names:
            return True
        return name in self.names or any(re.search(p, name) for p in self.include)

    def describe(self) -> str:
        return f"include={self.include}, exclude={self.exclude}, names={self.names}"


def select_layers(model: nn.Module, selection: LayerSelection) -> list[tuple[str, nn.Linear]]:
    """The selected ``nn.Linear`` modules as (qualified name, module), in module order.

    Raises ValueError when an explicit name is not an ``nn.Linear`` of the
    model, and when nothing matches, since quantizing nothing is never intended.
    """
    modules = dict(model.named_modules())
    for name in selection.names:
        if name not in modules:
            raise ValueError(f"layer {name!r} named in the selection is not a module of the model")
        if not isinstance(modules[name], nn.Linear):
            kind = type(modules[name]).__name__
            raise ValueError(f"layer {name!r} named in the selection is a {kind}, not nn.Linear")
    matches = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear) and selection.wants(n)]
    if not matches:
        linears = sum(isinstance(m, nn.Linear) for m in modules.values())
        raise ValueError(f"no layers matched the selection ({selection.describe()}) among {linears} nn.Linear modules")
    return matches
