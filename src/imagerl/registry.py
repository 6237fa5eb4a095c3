"""Name -> factory maps. Variants (policies, rewards, advantage and loss functions) are chosen by name
from the config instead of if/elif towers. A name of the form ``package.module:attr`` imports user code.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


def did_you_mean(name: str, choices: list[str], prefix: str = "") -> str:
    """' Did you mean 'x'?' for the closest of `choices` to a mistyped `name` ('' when none is close); `prefix` is
    shown before the suggestion (e.g. 'builtin:'). The one wording of that hint in every error message."""
    close = difflib.get_close_matches(name, choices, n=1)
    return f" Did you mean '{prefix}{close[0]}'?" if close else ""


class RegistryError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


class Registry(Generic[T]):
    """A named map with a duplicate guard and helpful unknown-name errors."""

    def __init__(self, kind: str, field: str):
        self.kind = kind  # e.g. "reward"
        self.field = field  # config field that selects from it, for error messages
        self._items: dict[str, T] = {}
        self._lazy: dict[str, str] = {}  # name -> "module:attr" imported on first use

    def register(self, name: str, obj: T | None = None) -> Any:
        def deco(o: T) -> T:
            if name in self._items and self._items[name] is not o:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = o
            return o

        return deco(obj) if obj is not None else deco

    def register_lazy(self, name: str, target: str) -> None:
        """Register `name` to be imported from `module:attr` when first asked for (keeps imports cheap)."""
        self._lazy[name] = target

    def names(self) -> list[str]:
        return sorted(set(self._items) | set(self._lazy))

    def __contains__(self, name: str) -> bool:
        return name in self._items or name in self._lazy or ":" in name

    def get(self, name: str, field: str = "") -> T:
        """The object registered as `name` (or 'package.module:Attr'); errors name `field` (default: the
        registry's generic one, e.g. 'rewards[].type'; callers that know the index pass 'rewards[2].type')."""
        field = field or self.field
        if name in self._items:
            return self._items[name]
        if name in self._lazy:
            obj = import_object(self._lazy[name], field=field)
            self._items[name] = obj
            return obj
        if ":" in name:
            return import_object(name, field=field)
        hint = did_you_mean(name, self.names())
        raise RegistryError(
            f"{field}: unknown {self.kind} '{name}'.{hint} Valid names: {', '.join(self.names())}; "
            f"or give your own as 'package.module:Name'."
        )


def _import_user_module(name: str) -> Any:
    """importlib.import_module, also looking in the working directory. `python -m` puts it on sys.path, but
    console scripts (`imagerl train ...`) do not, and a user's own module (mypkg/rewards.py under the directory the
    command runs from) is expected to import from there. It goes last on sys.path, so it shadows nothing; only
    a missing top-level module is retried (a dependency missing inside the user's module stays that error)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if e.name != name.split(".")[0] or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        return importlib.import_module(name)


def import_object(path: str, field: str = "") -> Any:
    mod_name, _, attr = path.partition(":")
    try:
        mod = _import_user_module(mod_name)
    except ImportError as e:
        missing = getattr(e, "name", None)
        if isinstance(e, ModuleNotFoundError) and missing and not (mod_name == missing or mod_name.startswith(missing + ".")):
            # the user's module was found; something it imports was not
            raise RegistryError(f"{field}: module '{mod_name}' (from '{path}') imports '{missing}', which is not "
                                f"installed: pip install it (or fix that import)") from e
        raise RegistryError(f"{field}: cannot import module '{mod_name}' named in '{path}': {e} (it must be "
                            f"installed, on PYTHONPATH, or under the working directory {os.getcwd()})") from e
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            hint = did_you_mean(part, [n for n in dir(obj) if not n.startswith("_")])
            raise RegistryError(f"{field}: module '{mod_name}' has no attribute '{attr}' (from '{path}').{hint}")
        obj = getattr(obj, part)
    return obj


POLICIES: Registry[Callable[..., Any]] = Registry("policy", "model.family")
REWARDS: Registry[Callable[..., Any]] = Registry("reward", "rewards[].type")
ADVANTAGES: Registry[Callable[..., Any]] = Registry("advantage estimator", "algorithm.advantage")
KL_ESTIMATORS: Registry[Callable[..., Any]] = Registry("KL estimator", "algorithm.kl_estimator")
