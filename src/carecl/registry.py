"""Name -> object registries (datasets, methods, ...), replacing if/elif factories.

The method registry fills itself: the first lookup imports every module of the `carecl.methods`
package, whose `@register_method` decorators add one entry each (options class + learner class).
A new method is therefore one new file in `carecl/methods/`, and nothing else to edit.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of builders; unknown names fail with the closest valid suggestion."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            self.add(name, obj, *aliases)
            return obj

        return decorator

    def add(self, name: str, obj: T, *aliases: str) -> None:
        for key in (name, *aliases):
            if key in self._entries or key in self._aliases:
                raise ValueError(f"{self.kind} {key!r} is already registered")
        self._entries[name] = obj
        for alias in aliases:
            self._aliases[alias] = name

    def canonical(self, name: str) -> str:
        if name in self._entries:
            return name
        if name in self._aliases:
            return self._aliases[name]
        known = sorted([*self._entries, *self._aliases])
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown {self.kind} {name!r}{hint} (known: {', '.join(sorted(self._entries))})")

    def get(self, name: str) -> T:
        return self._entries[self.canonical(name)]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


@dataclass(frozen=True)
class MethodEntry:
    """One registered continual learner: its typed options (a config.MethodConfig) and its class (a methods.base.Method)."""

    name: str
    options: type
    method: type


class DiscoveringRegistry(Registry[T]):
    """A registry that imports `package` and every module in it before its first lookup (their decorators
    register); `package` may also be a single module that fills the registry when imported."""

    def __init__(self, kind: str, package: str) -> None:
        super().__init__(kind)
        self.package = package
        self._discovered = False

    def discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(getattr(package, "__path__", [])):
            if not module.name.startswith("_"):
                importlib.import_module(f"{self.package}.{module.name}")

    def canonical(self, name: str) -> str:
        self.discover()
        return super().canonical(name)

    def names(self) -> list[str]:
        self.discover()
        return super().names()

    def __contains__(self, name: str) -> bool:
        self.discover()
        return super().__contains__(name)


# Every continual learner, by name: filled by `carecl.methods.base.register_method`.
METHODS: DiscoveringRegistry[MethodEntry] = DiscoveringRegistry("method", "carecl.methods")
# Transform recipes `data.transforms` may name: filled by `carecl.data.transforms` (torchvision) on first lookup,
# so the config checks a name against the recipes that exist without importing them itself.
TRANSFORMS: DiscoveringRegistry = DiscoveringRegistry("transform recipe", "carecl.data.transforms")
