"""Turn parsed YAML into frozen, typed dataclasses, with errors that name file, key and fix.

Each config dataclass declares its fields with ordinary type hints; bounds and allowed
values ride in ``field(metadata=...)`` via :func:`spec`. :func:`build` walks the hints, so a
new field needs no parsing code. Nothing past the entry point reads raw dicts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from shared.errors import ConfigError

T = TypeVar("T")


def spec(
    default: Any = dataclasses.MISSING,
    *,
    doc: str,
    choices: tuple[Any, ...] | None = None,
    ge: float | None = None,
    le: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
) -> Any:
    """A dataclass field with a description and optional bounds or choices."""
    meta = {"doc": doc, "choices": choices, "ge": ge, "le": le, "gt": gt, "lt": lt}
    if isinstance(default, (list, dict, set)):
        raise TypeError("Use a tuple or a frozen dataclass for defaults, never a mutable value.")
    if dataclasses.is_dataclass(default):
        factory = type(default)
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, raising :class:`ConfigError` that names the file on any problem."""
    p = Path(path)
    return yaml_mapping(read_config_text(p), p)


def read_config_text(path: str | Path) -> str:
    """A config file's text, or a :class:`ConfigError` naming the file and what to do."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"Config file {p} does not exist; check the path.") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"Config file {p} is not UTF-8 text; re-save it as UTF-8.") from exc
    except IsADirectoryError:
        raise ConfigError(f"Config file {p} is a folder; give the YAML file itself.") from None
    except PermissionError as exc:
        raise ConfigError(
            f"Config file {p} cannot be read by this user ({exc.strerror}); run the command as the user it belongs to "
            f"(e.g. the site's service user), or let this user read it."
        ) from None
    except OSError as exc:
        raise ConfigError(f"Config file {p} cannot be read ({exc.strerror or exc}); check the path.") from None


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping names the same key twice (plain YAML keeps the last one, silently)."""

    def __init__(self, key: Any, first: yaml.Mark, again: yaml.Mark) -> None:
        super().__init__(problem=f"duplicate key {key!r}", problem_mark=again)
        self.key, self.first_line, self.line = key, first.line + 1, again.line + 1


MAX_ALIAS_VALUES = 10_000
"""How many values a document's aliases may add when expanded: plenty for repeating a section,
far below an alias bomb (a few hundred bytes that expand to millions of values)."""


class AliasBombError(yaml.YAMLError):
    """A document whose aliases expand to more than :data:`MAX_ALIAS_VALUES` values."""


def _alias_values(root: yaml.Node) -> int:
    """How many values the aliases under ``root`` add when expanded (each node once per use,
    counted without expanding anything: a node's expanded size is remembered)."""
    size: dict[int, int] = {}
    open_: set[int] = set()  # the nodes being counted: the ancestors of the one on top
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # iterative post-order: no recursion limit, whatever the nesting
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            size[key] = 1 + sum(size.get(id(k), 1) for k in _children(node))  # .get: a node inside itself counts once
            open_.discard(key)
        elif key not in size and key not in open_:
            open_.add(key)
            stack.append((node, True))
            stack.extend((k, False) for k in _children(node))
    return size[id(root)] - len(size)  # expanded minus written


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping may not repeat a key and aliases may not
    expand to more than :data:`MAX_ALIAS_VALUES` values.

    ``yaml.safe_load`` keeps the last of two equal keys, so a second ``privacy:`` block
    would silently replace the first (and reset its fields to their defaults)."""

    def construct_document(self, node: yaml.Node) -> Any:
        if _alias_values(node) > MAX_ALIAS_VALUES:
            raise AliasBombError(f"aliases expand to more than {MAX_ALIAS_VALUES} values")
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges; explicit keys may override it
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: SafeLoader refuses it itself
                    continue
                if first is not key_node.start_mark:
                    raise DuplicateKeyError(key, first, key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


YAML12_FLOAT = re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$")
"""A float in exponent notation as YAML 1.2 and JSON write it (``1e-5``, ``2.5E3``, ``.5e-2``).
PyYAML follows YAML 1.1, whose floats need a dot and a signed exponent (``1.0e-5``), and reads
``1e-5`` as the text '1e-5'; every config is read with this added, so ``target_delta: 1e-5``
is the number it looks like. Plain integers and YAML 1.1 floats resolve as before (they are
matched first), and a quoted value stays text."""

_YAML12_FLOAT_TAG = "tag:fedrelapse,2026:yaml12-float"


class ExponentFloat(float):
    """A float read from a YAML 1.2 exponent literal, with its text: a text field (a name, a
    path) given ``1e5`` keeps the text '1e5', as YAML 1.1 read it before."""

    text: str

    def __new__(cls, text: str) -> ExponentFloat:
        obj = super().__new__(cls, text)
        obj.text = text
        return obj


def _construct_exponent_float(loader: yaml.SafeLoader, node: yaml.Node) -> ExponentFloat:
    return ExponentFloat(loader.construct_scalar(node))  # type: ignore[arg-type]


UniqueKeyLoader.add_implicit_resolver(_YAML12_FLOAT_TAG, YAML12_FLOAT, list("-+0123456789."))
UniqueKeyLoader.add_constructor(_YAML12_FLOAT_TAG, _construct_exponent_float)
yaml.SafeDumper.add_representer(ExponentFloat, yaml.SafeDumper.represent_float)  # a raw config mapping written back (bench) stays dumpable


def parse_yaml(text: str, source: str) -> Any:
    """``text`` parsed as YAML (duplicate keys refused); ``source`` names it in every :class:`ConfigError`."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except DuplicateKeyError as exc:
        raise ConfigError(
            f"{source}: key {_show_key(exc.key)} appears twice in the same section (lines {exc.first_line} and {exc.line}); "
            f"YAML would silently keep only the second. Merge the two into one."
        ) from None
    except AliasBombError:
        raise ConfigError(
            f"{source}: its YAML aliases (*name) expand to more than {MAX_ALIAS_VALUES} values, which no config needs "
            f"(a few hundred bytes of nested aliases can expand to millions). Write the values out, or repeat sections "
            f"with fewer, flatter aliases."
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source} is not valid YAML{where}: {exc}.") from exc


def yaml_mapping(text: str, p: Path) -> dict[str, Any]:
    """The YAML mapping in ``text`` read from file ``p`` (named in every :class:`ConfigError`)."""
    return text_mapping(text, f"Config file {p}")


def text_mapping(text: str, source: str) -> dict[str, Any]:
    """The YAML mapping in ``text``; ``source`` (e.g. "Config file X") names it in every :class:`ConfigError`."""
    data = parse_yaml(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping of keys at the top level.")
    return data


def build(cls: type[T], data: Any, *, source: str, path: str = "") -> T:
    """Validate ``data`` into dataclass ``cls``; ``source`` names the file for errors."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: `{path or '<top>'}` must be a mapping, got {_show(data)}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(map(_show_key, set(data) - set(fields)))  # as shown: YAML keys may be text, numbers or both
    if unknown:
        where = f"`{path}`" if path else "the top level"
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(unknown)} in {where}; "
            f"allowed keys are {', '.join(sorted(fields))}."
        )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{source}: required key `{key}` is missing ({f.metadata.get('doc', '')}).")
            continue
        value = _coerce(hints[name], data[name], source=source, key=key)
        _check_bounds(f, value, source=source, key=key)
        kwargs[name] = value
    obj = cls(**kwargs)
    post = getattr(obj, "validate", None)
    if callable(post):
        post(source)
    for key, value in _floats(kwargs, path):  # no setting (timeouts included) takes .inf or .nan for "unbounded"
        if not math.isfinite(value):
            raise ConfigError(f"{source}: `{key}` is {value!r}; it must be a finite number.")
    return obj


def _floats(values: Mapping[str, Any], path: str) -> Iterator[tuple[str, float]]:
    for name, value in values.items():
        key = f"{path}.{name}" if path else name
        items = enumerate(value) if isinstance(value, tuple) else [(None, value)]
        for i, v in items:
            if isinstance(v, float):
                yield (key if i is None else f"{key}[{i}]"), v


def to_plain(obj: Any) -> Any:
    """The inverse of :func:`build`: plain dicts, lists and scalars, ready for YAML/JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 6, 6, 80, 80
MAX_SHOWN = 200


def _short(value: Any) -> str:
    """``repr(value)``, at most :data:`MAX_SHOWN` characters: a config value in an error message
    is there to be recognised, and a huge one (or an alias bomb) must not flood the terminal."""
    text = _REPR.repr(value)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def _show(value: Any) -> str:
    if isinstance(value, ExponentFloat):  # as written (1e1), not as the float it reads as (10.0)
        return f"{value.text[:MAX_SHOWN]} (a number with an exponent, read as {_short(float(value))})"
    return f"{_short(value)} ({type(value).__name__})"


def _show_key(key: Any) -> str:
    """A mapping key as an error names it: as :func:`_short`, except an exponent literal, shown as
    written (``1e1``, read as 10.0) rather than as the float it reads as."""
    if isinstance(key, ExponentFloat):
        return f"{key.text[:MAX_SHOWN]} (read as {_short(float(key))})"
    return _short(key)


def _coerce(hint: Any, value: Any, *, source: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(inner[0], value, source=source, key=key)
        raise TypeError(f"Unsupported union {hint} for {key}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: `{key}` must be a list, got {_show(value)}.")
        item = args[0]
        return tuple(_coerce(item, v, source=source, key=f"{key}[{i}]") for i, v in enumerate(value))
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return build(hint, value, source=source, path=key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: `{key}` must be true or false, got {_show(value)}.")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: `{key}` must be an integer, got {_show(value)}.")
        return value
    if hint is float:
        if isinstance(value, str) and _is_number_text(value):
            raise ConfigError(f"{source}: `{key}` must be a number, got the quoted text {_short(value)}; remove the quotes so YAML reads it as a number.")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: `{key}` must be a number, got {_show(value)}.")
        try:
            number = float(value)
        except OverflowError:  # an integer with hundreds of digits
            raise ConfigError(f"{source}: `{key}` is an integer of {len(str(abs(value)))} digits, too large for a number; it must be a finite number.") from None
        return number  # .inf / .nan are refused by build() after the class's own validate (which may say more)
    if isinstance(value, ExponentFloat) and hint in (str, Path):
        value = value.text  # YAML 1.1 read it as text: a text field is unchanged by the resolver above
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: `{key}` must be text, got {_show(value)}.")
        return value
    if hint is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: `{key}` must be a path (text), got {_show(value)}.")
        return Path(value)
    raise TypeError(f"Unsupported config type {hint} for {key}.")


def _is_number_text(value: str) -> bool:
    """Whether ``value`` would be read as a finite number if it were not quoted."""
    try:
        return math.isfinite(float(value.strip()))
    except ValueError:
        return False


def _check_bounds(f: dataclasses.Field[Any], value: Any, *, source: str, key: str) -> None:
    meta = f.metadata
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(
            f"{source}: `{key}` is {_short(value)}; allowed values are {', '.join(map(repr, choices))}."
        )
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    for name, op, ok in (
        ("ge", ">=", lambda b: value >= b),
        ("le", "<=", lambda b: value <= b),
        ("gt", ">", lambda b: value > b),
        ("lt", "<", lambda b: value < b),
    ):
        bound = meta.get(name)
        if bound is not None and not ok(bound):
            raise ConfigError(f"{source}: `{key}` is {value!r}; it must be {op} {bound}.")
