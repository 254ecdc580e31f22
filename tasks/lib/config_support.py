"""What the params schema (tasks.lib.config) needs besides its fields: safe YAML reading, `-S` override
parsing, value checks that need another library (cron, time zone), error wording and the `--schema` table.
Torch-free: the registry and predict read params on boxes without it.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from tasks.lib.errors import ParamsError

MAX_YAML_VALUES = 10_000  # params.yaml holds about 120 values; see count_values


# --------------------------------------------------------------------------- reading YAML safely


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading `3e-4` as a number, as YAML 1.2 and DVC (ruamel) do; PyYAML (YAML 1.1)
    reads a float without a dot or with an unsigned exponent as text."""


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))


def load_yaml(stream: Any, where: str, prefix: str = "") -> Any:
    """One YAML document with ParamsLoader (None when it is empty); a key set twice raises ParamsError
    naming it dotted (prefix: the dotted key the document is the value of, as in an override)."""
    loader = ParamsLoader(stream)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, where, prefix)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _refuse_duplicate_keys(root: yaml.Node, where: str, prefix: str) -> None:
    """Walk the composed document (each node once: an alias is one more reference to a node, so a
    "billion laughs" document stays linear here) and name the first key set twice, dotted, with its lines."""
    done: set[int] = set()
    stack: list[tuple[yaml.Node, str]] = [(root, prefix)]
    while stack:
        node, prefix = stack.pop()
        if id(node) in done:
            continue
        done.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack += [(item, f"{prefix.removesuffix('.')}[{i}].") for i, item in enumerate(node.value)]
        if not isinstance(node, yaml.MappingNode):
            continue
        lines: dict[str, int] = {}
        for key, value in node.value:
            if key.tag == "tag:yaml.org,2002:merge":   # `<<: *defaults`: keys set here override it, as meant
                stack.append((value, prefix))
                continue
            name = key.value if isinstance(key, yaml.ScalarNode) else "(a non-text key)"
            line = key.start_mark.line + 1
            if name in lines:
                raise ParamsError(f"{where}, line {line}: {prefix}{name} is set twice (first on line {lines[name]}); "
                                  "YAML would silently keep only the last one: remove one of them")
            lines[name] = line
            stack.append((value, f"{prefix}{name}."))


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a params file; errors name the file and line, and oversized alias expansions,
    duplicate keys and an empty file are refused."""
    if not path.exists():
        raise ParamsError(f"{path}: not found; run from the project root or pass the path to params.yaml")
    try:
        with open(path, encoding="utf-8") as handle:
            raw = load_yaml(handle, str(path))
    except yaml.YAMLError as err:
        raise ParamsError(f"{_where(str(path), err)}: not valid YAML: {_yaml_problem(err)}") from None
    except (UnicodeDecodeError, RecursionError) as err:
        raise ParamsError(f"{path}: not readable as YAML ({type(err).__name__}: nested too deeply or not "
                          "UTF-8 text)") from None
    except IsADirectoryError:
        raise ParamsError(f"{path}: is a folder, not the params file") from None
    if raw is None:
        # A truncated or wrongly written file would otherwise train with every default, silently.
        raise ParamsError(f"{path}: has no settings (it is empty or only comments); restore it (git checkout "
                          f"{path.name}), or write {{}} in it to take every default on purpose")
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    count_values(raw, str(path))
    return raw


def yaml_error_text(name: str, err: yaml.YAMLError) -> str:
    """One line for a YAML error: the file, line and column, and what the parser found there."""
    return f"{_where(name, err)}: {_yaml_problem(err)}"


def _where(name: str, err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    return f"{name}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else name


def _yaml_problem(err: yaml.YAMLError) -> str:
    context, problem = getattr(err, "context", None), getattr(err, "problem", None)
    started = getattr(err, "context_mark", None)
    if context and started is not None:
        context += f" started at line {started.line + 1}"
    return "; ".join(p for p in (context, problem) if p) or str(err).splitlines()[0]


def count_values(obj: Any, where: str, limit: int = MAX_YAML_VALUES) -> int:
    """How many values `obj` holds once YAML aliases are expanded; raise ParamsError past `limit`.

    A "billion laughs" document loads in microseconds (an alias is one more reference to an object) and explodes
    only when something walks it, as the schema would; counting with a memo per object stays linear."""
    sizes: dict[int, int] = {}

    def size(node: Any, depth: int) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) in sizes:
            return sizes[id(node)]
        if depth > 50:
            raise ParamsError(f"{where}: nested more than 50 levels deep; params are a few levels of sections")
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        total = 1
        for child in children:
            total += size(child, depth + 1)
            if total > limit:
                raise ParamsError(f"{where}: expands to more than {limit} values (YAML aliases repeated "
                                  "inside each other?); params.yaml needs about a hundred")
        sizes[id(node)] = total
        return total

    return size(obj, 0)


def parse_override(text: str) -> tuple[str, Any]:
    """'train.head.epochs=3' -> ('train.head.epochs', 3); the value is read as plain YAML (no tags)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ParamsError(f"override -S {text!r} is not key=value (e.g. -S train.head.epochs=3)")
    if not value.strip():
        return key, ""
    try:
        if any(isinstance(token, yaml.TagToken) for token in yaml.scan(value)):
            raise ParamsError(f"override -S {text}: YAML tags (!!type, !name) are not allowed in a value; "
                              f"write the plain value, quoted if it is a string (-S {key}='...')")
        parsed = load_yaml(value, f"override -S {key}", f"{key}.")
    except yaml.YAMLError as err:
        raise ParamsError(f"override -S {text}: the value of {key} is not valid YAML ({_yaml_problem(err)}); "
                          f"quote a string value: -S {key}='...'") from None
    except RecursionError:   # thousands of nested brackets: no params value nests like that
        raise ParamsError(f"override -S {key}: the value nests too deeply to be a params value; "
                          f"quote a string value: -S {key}='...'") from None
    count_values(parsed, f"override -S {key}")
    return key, parsed


def parse_overrides(overrides: dict[str, Any] | list[str] | None) -> dict[str, Any]:
    """Overrides as {dotted key: value}, from a dict or `key=value` strings (values parsed as YAML)."""
    if isinstance(overrides, dict):
        return dict(overrides)
    return dict(parse_override(item) for item in overrides or [])


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set raw[a][b][c] = value for dotted "a.b.c", creating sections on the way."""
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ParamsError(f"override -S {dotted}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


# --------------------------------------------------------------------------- checks that need another library


def check_cron(cron: str) -> str:
    """A five-field cron expression (six with seconds), as Prefect schedules it; raises ValueError."""
    import datetime as dt

    from cronsim import CronSim, CronSimError  # a small pure-Python parser Prefect's scheduler depends on

    if any(field.upper() in ("H", "R") for field in cron.split()):
        raise ValueError(f"cron {cron!r}: random (R) and hashed (H) fields are not supported by Prefect")
    try:
        CronSim(cron, dt.datetime(2026, 1, 1))
    except (CronSimError, ValueError) as err:
        raise ValueError(f"not a cron expression ({err}); e.g. '0 3 * * 1' is Mondays at 03:00") from None
    return cron


def check_timezone(name: str) -> str:
    """An IANA time zone name; raises ValueError."""
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}; use an IANA name such as UTC or Europe/Paris") from None
    return name


def numeric(annotation: Any) -> bool:
    """Whether a field holds numbers (int, float, optional or in a list) and so must not accept a boolean."""
    if annotation in (int, float):
        return True
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return numeric(args[0])
    if origin in (list, typing.Union, types.UnionType):
        return any(numeric(arg) for arg in args)
    return False


def number_problem(value: Any) -> str | None:
    """Why a value given for a number (or a list of numbers) is not one, where pydantic would convert it:
    YAML's `true` is not the count 1, and a quoted "3" (what `dvc exp run -S 'key="3"'` writes) is text."""
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, bool):
            return "expected a number, got a boolean (true/false)"
        if isinstance(item, str) and _reads_as_number(item):
            return f"expected a number, got the string {item!r}; remove the quotes"
    return None


def _reads_as_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- messages


def describe(path: Path, err: ValidationError, overrides: dict[str, Any], root: type[BaseModel]) -> str:
    """One line per problem, naming the dotted key and where the bad value came from (the file or an override)."""
    lines = []
    for problem in err.errors():
        loc = tuple(str(p) for p in problem["loc"])
        key = ".".join(loc) or "(top level)"
        if problem["type"] == "extra_forbidden":
            allowed = allowed_keys(root, loc[:-1])
            text = f"{key}: unknown key; allowed here: {', '.join(allowed)}"
        else:
            value = problem.get("input")
            shown = "" if isinstance(value, dict) else f" = {value!r}"
            text = f"{key}{shown}: {problem['msg'].removeprefix('Value error, ')}"
        lines.append(f"  {text}{_origin(key, overrides, path)}")
    return "\n".join([f"{err.error_count()} invalid setting(s):", *lines])


def _origin(key: str, overrides: dict[str, Any], path: Path) -> str:
    """Where a bad value came from: the override that set it (or a value inside it), else the file."""
    for name, value in overrides.items():
        if key == name or key.startswith(f"{name}."):
            return f" (from override -S {name}={_plain(value)})"
    inside = [f"-S {name}={_plain(value)}" for name, value in overrides.items() if name.startswith(f"{key}.")]
    if inside:
        return f" ({path} with override {', '.join(inside)})"
    return f" (in {path})"


def _plain(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip() \
        if not isinstance(value, str) else value


def allowed_keys(root: type[BaseModel], loc: tuple[str, ...]) -> list[str]:
    model = root
    for part in loc:
        field = model.model_fields.get(part)
        if field is None or not _is_section(field.annotation):
            return []
        model = field.annotation
    return list(model.model_fields)


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


# --------------------------------------------------------------------------- the --schema table


def schema_rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type and allowed values, default, description) of every option, sections expanded."""
    rows = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        if _is_section(field.annotation):
            rows += schema_rows(field.annotation, f"{dotted}.")
        else:
            rows.append((dotted, _type_text(field), _default_text(field), field.description or ""))
    return rows


def _type_text(field: FieldInfo) -> str:
    annotation = field.annotation
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(str(v) for v in typing.get_args(annotation))
    text = _annotation_name(annotation)
    bounds = [f"{symbol} {getattr(meta, attr)}" for meta in field.metadata
              for attr, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "len >="))
              if getattr(meta, attr, None) is not None]
    return ", ".join([text, *bounds])


def _annotation_name(annotation: Any) -> str:
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _annotation_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _annotation_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_annotation_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _default_text(field: FieldInfo) -> str:
    default = field.get_default(call_default_factory=True)    # every option has one
    return "null" if default is None else str(default) if isinstance(default, Path) else _plain(default)


def format_schema_table(rows: list[tuple[str, str, str, str]]) -> str:
    """Key, type and default in aligned columns, the description after them."""
    header = ("key", "type / allowed values", "default", "description")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)), row[3]]).rstrip()
                     for row in [header, *rows])
