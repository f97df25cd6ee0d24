"""What a user sees while the model loads and exports: the new head is one line of the run plan, not transformers'
LOAD REPORT; DeepSpeed's CPU fallback warning is gone; weights that point at a real problem are still named."""

import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification

from recipes import tiny_recipe, write_recipe
from runs import run_cli
from launcher.model.loading import load_model, load_tokenizer
from launcher.recipe.loading import load_recipe
from launcher.tasks import prepare_task

NEW_HEAD_NOTE = "new head: classifier.weight, classifier.bias initialised randomly (expected: it is what fine-tuning trains)"
MISSING_FROM_BACKBONE = "encoder.layer.0.attention.self.query.weight"


@pytest.fixture
def transformers_log():
    """The records transformers' loggers hand to their handlers (what its own stderr handler would print)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def load_through_launcher(tmp_path: Path, assets, checkpoint: Path) -> list[str]:
    """`load_model` as a run calls it; returns its plan notes."""
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", tiny_recipe({**assets, "checkpoint": checkpoint},
                                                                            tmp_path / "out", model="checkpoint")))
    tokenizer = load_tokenizer(recipe.model)
    task = prepare_task(recipe, tokenizer).task  # with the labels the head is sized for
    return load_model(recipe, task, tokenizer)[1]


def edited_checkpoint(source: Path, folder: Path, edit) -> Path:
    shutil.copytree(source, folder)
    weights = load_file(str(folder / "model.safetensors"))
    edit(weights)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_a_run_shows_the_new_head_in_the_plan_and_no_library_noise(tmp_path, assets):
    recipe = write_recipe(tmp_path / "run.yaml", tiny_recipe(assets, tmp_path / "out", training={"epochs": 1}))
    result = run_cli(str(recipe))
    assert result.returncode == 0, result.stderr
    shown = result.stdout + result.stderr
    assert "LOAD REPORT" not in shown and "MISSING" not in shown
    assert "Setting accelerator to CPU" not in shown
    assert f"note : {NEW_HEAD_NOTE}\n" in result.stdout
    assert "warning:" not in result.stderr


def test_a_weight_missing_from_the_backbone_is_still_warned_about(tmp_path, assets, capsys, transformers_log):
    def damage(weights):
        del weights[MISSING_FROM_BACKBONE]
        weights["encoder.stray.weight"] = torch.zeros(2)  # a backbone key this architecture has no place for
        weights["cls.predictions.bias"] = torch.zeros(2)  # a pretraining head: expected to go unused

    notes = load_through_launcher(tmp_path, assets, edited_checkpoint(assets["bert"], tmp_path / "damaged", damage))
    errors = capsys.readouterr().err
    assert f"backbone weight(s) missing from the checkpoint, initialised randomly: bert.{MISSING_FROM_BACKBONE}\n" in errors
    assert "has no place for, left unused: encoder.stray.weight\n" in errors
    assert "cls.predictions" not in errors
    assert notes == [f"{NEW_HEAD_NOTE}; the checkpoint's own head (cls.*) is left out"]
    assert not [r for r in transformers_log if "LOAD REPORT" in r.getMessage()]


def test_a_shape_mismatch_still_shows_the_load_report(tmp_path, assets, transformers_log):
    folder = tmp_path / "three_labels"
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig.from_pretrained(assets["bert"], num_labels=3)).save_pretrained(folder)
    shutil.copy(assets["bert"] / "tokenizer.json", folder)
    shutil.copy(assets["bert"] / "tokenizer_config.json", folder)
    with pytest.raises(RuntimeError, match="look at the above report"):
        load_through_launcher(tmp_path, assets, folder)  # the recipe asks for 2 labels
    reports = [r.getMessage() for r in transformers_log if "LOAD REPORT" in r.getMessage()]
    assert len(reports) == 1 and "classifier.weight" in reports[0] and "MISMATCH" in reports[0]
