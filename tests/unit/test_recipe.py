"""Recipe schema and loading: unknown keys with did-you-mean, wrong types, ranges, cross-field rules,
`base:` inheritance, `a.b=value` overrides, and every shipped recipe."""

from pathlib import Path

import pytest
import yaml

from launcher.recipe.loading import RecipeError, apply_override, deep_merge, load_recipe
from launcher.recipe.schema import Recipe
from runs import REPO

SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))

MINIMAL = {
    "model": {"name_or_path": "bert-base-cased"},
    "data": {"dataset": "yelp_review_full"},
    "task": {"num_labels": 5},
    "output": {"dir": "out"},
}


def write(tmp_path: Path, data: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def problems_of(path: Path, *overrides: str) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, overrides)
    return caught.value.problems


def test_minimal_recipe_gets_documented_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert recipe.training.per_device_batch_size == 8
    assert recipe.data.padding == "dynamic"
    assert recipe.eval_batch_size == 16
    assert not recipe.lora.enabled


def test_every_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            yield model.__name__, name, field
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                yield from walk(annotation)

    undocumented = [f"{owner}.{name}" for owner, name, field in walk(Recipe) if not field.description]
    sections = {"model", "data", "task", "training", "evaluation", "lora", "output"}
    assert [u for u in undocumented if u.split(".")[1] not in sections] == []


def test_unknown_keys_at_any_depth_are_named_with_did_you_mean(tmp_path):
    data = {**MINIMAL, "trainng": {}, "model": {**MINIMAL["model"], "name_or_pth": "x"}}
    problems = problems_of(write(tmp_path, data))
    assert any(p.startswith("trainng: unknown key; did you mean 'training'") for p in problems)
    assert any(p.startswith("model.name_or_pth: unknown key; did you mean 'name_or_path'") for p in problems)


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    problems = problems_of(write(tmp_path, {**MINIMAL, "task": {"num_labels": 5, "zzz": 1}}))
    assert problems == ["task.zzz: unknown key; valid keys here: num_labels, problem_type, threshold, type"]


def test_all_problems_reported_together(tmp_path):
    data = {**MINIMAL, "training": {"epochs": "three", "lr": -1.0, "per_device_batch_size": 0, "schedular": "linear"}}
    problems = problems_of(write(tmp_path, data))
    joined = "\n".join(problems)
    assert len(problems) == 4
    for key in ("training.epochs", "training.lr", "training.per_device_batch_size", "training.schedular"):
        assert key in joined
    assert "did you mean 'scheduler'" in joined


def test_missing_required_key_and_wrong_literal(tmp_path):
    data = {k: v for k, v in MINIMAL.items() if k != "task"}
    data["data"] = {"dataset": "x", "padding": "longest"}
    problems = problems_of(write(tmp_path, data))
    assert "task: required key is missing" in problems
    assert any(p.startswith("data.padding:") and "'dynamic'" in p for p in problems)


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"data": {"dataset": "x", "train_file": "t.csv"}}, "exactly one of `dataset`"),
        ({"data": {}}, "exactly one of `dataset`"),
        ({"data": {"dataset": "x", "eval_fraction": 0.1}}, "eval_fraction"),
        ({"evaluation": {"metrics": ["f1"]}}, "binary metrics"),
        ({"data": {"dataset": "x", "label_names": ["a", "b"]}}, "label_names has 2 names"),
    ],
)
def test_cross_field_rules(tmp_path, change, fragment):
    problems = problems_of(write(tmp_path, {**MINIMAL, **change}))
    assert any(fragment in p for p in problems), problems


def test_eval_fraction_with_eval_split_disabled_is_valid(tmp_path):
    recipe = load_recipe(write(tmp_path, {**MINIMAL, "data": {"dataset": "x", "eval_split": None, "eval_fraction": 0.2}}))
    assert recipe.data.eval_fraction == 0.2


def test_overrides_are_typed_by_the_schema(tmp_path):
    path = write(tmp_path, MINIMAL)
    recipe = load_recipe(path, ["training.epochs=5", "training.lr=2e-5", "lora.enabled=true", "evaluation.metrics=[accuracy, f1_macro]"])
    assert recipe.training.epochs == 5
    assert recipe.training.lr == pytest.approx(2e-5)
    assert recipe.lora.enabled is True
    assert recipe.evaluation.metrics == ["accuracy", "f1_macro"]


def test_bad_overrides_are_reported_with_the_schema_errors(tmp_path):
    problems = problems_of(write(tmp_path, MINIMAL), "training.epochs=many", "training.lrr=1e-4", "nonsense")
    joined = "\n".join(problems)
    assert "training.epochs" in joined
    assert "training.lrr: unknown key; did you mean 'lr'?" in joined
    assert "'nonsense' is not of the form section.key=value" in joined


def test_override_into_a_value_is_rejected():
    raw = {"training": {"lr": 1e-3}}
    with pytest.raises(ValueError, match="training.lr is a value"):
        apply_override(raw, "training.lr.x=1")


def test_base_inheritance_deep_merges_and_resolves_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path, {**MINIMAL, "training": {"epochs": 2, "lr": 1e-4}}, "base.yaml")
    child = write(tmp_path / "sub", {"base": "../base.yaml", "training": {"lr": 3e-4}, "lora": {"enabled": True}}, "child.yaml")
    recipe = load_recipe(child)
    assert recipe.training.epochs == 2 and recipe.training.lr == pytest.approx(3e-4)
    assert recipe.lora.enabled and recipe.model.name_or_path == "bert-base-cased"


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path, {"base": "b.yaml"}, "a.yaml")
    write(tmp_path, {"base": "a.yaml"}, "b.yaml")
    with pytest.raises(RecipeError, match="loops"):
        load_recipe(tmp_path / "a.yaml")


def test_deep_merge_replaces_lists_and_leaves_inputs_alone():
    base = {"a": {"b": 1, "c": [1, 2]}}
    merged = deep_merge(base, {"a": {"c": [3]}})
    assert merged == {"a": {"b": 1, "c": [3]}}
    assert base == {"a": {"b": 1, "c": [1, 2]}}


def test_unreadable_and_non_mapping_files(tmp_path):
    with pytest.raises(RecipeError, match="cannot read"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_recipe_validates_and_starts_with_its_command(path):
    recipe = load_recipe(path)
    assert recipe.description
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# ") and "launcher/run.py" in first_line and path.name in first_line


def test_shipped_recipes_keep_the_real_hub_names():
    names = {p.name: load_recipe(p) for p in SHIPPED}
    assert names["yelp_bert.yaml"].model.name_or_path == "bert-base-cased"
    assert names["yelp_bert.yaml"].data.dataset == "yelp_review_full"
    assert names["mrpc_bert.yaml"].data.text_pair_field == "sentence2"
    assert names["llama3_yelp.yaml"].model.name_or_path == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert names["llama3_yelp_lora.yaml"].lora.enabled and names["llama3_yelp_lora.yaml"].training.precision == "bf16"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_recipe_reloads_from_its_resolved_yaml(path, tmp_path):
    """A run writes every field out (recipe.resolved.yaml); launcher.predict and tests read it back. Fields of
    another format or problem type are written at their defaults, which must not count as set."""
    from launcher.train.run_directory import recipe_yaml

    recipe = load_recipe(path)
    (tmp_path / "resolved.yaml").write_text(recipe_yaml(recipe))
    assert load_recipe(tmp_path / "resolved.yaml") == recipe
