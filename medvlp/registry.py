"""Registries: lowercase name -> builder, for methods, datamodules, encoders and downstream tasks.

Nothing is listed by hand. Each registry knows the package that holds its built-ins
(``medvlp.methods``, ``medvlp.datamodules``, ``medvlp.encoders``, ``medvlp.downstream``) and finds
them by reading the source files of that package for the registering decorator
(``@register_method("name")``, ...): a new file there is found without editing any list, and
``medvlp list`` / ``medvlp --help`` never import torch because a module is imported only when one
of its entries is looked up. Third-party packages add entries through the entry-point group
``medvlp.plugins``: each entry point names a module (or a callable) that is imported (or called)
once, before the first lookup, and registers what it provides with the same decorators.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

ENTRY_POINT_GROUP = "medvlp.plugins"
_plugins_loaded = False


class RegistryError(KeyError):
    """An unknown or conflicting registry key."""

    def __str__(self) -> str:  # KeyError quotes its message; users should read plain text
        return str(self.args[0])


def did_you_mean(name: str, options: list[str]) -> str:
    """``" Did you mean 'x'?"`` for the closest option, or an empty string."""
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def load_plugins() -> None:
    """Import every module registered under the ``medvlp.plugins`` entry-point group (once)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as err:  # a broken plugin must not hide the built-ins
            raise RegistryError(
                f"Plugin entry point '{ep.name} = {ep.value}' (group {ENTRY_POINT_GROUP}) failed to "
                f"import: {type(err).__name__}: {err}"
            ) from err
        if callable(obj) and not isinstance(obj, type):
            obj()


def scan_package(package: str, decorators: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """Entries a package declares, found without importing it: ``name -> ("module:attr", help)``.

    Every ``.py`` file under the package is parsed (``ast``) for module-level classes or functions
    decorated with one of ``decorators`` called with a string literal name, e.g.
    ``@register_method("clip")`` or ``@METHODS.register("clip", help="...")``. The help text is the
    ``help=`` argument, else the first line of the object's docstring.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return {}
    found: dict[str, tuple[str, str]] = {}
    for root in spec.submodule_search_locations:
        for path in sorted(Path(root).rglob("*.py")):
            text = path.read_text(encoding="utf-8", errors="replace")
            if not any(d.rsplit(".", 1)[-1] in text for d in decorators):
                continue
            rel = path.relative_to(root).with_suffix("").parts
            module = ".".join([package, *[p for p in rel if p != "__init__"]])
            for name, attr, help_ in _decorated(ast.parse(text, filename=str(path)), decorators):
                found.setdefault(name.lower(), (f"{module}:{attr}", help_))
    return found


def _decorated(tree: ast.Module, decorators: tuple[str, ...]) -> list[tuple[str, str, str]]:
    out = []
    for node in tree.body:
        if not isinstance(node, ast.ClassDef | ast.FunctionDef):
            continue
        for deco in node.decorator_list:
            if not (isinstance(deco, ast.Call) and deco.args and isinstance(deco.args[0], ast.Constant)):
                continue
            if ast.unparse(deco.func) not in decorators or not isinstance(deco.args[0].value, str):
                continue
            help_ = next((k.value.value for k in deco.keywords if k.arg == "help" and isinstance(k.value, ast.Constant)), "")
            doc = (ast.get_docstring(node) or "").strip().split("\n")[0]
            out.append((deco.args[0].value, node.name, str(help_ or doc)))
    return out


class Registry:
    """Maps a lowercase key to a class or factory.

    Args:
        kind: what the entries are, for messages ("method").
        package: the package whose modules register the built-ins (found by :func:`scan_package`).
        decorators: the decorator spellings that register into this registry.

    Example:
        >>> METHODS = Registry("method")
        >>> @METHODS.register("clip")
        ... class CLIP: ...
        >>> METHODS.get("clip")
    """

    def __init__(self, kind: str, package: str = "", decorators: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.package = package
        self.decorators = decorators
        self._items: dict[str, Any] = {}
        self._lazy: dict[str, str] = {}
        self._help: dict[str, str] = {}
        self._scanned = not package

    def register(self, name: str, help: str = "") -> Callable[[Any], Any]:
        """Decorator registering ``obj`` under ``name``."""
        key = name.lower()

        def deco(obj: Any) -> Any:
            old = self._items.get(key)
            if old is not None and old is not obj and _qualname(old) != _qualname(obj):
                raise RegistryError(
                    f"{self.kind} '{key}' is already registered by {_qualname(old)}; "
                    f"{_qualname(obj)} cannot take the same name."
                )
            self._items[key] = obj
            if help or key not in self._help:
                self._help[key] = help or (obj.__doc__ or "").strip().split("\n")[0]
            return obj

        return deco

    def register_lazy(self, name: str, target: str, help: str = "") -> None:
        """Declare ``name`` as provided by ``"package.module:attr"``, imported on first use."""
        self._lazy[name.lower()] = target
        self._help.setdefault(name.lower(), help)

    def _discover(self) -> None:
        if self._scanned:
            return
        self._scanned = True
        for name, (target, help_) in scan_package(self.package, self.decorators).items():
            if name not in self._items:
                self.register_lazy(name, target, help_)

    def names(self) -> list[str]:
        load_plugins()
        self._discover()
        return sorted(set(self._items) | set(self._lazy))

    def describe(self, name: str) -> str:
        self._discover()
        return self._help.get(name.lower(), "")

    def __contains__(self, name: str) -> bool:
        return name.lower() in self.names()

    def where(self) -> str:
        """Where entries are looked for (for error messages)."""
        built_in = f"modules of the {self.package} package registered with @{self.decorators[0]}(...)" if self.package else ""
        plugins = f"packages declaring a '{ENTRY_POINT_GROUP}' entry point"
        return f"{built_in} and {plugins}" if built_in else plugins

    def get(self, name: str) -> Any:
        """Return the object registered under ``name``; unknown names fail with suggestions."""
        load_plugins()
        self._discover()
        key = str(name).lower()
        if key in self._items:
            return self._items[key]
        if key in self._lazy:
            module, _, attr = self._lazy[key].partition(":")
            obj = getattr(importlib.import_module(module), attr)
            self._items.setdefault(key, obj)
            return self._items[key]
        options = self.names()
        raise RegistryError(
            f"Unknown {self.kind} '{name}'.{did_you_mean(key, options)} "
            f"Available: {', '.join(options) or '(none)'}. {self.kind.capitalize()}s are looked for in the "
            f"{self.where()}."
        )


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


METHODS = Registry("method", "medvlp.methods", ("register_method", "METHODS.register"))
DATAMODULES = Registry("datamodule", "medvlp.datamodules", ("register_datamodule", "DATAMODULES.register"))
IMAGE_ENCODERS = Registry("image encoder", "medvlp.encoders", ("register_image_encoder", "IMAGE_ENCODERS.register"))
TEXT_ENCODERS = Registry("text encoder", "medvlp.encoders", ("register_text_encoder", "TEXT_ENCODERS.register"))
TASKS = Registry("downstream task", "medvlp.downstream", ("register_task", "TASKS.register"))

ALL = {
    "methods": METHODS,
    "datamodules": DATAMODULES,
    "image_encoders": IMAGE_ENCODERS,
    "text_encoders": TEXT_ENCODERS,
    "tasks": TASKS,
}

register_method = METHODS.register
register_datamodule = DATAMODULES.register
register_image_encoder = IMAGE_ENCODERS.register
register_text_encoder = TEXT_ENCODERS.register
register_task = TASKS.register
