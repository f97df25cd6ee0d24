"""Render the recipe reference (every section and field, type, default, documentation) from the schema.

    python -m launcher.recipe.reference      # prints the Markdown that README.md embeds

A test checks README.md holds exactly this text, so the docs cannot drift from the schema.
"""

from __future__ import annotations

import json
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from launcher.recipe.schema import TASK_TYPES, Recipe

BEGIN, END = "<!-- recipe-reference:begin -->", "<!-- recipe-reference:end -->"


def type_name(annotation: Any) -> str:
    """Readable type: `one of a, b`, `int or null`, `list of str`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        named = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of ({type_name(args[0])})"
    if origin is tuple:
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field: Any) -> str:
    if field.default is PydanticUndefined:
        return "**required**"
    value = field.default.model_dump() if isinstance(field.default, BaseModel) else field.default
    return f"`{json.dumps(value)}`" if not isinstance(value, dict) else "(section defaults)"


def section_table(title: str, model: type[BaseModel]) -> list[str]:
    lines = ["", title, "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for name, sub in model.model_fields.items():
        doc = " ".join((sub.description or "").split()).replace("|", "\\|")
        kind = type_name(sub.annotation).replace("|", "\\|")
        lines.append(f"| `{name}` | {kind} | {default_text(sub).replace('|', chr(92) + '|')} | {doc} |")
    return lines


def render() -> str:
    lines = [BEGIN]
    for section, field in Recipe.model_fields.items():
        annotation = field.annotation
        required = " (required section)" if field.default is PydanticUndefined else ""
        if section == "task":  # a tagged union: one table per task type, each with only its own keys
            for tag, model in TASK_TYPES.items():
                lines += section_table(f"#### `task` with `type: {tag}`{required}", model)
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines += section_table(f"#### `{section}`{required}", annotation)
        else:
            lines += ["", f"`{section}` ({type_name(annotation)}, default {default_text(field)}): {field.description}"]
    lines.append(END)
    return "\n".join(lines)


if __name__ == "__main__":
    print(render())
