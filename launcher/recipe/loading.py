"""Turn a recipe file, its `base:` chain and `a.b=value` overrides into a validated `Recipe`.

All problems are gathered and raised together as one `RecipeError`, each with its key path and,
for unknown keys, the nearest valid names. Nothing here touches a model, data or process group.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ValidationError

from launcher.recipe.schema import TASK_TYPES, Recipe


class RecipeError(ValueError):
    """A recipe that cannot be run; `problems` lists every reason, one line each."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"recipe {source} has {len(problems)} problem(s):\n{lines}")


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Read `path` (following `base:`), apply `overrides` (`a.b=value`), validate, return the Recipe."""
    return build_recipe(load_raw(path), overrides, str(path))


def build_recipe(raw: dict[str, Any], overrides: Iterable[str], source: str) -> Recipe:
    """`raw` with `overrides` applied, validated; every problem is gathered into one RecipeError naming `source`."""
    problems: list[str] = []
    for override in overrides:
        try:
            apply_override(raw, override)
        except ValueError as err:
            problems.append(str(err))
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        problems.extend(describe_validation_errors(err))
    if problems:
        raise RecipeError(source, problems)
    return recipe


def load_raw(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The recipe as a plain dict with its `base:` recipes deep-merged underneath (base path relative to the file)."""
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, path))
        raise RecipeError(str(path), [f"`base:` chain loops: {cycle}"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise RecipeError(str(path), [f"cannot read the file: {err.strerror}"]) from err
    except yaml.YAMLError as err:
        raise RecipeError(str(path), [f"not valid YAML: {err}"]) from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(str(path), [f"the top level must be a mapping of sections, got {type(data).__name__}"])
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise RecipeError(str(path), ["`base` must be a path to another recipe file"])
    return deep_merge(load_raw(path.parent / base, (*_chain, path)), data)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` on top of `base`: mappings merge key by key, anything else (lists included) replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in `raw`; the value is parsed as YAML (`2e-5`, `true`, `null`, `[accuracy, f1]`)."""
    key_path, sep, text = override.partition("=")
    keys = key_path.strip().split(".")
    if not sep or not all(keys):
        raise ValueError(f"override {override!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"override {override!r}: value is not valid YAML ({err})") from err
    node = raw
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {override!r}: {'.'.join(keys[: depth + 1])} is a value, not a section")
        node = child
    node[keys[-1]] = value


def describe_validation_errors(err: ValidationError) -> list[str]:
    """One readable line per pydantic error: `key.path: message`, with a did-you-mean for unknown keys."""
    lines = []
    for error in err.errors():
        tagged = tuple(str(part) for part in error["loc"])
        loc = without_union_tags(tagged)
        task_type = tagged[1] if loc != tagged else "sequence_classification"
        where = ".".join(loc) or "(top level)"
        if error["type"] in ("union_tag_invalid", "union_tag_not_found"):  # only the task section is a tagged union
            given = error["input"].get("type") if isinstance(error["input"], dict) else None
            problem = "required key is missing" if given is None else f"{given!r} is not a task type"
            lines.append(f"task.type: {problem}; one of {', '.join(TASK_TYPES)}")
        elif error["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key{did_you_mean(loc, task_type)}")
        elif error["type"] == "missing":
            lines.append(f"{where}: required key is missing")
        else:
            message = error["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {message} (got {error['input']!r})" if loc else message)
    return lines


def without_union_tags(loc: tuple[str, ...]) -> tuple[str, ...]:
    """pydantic puts the chosen member of a tagged union into the error path (`task.causal_lm.format`); a user
    wrote `task.format`."""
    if len(loc) >= 2 and loc[0] == "task" and loc[1] in TASK_TYPES:
        return (loc[0], *loc[2:])
    return loc


def did_you_mean(loc: tuple[str, ...], task_type: str = "sequence_classification") -> str:
    """`; did you mean 'x'?` for the unknown last key of `loc`, or the list of valid keys there."""
    fields = fields_at(loc[:-1], task_type)
    if not fields:
        return ""
    close = difflib.get_close_matches(loc[-1], fields, n=2, cutoff=0.6)
    if close:
        return "; did you mean " + " or ".join(repr(name) for name in close) + "?"
    return f"; valid keys here: {', '.join(sorted(fields))}"


def fields_at(loc: tuple[str, ...], task_type: str = "sequence_classification") -> list[str]:
    """Names of the schema fields of the section at `loc` (empty when `loc` is not a section); the task section's
    are those of `task_type`."""
    model: type[BaseModel] = Recipe
    for key in loc:
        field = model.model_fields.get(key)
        annotation = TASK_TYPES[task_type] if model is Recipe and key == "task" else getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
