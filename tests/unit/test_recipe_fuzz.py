"""Every key of every shipped recipe, mutated (wrong type, out of range, unknown key, missing required), is
rejected with its key path by `load_recipe`, before any process group or model exists. Hypothesis picks the
bad values; the key paths are enumerated so that every key is covered on every run."""

from __future__ import annotations

import copy
import math
import string
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from runs import REPO, run_in_process
from launcher import run
from launcher.recipe.loading import RecipeError, load_raw, load_recipe
from launcher.recipe.schema import TASK_TYPES, Recipe, task_type_of

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
FUZZ = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def key_paths(raw: dict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key of the recipe, sections and leaves, as paths."""
    paths = []
    for key, value in raw.items():
        paths.append((*prefix, key))
        if isinstance(value, dict):
            paths += key_paths(value, (*prefix, key))
    return paths


def cases() -> list[tuple[Path, tuple[str, ...]]]:
    return [(recipe, path) for recipe in RECIPES for path in key_paths(load_raw(recipe))]


def model_at(section: tuple[str, ...], raw: dict) -> type[BaseModel]:
    """The schema class of a section; the task section's is the one its `type` names."""
    model: type[BaseModel] = Recipe
    for key in section:
        is_task = model is Recipe and key == "task"
        model = TASK_TYPES[task_type_of(raw["task"])] if is_task else model.model_fields[key].annotation
    return model


def field_at(path: tuple[str, ...], raw: dict):
    return model_at(path[:-1], raw).model_fields[path[-1]]


def unwrap_optional(annotation) -> tuple[Any, bool]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return annotation, False


def not_a_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return True
    return False


WORDS = st.text(string.ascii_letters, min_size=1, max_size=8).filter(not_a_number)
FRACTIONS = st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not float(x).is_integer())
KINDS = {
    "bool": st.booleans(),
    "int": st.integers(),
    "fraction": FRACTIONS,
    "word": WORDS,
    "list": st.lists(st.integers(), max_size=2),
    "mapping": st.dictionaries(WORDS, st.integers(), min_size=1, max_size=2),
    "null": st.none(),
}


def wrong_kinds(annotation) -> list[str]:
    """Kinds of YAML value that are not a valid spelling of `annotation` (pydantic's lax mode legitimately reads
    `"64"` as 64 and `2e-5`, which YAML 1.1 leaves a string, as a float; those are not offered here)."""
    inner, optional = unwrap_optional(annotation)
    origin = typing.get_origin(inner)
    if inner is bool:
        accepted = {"bool"}
    elif inner is int:
        accepted = {"int"}
    elif inner is float:
        accepted = {"int", "fraction"}
    elif inner is str or origin is Literal:
        accepted = {"word"}
    elif origin in (list, tuple):
        accepted = {"list"}
    else:
        accepted = {"mapping"}
    if optional:
        accepted.add("null")
    return sorted(set(KINDS) - accepted)


def out_of_range(field) -> st.SearchStrategy | None:
    """Values of the right type outside the field's bounds or choices; None when the field has neither."""
    inner, _ = unwrap_optional(field.annotation)
    if typing.get_origin(inner) is Literal:
        return WORDS.filter(lambda word: word not in typing.get_args(inner))
    number = st.integers if inner is int else (lambda **bounds: st.floats(allow_nan=False, **bounds))
    for bound in field.metadata:
        if isinstance(bound, annotated_types.Ge):
            return number(max_value=bound.ge - 1 if inner is int else math.nextafter(bound.ge, -math.inf))
        if isinstance(bound, annotated_types.Gt):
            return number(max_value=bound.gt)
        if isinstance(bound, annotated_types.Le):
            return number(min_value=bound.le + 1 if inner is int else math.nextafter(bound.le, math.inf))
        if isinstance(bound, annotated_types.Lt):
            return number(min_value=bound.lt)
    return None


def set_at(raw: dict, path: tuple[str, ...], value: Any) -> dict:
    mutated = copy.deepcopy(raw)
    node = mutated
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return mutated


def assert_rejected(tmp_path: Path, raw: dict, path: tuple[str, ...], expected: str = "") -> None:
    recipe = tmp_path / "mutated.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe)
    where = ".".join(path)
    assert any(p.startswith(where) and expected in p for p in caught.value.problems), (where, caught.value.problems)


@pytest.mark.parametrize("recipe, path", cases(), ids=lambda v: v.name if isinstance(v, Path) else ".".join(v))
def test_every_key_rejects_bad_values(tmp_path, recipe, path):
    raw = load_raw(recipe)
    field = field_at(path, raw)

    @FUZZ
    @given(value=st.sampled_from(wrong_kinds(field.annotation)).flatmap(KINDS.get))
    def wrong_type(value):
        assert_rejected(tmp_path, set_at(raw, path, value), path)

    wrong_type()
    bad_range = out_of_range(field)
    if bad_range is not None:
        @FUZZ
        @given(value=bad_range)
        def outside(value):
            assert_rejected(tmp_path, set_at(raw, path, value), path)

        outside()
    section = path[:-1]

    @FUZZ
    @given(name=WORDS)
    def unknown_key(name):
        known = set(model_at(section, raw).model_fields) | (set() if section else {"base"})  # the loader reads `base:`
        if name not in known:
            assert_rejected(tmp_path, set_at(raw, (*section, name), 1), (*section, name), "unknown key")

    unknown_key()
    if field.is_required():
        missing = copy.deepcopy(raw)
        node = missing
        for key in section:
            node = node[key]
        del node[path[-1]]
        assert_rejected(tmp_path, missing, path, "required key is missing")


def test_bad_recipe_fails_before_process_group_or_model(tmp_path, monkeypatch, capsys):
    def must_not_run(*args, **kwargs):
        raise AssertionError("reached a process group or model load with an invalid recipe")

    monkeypatch.setattr(run, "build_accelerator", must_not_run)
    monkeypatch.setattr(run, "load_model", must_not_run)
    raw = set_at(load_raw(RECIPES[0]), ("training", "epochs"), "three")
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert run_in_process(recipe) == 1
    assert "training.epochs" in capsys.readouterr().err
