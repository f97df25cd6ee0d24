"""The recipe schema: one typed, documented description of a fine-tuning job.

Every field carries its documentation as an attribute docstring (pydantic turns it into the field
description, which `launcher.recipe.reference` renders into the README). Unknown keys and wrong
types are rejected at every depth; cross-field rules live here, once, not in the trainer.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union, get_args

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator

Precision = Literal["fp32", "bf16", "fp16"]
ProblemType = Literal["single_label", "multi_label", "regression"]
MetricName = Literal[
    "accuracy", "f1", "f1_macro", "precision", "recall", "precision_macro", "recall_macro",
    "exact_match", "f1_micro", "precision_micro", "recall_micro",
    "pearson", "spearman", "mse", "mae",
]
BINARY_ONLY_METRICS = ("f1", "precision", "recall")
METRICS_OF_PROBLEM: dict[str, tuple[str, ...]] = {
    "single_label": ("accuracy", "f1", "f1_macro", "precision", "recall", "precision_macro", "recall_macro"),
    "multi_label": ("exact_match", "f1_micro", "f1_macro", "precision_micro", "recall_micro", "precision_macro",
                    "recall_macro"),
    "regression": ("pearson", "spearman", "mse", "mae"),
}
DEFAULT_METRICS: dict[str, list[str]] = {
    "single_label": ["accuracy"],
    "multi_label": ["f1_micro", "f1_macro", "exact_match"],
    "regression": ["pearson", "spearman", "mse"],  # GLUE STS-B's
}


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, docstrings are field docs."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_only_where_booleans_belong(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic's lax mode reads `true` as the number 1 and `yes` / 1 as true: in a recipe both are mistakes."""
        annotation = cls.model_fields[info.field_name].annotation
        wants_bool = annotation is bool or bool in get_args(annotation)  # `bool` or `Optional[bool]`
        if wants_bool and not isinstance(value, bool) and not (value is None and annotation is not bool):
            raise ValueError("must be true or false")
        if isinstance(value, bool) and not wants_bool:
            raise ValueError("true/false is not a valid value here")
        return value


class ModelSection(Section):
    name_or_path: str
    """Hugging Face hub id (e.g. `bert-base-cased`) or a local folder holding config + weights + tokenizer."""
    load_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype the weights are loaded and kept in. float32 keeps fp32 master weights under mixed precision (safest);
    bfloat16 halves weight memory, the usual choice for 8B-class LLMs, above all with LoRA."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: about 30% slower, far less activation memory."""
    attn_implementation: Optional[Literal["eager", "sdpa", "flash_attention_2"]] = None
    """Attention kernel passed to `from_pretrained`; null lets transformers choose (sdpa where supported)."""
    trust_remote_code: bool = False
    """Allow model code from the hub repository. Off unless you trust that repository."""


class DataSection(Section):
    dataset: Optional[str] = None
    """Hub dataset name (e.g. `yelp_review_full`, `glue`) or a local dataset folder. Exclusive with `train_file`."""
    dataset_config: Optional[str] = None
    """Hub dataset configuration, e.g. `mrpc` for `glue`."""
    train_file: Optional[str] = None
    """Local training file: .csv, .json, .jsonl or .parquet. Relative paths are taken from the working directory."""
    eval_file: Optional[str] = None
    """Local evaluation file, same formats as `train_file`."""
    train_split: str = "train"
    """Split of `dataset` used for training."""
    eval_split: Optional[str] = "test"
    """Split of `dataset` used for evaluation; null to carve one from train with `eval_fraction` or to skip evaluation."""
    eval_fraction: Optional[float] = Field(default=None, gt=0.0, lt=1.0)
    """Carve this fraction of the training data out as the evaluation set (seeded by `subset_seed`)."""
    text_field: str = "text"
    """Column holding the text (the first sentence for pair tasks)."""
    text_pair_field: Optional[str] = None
    """Column holding the second sentence of a pair task (e.g. `sentence2` for MRPC); null for single-text tasks."""
    label_field: str = "label"
    """Column holding the label: integer ids or strings (strings are mapped to ids, names kept as `id2label`);
    multi_label: a list of names or ids per row (json / jsonl / parquet / hub); regression: a number."""
    label_columns: Optional[list[str]] = Field(default=None, min_length=2)
    """multi_label: one 0/1 column per class instead of `label_field` (e.g. a CSV with `toxic,insult,threat`
    columns); the column names are the class names."""
    label_names: Optional[list[str]] = None
    """Fix the order of string labels (id = position). Default: sorted unique strings, or the dataset's ClassLabel names."""
    train_samples: Optional[int] = Field(default=None, ge=1)
    """Use a seeded subset of this many training examples: `shuffle(seed=subset_seed).select(range(n))`, as the tutorials do."""
    eval_samples: Optional[int] = Field(default=None, ge=1)
    """Seeded subset of the evaluation set, as `train_samples`."""
    subset_seed: int = Field(default=42, ge=0, lt=2**32)
    """Seed of the subset selection and of `eval_fraction`."""
    max_length: int = Field(default=512, ge=8)
    """Truncate tokenized inputs to this many tokens."""
    padding: Literal["dynamic", "max_length", "packed"] = "dynamic"
    """`dynamic` pads each batch to its longest member (to a multiple of 8 under bf16/fp16);
    `max_length` pads everything to `max_length` (the tutorials' way; static shapes for compilers);
    `packed` (decoder models) joins each training batch's examples into one row with no padding at all, each
    example attending only to itself and classified at its own last token (evaluation batches stay `dynamic`)."""
    group_by_length: bool = False
    """Batch examples of similar length together, which cuts padding further: shuffle, sort within megabatches of
    up to 50 batches, then shuffle the batches (no longest-to-shortest order within an epoch)."""
    num_workers: int = Field(default=0, ge=0)
    """DataLoader worker processes. 0 loads in the training process (best on small CPU machines)."""
    num_proc: Optional[int] = Field(default=None, ge=1)
    """Processes that tokenize (datasets' `map`). Default: the CPU cores this process may use, but no more than
    one per 10,000 rows, so small sets tokenize in-process."""
    cache_dir: Optional[str] = None
    """Where prepared (tokenized) splits are kept, one folder per cache key (`python -m launcher.prepare` prints
    it). A folder every node sees (a shared file system) prepares once per job; a node-local one once per node.
    Default: `launcher-prepared` in the datasets cache (`HF_DATASETS_CACHE`, usually ~/.cache/huggingface/datasets)."""

    @model_validator(mode="after")
    def _one_source(self) -> "DataSection":
        if (self.dataset is None) == (self.train_file is None):
            raise ValueError("set exactly one of `dataset` (hub name or folder) and `train_file` (local file)")
        if self.eval_fraction is not None and (self.eval_file is not None or (self.dataset and self.eval_split)):
            raise ValueError("`eval_fraction` carves eval from train: set `eval_split: null` and no `eval_file`")
        if self.label_columns is not None:
            if len(set(self.label_columns)) != len(self.label_columns):
                raise ValueError("label_columns: each column once")
            if self.label_names is not None or self.label_field != DataSection.model_fields["label_field"].default:
                raise ValueError("label_columns name the classes themselves: leave out label_field and label_names")
        return self

    @property
    def is_pair_task(self) -> bool:
        return self.text_pair_field is not None


class ClassificationTask(Section):
    type: Literal["sequence_classification"] = "sequence_classification"
    """What the model learns: `sequence_classification` (a classification head: BERT's `classifier`, a decoder's
    `score` on the last token; the default), `causal_lm` (generative fine-tuning of the LM head, SFT), `reward`
    (a reward model on preference pairs) or `dpo` (preference tuning of the LM head)."""
    problem_type: ProblemType = "single_label"
    """`single_label`: one class per example (softmax, cross-entropy). `multi_label`: any number of classes per
    example (a sigmoid per class, binary cross-entropy; labels as a list per row or `data.label_columns`).
    `regression`: one number per example (a single output, mean squared error; e.g. GLUE STS-B's 0-5 similarity)."""
    num_labels: Optional[int] = Field(default=None, ge=1)
    """Number of classes (5 for yelp_review_full, 2 for MRPC, 28 for go_emotions); leave out for regression."""
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    """multi_label: a class is predicted when its sigmoid probability is at least this."""

    @model_validator(mode="after")
    def _fields_of_the_problem_type(self) -> "ClassificationTask":
        if self.problem_type == "regression" and self.num_labels not in (None, 1):
            raise ValueError("problem_type regression predicts one number: leave num_labels out")
        if self.problem_type != "regression" and (self.num_labels is None or self.num_labels < 2):
            raise ValueError(f"problem_type {self.problem_type} needs num_labels (the number of classes, at least 2)")
        if self.threshold != ClassificationTask.model_fields["threshold"].default and self.problem_type != "multi_label":
            raise ValueError("threshold applies to problem_type multi_label only")
        return self

    @property
    def label_count(self) -> Optional[int]:
        return None if self.problem_type == "regression" else self.num_labels

    @property
    def head_outputs(self) -> int:
        """Outputs of the head: one per class, one for regression."""
        return self.num_labels or 1


CAUSAL_LM_FORMAT_FIELDS = {
    "chat": ("messages_field", "chat_template"),
    "prompt_completion": ("prompt_field", "completion_field", "use_chat_template", "system_prompt", "chat_template"),
    "labelled": ("prompt_template", "label_words", "use_chat_template", "system_prompt", "chat_template", "shorten"),
}


class CausalLMTask(Section):
    type: Literal["causal_lm"]
    """`causal_lm`: supervised fine-tuning of the model's own LM head (`AutoModelForCausalLM`); the loss is the
    mean over the trained tokens of each optimizer step, across micro-batches and processes."""
    format: Literal["chat", "prompt_completion", "labelled"]
    """How rows become training text. `chat`: a column of messages (`[{role, content}, ...]`) rendered with the chat
    template, loss on the assistant turns only. `prompt_completion`: two text columns, loss on the completion only.
    `labelled`: a classification dataset as instructions: `prompt_template` filled with the row's text, the label's
    word(s) as the answer, loss on the answer; evaluated by scoring every label's words (restricted choice)."""
    messages_field: str = "messages"
    """chat: column holding each conversation as a list of `{role, content}` (roles system, user, assistant)."""
    prompt_field: str = "prompt"
    """prompt_completion: column holding the prompt (not trained)."""
    completion_field: str = "completion"
    """prompt_completion: column holding the completion (trained; the EOS token is appended and trained too)."""
    prompt_template: Optional[str] = None
    """labelled: the instruction, with `{text}` (and `{text_pair}` for pair tasks) where the row's text goes."""
    label_words: Optional[list[str]] = None
    """labelled: the answer for each class in id order (e.g. `1 star` ... `5 stars`); null uses the label names."""
    use_chat_template: bool = True
    """prompt_completion / labelled: render the prompt as a user turn and the answer as the assistant turn with the
    chat template (what an instruct model expects); false, or no template at all, joins them as plain text."""
    system_prompt: Optional[str] = None
    """prompt_completion / labelled under the chat template: a system message before the prompt. Many templates
    insert a default one when there is none (SmolLM2's costs 20 tokens of every example)."""
    chat_template: Optional[str] = None
    """A Jinja chat template for a tokenizer that has none (it is saved with the exported tokenizer)."""
    shorten: Literal["end", "start"] = "end"
    """labelled: where a text too long for `data.max_length` is cut, so that the instruction and the whole answer
    still fit: `end` keeps its beginning, `start` keeps its end (where a review's verdict comes last). The text gets
    what the template, the longest answer and the end marker leave; of a pair, the longer text is shortened first.
    The plan counts the shortened rows."""
    on_truncated: Literal["drop", "fail"] = "drop"
    """An example whose trained part is cut away entirely by `data.max_length` (labelled: whose prompt template and
    longest answer alone leave no room for one token of its text): `drop` it (the plan counts them) or `fail` naming the
    rows."""
    generations: int = Field(default=4, ge=0)
    """Greedy generations from this many eval prompts at each evaluation, written to `generations/step-N.jsonl`."""
    max_new_tokens: int = Field(default=48, ge=1)
    """Length limit of those generations."""

    @model_validator(mode="after")
    def _fields_of_the_format(self) -> "CausalLMTask":
        # Set to something other than the default: a resolved recipe (every field written out) reloads.
        foreign = sorted(
            name for name in self.model_fields_set
            if any(name in fields for fields in CAUSAL_LM_FORMAT_FIELDS.values())
            and name not in CAUSAL_LM_FORMAT_FIELDS[self.format]
            and getattr(self, name) != CausalLMTask.model_fields[name].default
        )
        if foreign:
            raise ValueError(f"{', '.join(foreign)} do(es) not apply to format {self.format!r}")
        if self.format == "labelled" and (self.prompt_template is None or "{text}" not in self.prompt_template):
            raise ValueError("format labelled needs a prompt_template with {text} where the row's text goes")
        if self.label_words is not None and not all(word.strip() for word in self.label_words):
            raise ValueError("label_words: every class needs a non-empty answer")
        return self

    @property
    def label_count(self) -> Optional[int]:
        return len(self.label_words) if self.label_words else None


class PreferenceTask(Section):
    """What reward modelling and DPO share: rows of a prompt with a chosen and a rejected answer."""

    prompt_field: Optional[str] = "prompt"
    """Column holding the prompt: text, or a list of chat messages (`[{role, content}, ...]`). null: the prompt is
    the beginning that `chosen` and `rejected` share (whole conversations, as in `trl-lib/ultrafeedback_binarized`,
    or whole dialogue texts, as in the raw `Anthropic/hh-rlhf`)."""
    chosen_field: str = "chosen"
    """Column holding the preferred answer: text, or the assistant turn(s) as chat messages (a conversation that
    repeats the prompt's turns first is read from where they end)."""
    rejected_field: str = "rejected"
    """Column holding the other answer, in the same form as `chosen_field`."""
    margin_field: Optional[str] = None
    """Optional column of a number per row: how much better chosen is, subtracted inside the loss (the reward
    model's `-log sigmoid(r_chosen - r_rejected - margin)`, as in Llama 2's reward models and TRL's `margin`)."""
    use_chat_template: bool = True
    """Text prompts are rendered as a user turn and each answer as the assistant turn with the chat template; false
    (or a tokenizer without one) joins prompt and answer as plain text with the EOS token after the answer.
    Conversations always use the chat template."""
    system_prompt: Optional[str] = None
    """Text prompts under the chat template: a system message before the prompt."""
    chat_template: Optional[str] = None
    """A Jinja chat template for a tokenizer that has none (it is saved with the exported tokenizer)."""
    shorten: Literal["start", "end"] = "start"
    """A pair too long for `data.max_length` has its prompt shortened, never its answers: `start` cuts the prompt's
    beginning (keeping the turn the answers reply to), `end` its end. The plan counts the shortened pairs."""
    on_truncated: Literal["drop", "fail"] = "drop"
    """A pair whose answers alone (with the template) do not fit `data.max_length`: `drop` it (the plan counts
    them) or `fail` naming the rows."""

    @property
    def format(self) -> str:
        """How a text row becomes text, for the renderer shared with causal_lm: a prompt, then an answer."""
        return "prompt_completion"

    @property
    def label_count(self) -> Optional[int]:
        return None  # pairs, not classes


class RewardTask(PreferenceTask):
    type: Literal["reward"]
    """`reward`: a reward model: `AutoModelForSequenceClassification` with one output scoring prompt + answer,
    trained so that the chosen answer scores above the rejected one (`-log sigmoid(r_chosen - r_rejected)`, the
    loss averaged over the pairs of each optimizer step across micro-batches and processes)."""
    center_rewards_coefficient: Optional[float] = Field(default=None, gt=0.0)
    """Also pull rewards towards 0: adds `coef * mean((r_chosen + r_rejected)^2)` (Eisenstein et al. 2023; TRL's
    `center_rewards_coefficient`, 0.01 suggested). null: off."""


class DPOTask(PreferenceTask):
    type: Literal["dpo"]
    """`dpo`: direct preference optimization of a causal LM (Rafailov et al. 2023): the policy is the model being
    trained, the reference is the starting model; the loss is on the answers' tokens only (prompt masked), from
    each answer's summed log-probs, averaged over the pairs of each optimizer step."""
    beta: float = Field(default=0.1, gt=0.0)
    """How far the policy may move from the reference: the implicit reward is `beta * (log pi - log ref)`."""
    loss_type: Literal["sigmoid", "hinge"] = "sigmoid"
    """`sigmoid`: DPO's `-log sigmoid(beta * margin)`; `hinge`: SLiC's `max(0, 1 - beta * margin)`, where margin is
    (chosen - rejected) of (policy - reference) log-probs."""
    generations: int = Field(default=4, ge=0)
    """Greedy generations from this many eval prompts at each evaluation (with the chosen and rejected answers
    beside them), written to `generations/step-N.jsonl`."""
    max_new_tokens: int = Field(default=48, ge=1)
    """Length limit of those generations."""


def task_type_of(value: Any) -> Any:
    """The union's tag: `type`, which classification recipes may leave out (it is the default); None (a missing
    tag) when causal_lm keys stand there without it."""
    if not isinstance(value, dict):
        return getattr(value, "type", None)
    if "type" in value:
        return value["type"] if isinstance(value["type"], str) else None
    only_causal_lm = set(CausalLMTask.model_fields) - set(ClassificationTask.model_fields)
    return None if set(value) & only_causal_lm else "sequence_classification"


TaskSection = Annotated[
    Union[Annotated[ClassificationTask, Tag("sequence_classification")], Annotated[CausalLMTask, Tag("causal_lm")],
          Annotated[RewardTask, Tag("reward")], Annotated[DPOTask, Tag("dpo")]],
    Discriminator(task_type_of),
]
TASK_TYPES = {"sequence_classification": ClassificationTask, "causal_lm": CausalLMTask, "reward": RewardTask, "dpo": DPOTask}
PREFERENCE_TASK_TYPES = ("reward", "dpo")
PREFERENCE_METRICS = ("accuracy", "margin", "chosen_reward", "rejected_reward")
"""What reward and dpo report besides the loss (the reward model adds its rewards' mean and spread, DPO both
answers' log-probs)."""


class TrainingSection(Section):
    epochs: int = Field(default=3, ge=1)
    """Passes over the training set."""
    max_steps: Optional[int] = Field(default=None, ge=1)
    """Stop after this many optimizer steps (the schedule is sized to it); null trains `epochs` full epochs."""
    per_device_batch_size: int = Field(default=8, ge=1)
    """Examples per device per forward pass. Global batch = this x gradient_accumulation_steps x processes."""
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    """Forward/backward passes per optimizer step. The only source of this number (DeepSpeed's is filled from it)."""
    lr: float = Field(default=5e-5, gt=0.0, le=1.0)
    """Peak learning rate of AdamW."""
    weight_decay: float = Field(default=0.0, ge=0.0)
    """AdamW decoupled weight decay (not applied to biases and norm weights)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW beta1, beta2."""
    adam_eps: float = Field(default=1e-8, gt=0.0)
    """AdamW epsilon."""
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate schedule after warmup."""
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Fraction of the optimizer steps spent warming up linearly from 0."""
    max_grad_norm: Optional[float] = Field(default=1.0, gt=0.0)
    """Clip the global gradient norm to this; null disables clipping."""
    precision: Precision = "fp32"
    """Compute precision: fp32, or bf16 / fp16 mixed precision (autocast) through Accelerate. On CPU: bf16 only,
    and slower than fp32 unless the CPU has AVX-512 BF16 or AMX (the run plan says so)."""
    precision_fallback: bool = False
    """If bf16/fp16 is requested on hardware without it (fp16 on CPU, bf16 on a V100 or a 910A NPU), fall back to
    fp32 with a warning instead of failing."""
    class_weights: Optional[Union[Literal["balanced"], list[Annotated[float, Field(gt=0.0)]]]] = None
    """Make rare classes count more. single_label: each example's cross-entropy times its class's weight;
    `balanced` is examples / (classes x examples of the class) from the training set (scikit-learn's rule; the
    weights average 1 over the training examples). multi_label: each class's positive examples weighted in its
    binary cross-entropy (`pos_weight`); `balanced` is the class's negative / positive training examples. Or one
    weight per class in id order. The loss is the mean of the weighted example losses (not divided by the weights'
    sum as torch's weighted mean is), so a step's loss is the same however its examples are split into
    micro-batches and processes."""
    seed: int = Field(default=42, ge=0, lt=2**32)
    """Seed of model init (classification head), shuffling and dropout. Same recipe + seed = same losses on CPU."""
    log_every_steps: int = Field(default=10, ge=1)
    """Write a metrics-log line every this many optimizer steps."""
    on_nonfinite_loss: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss or gradient norm: `stop` ends the run with an error naming the step; `skip` drops that
    optimizer step on every rank and goes on (weights, optimizer state and schedule as the step before left them).
    DeepSpeed updates inside the backward, before the loss is known: `skip` is refused there."""
    collective_timeout_s: int = Field(default=1800, ge=10)
    """Timeout of collectives (gloo/nccl/hccl): a rank that stops answering ends the run after this."""
    compile: bool = False
    """Wrap the model in `torch.compile`. Compiling takes minutes before the first step (about 110 s for MiniLM
    on 2 CPU cores, for 10% faster steps after it), so it pays off on long runs only."""
    reuse_host_memory: bool = True
    """Keep freed host (CPU) memory inside the process (glibc `mallopt`) instead of handing large blocks back to
    the OS: gradients are reallocated every step, and fresh pages cost a page fault each. Measured on MiniLM on
    2 CPU cores: 5% and 10% more samples/s in two 3-repeat comparisons (docs/benchmarks.md); the process keeps
    its peak RSS. No effect without glibc."""
    log_sample_fingerprints: bool = False
    """Debug: add `sample_fingerprints` (crc32 of each example's token ids, all ranks, in order) to every train log
    record, to check which examples each step saw (e.g. that a resumed run continues the data order exactly)."""


class EvaluationSection(Section):
    metrics: Optional[list[MetricName]] = None
    """Metrics computed on the eval set besides the loss. single_label: accuracy, f1/precision/recall (binary,
    positive label 1), and *_macro. multi_label: exact_match (every class right), f1/precision/recall as *_micro
    (over all example-class decisions) and *_macro (mean over classes). regression: pearson, spearman, mse, mae.
    null: accuracy (single_label and labelled causal_lm), f1_micro, f1_macro and exact_match (multi_label), pearson,
    spearman and mse (regression), none for chat / prompt_completion (whose eval loss and perplexity are always
    reported)."""
    every_steps: Optional[int] = Field(default=None, ge=1)
    """Also evaluate every this many optimizer steps (always at each epoch end)."""
    batch_size: Optional[int] = Field(default=None, ge=1)
    """Per-device eval batch; null uses twice the training per-device batch (no gradients to keep)."""
    before_training: Optional[bool] = None
    """Evaluate once before the first step, to see what fine-tuning bought (the zero-shot numbers of an LLM).
    null: on for causal_lm, dpo and reward (a reward model's new head scores pairs by chance: the baseline to
    beat), off for classification (whose new head is random)."""


class LoraSection(Section):
    enabled: bool = False
    """Train low-rank adapters (peft LoRA) instead of all weights; the classification head is trained in full."""
    r: int = Field(default=8, ge=1)
    """Adapter rank."""
    alpha: int = Field(default=16, ge=1)
    """Adapter scaling numerator (scale = alpha / r)."""
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Dropout on the adapter input."""
    target_modules: Optional[list[str]] = None
    """Module names to adapt; null uses the architecture default (BERT: query, value; Llama: q_proj, k_proj,
    v_proj, o_proj)."""
    merge_on_save: bool = False
    """Besides the adapter, save a merged full model that loads without peft."""


class OutputSection(Section):
    dir: str
    """Run directory: resolved recipe, metrics log, checkpoints/ and final model/."""
    save_every_epoch: bool = True
    """Write a checkpoint at the end of each epoch."""
    save_every_steps: Optional[int] = Field(default=None, ge=1)
    """Also write a checkpoint every this many optimizer steps."""
    keep_last: int = Field(default=2, ge=1)
    """Keep this many newest checkpoints; older ones are removed only after a new one is complete."""
    resume_from: Optional[str] = None
    """`auto` resumes from the latest complete checkpoint in `dir` (starts fresh if none); or a checkpoint path."""
    allow_changed_resume: bool = False
    """Resume even if the global batch or schedule differ from the checkpoint's (a different run). Another number of
    processes alone needs no flag: the run resumes on it at the same global batch (DDP, FSDP and DeepSpeed ZeRO
    checkpoints alike)."""
    overwrite: bool = False
    """Allow starting a new run in a `dir` that already holds a finished run (its files are replaced)."""
    report_to: Literal["auto", "none", "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio"] = "auto"
    """Accelerate tracker besides the JSONL log, which gets the same numbers: `auto` is TensorBoard when it is
    installed (events in `<dir>/tensorboard/`); a tracker named here must be installed (`pip install mlflow-skinny`,
    `wandb`, ...) and is configured by its own environment variables. mlflow offline, no server, with
    mlflow-skinny: `MLFLOW_TRACKING_URI=file:/abs/path/mlruns MLFLOW_ALLOW_FILE_STORE=true MLFLOW_DISABLE_TELEMETRY=true`
    (a local file store; unset, MLflow 3 opens `mlflow.db` in the working directory, which needs SQLAlchemy); wandb
    offline: `WANDB_MODE=offline`."""


class Recipe(Section):
    """A fine-tuning job."""

    description: str = ""
    """One line saying what this recipe is for."""
    model: ModelSection
    data: DataSection
    task: TaskSection
    """What the model learns: a `sequence_classification` head, `causal_lm` generation (SFT), a `reward` model or
    `dpo` preference tuning; see `task.type`."""
    training: TrainingSection = TrainingSection()
    evaluation: EvaluationSection = EvaluationSection()
    lora: LoraSection = LoraSection()
    output: OutputSection

    @model_validator(mode="after")
    def _cross_section_rules(self) -> "Recipe":
        problems = []
        problem = self.problem_type
        if self.task.type in PREFERENCE_TASK_TYPES:
            problems += self.preference_problems()
        elif problem is None and self.evaluation.metrics:
            problems.append(f"evaluation.metrics {self.evaluation.metrics} need labels: causal_lm format "
                            f"{self.task.format!r} reports eval loss and perplexity; use format labelled for accuracy / F1")
        foreign = [m for m in self.evaluation.metrics or [] if problem and m not in METRICS_OF_PROBLEM[problem]]
        if foreign:
            problems.append(f"evaluation.metrics {foreign} do not apply to {problem}: choose from "
                            f"{', '.join(METRICS_OF_PROBLEM[problem])}")
        weights = self.training.class_weights
        if weights is not None and (self.task.type != "sequence_classification" or problem == "regression"):
            problems.append("training.class_weights apply to sequence_classification with problem_type single_label "
                            "or multi_label only")
        elif isinstance(weights, list) and len(weights) != self.task.num_labels:
            problems.append(f"training.class_weights has {len(weights)} weights but task.num_labels is {self.task.num_labels}")
        if self.data.label_columns is not None and problem != "multi_label":
            problems.append("data.label_columns (one 0/1 column per class) apply to problem_type multi_label only")
        if self.data.label_columns is not None and self.task.label_count not in (None, len(self.data.label_columns)):
            problems.append(f"data.label_columns has {len(self.data.label_columns)} columns but task.num_labels is "
                            f"{self.task.label_count}")
        classes = self.task.label_count or (len(self.data.label_names) if self.data.label_names else None)
        binary_only = [m for m in self.metric_names if m in BINARY_ONLY_METRICS]
        if binary_only and classes is not None and classes != 2:
            problems.append(f"evaluation.metrics {binary_only} are binary metrics but there are {classes} classes: "
                            f"use {[m + '_macro' for m in binary_only]}")
        if self.data.label_names is not None and self.task.label_count is not None and len(self.data.label_names) != self.task.label_count:
            what = "task.num_labels is" if self.task.type == "sequence_classification" else "task.label_words has"
            problems.append(f"data.label_names has {len(self.data.label_names)} names but {what} {self.task.label_count}")
        if self.task.type == "causal_lm" and self.task.format != "labelled" and self.data.text_pair_field:
            problems.append("data.text_pair_field applies to classification and causal_lm format labelled only")
        if self.task.type == "causal_lm" and self.task.format == "labelled" and self.data.text_pair_field \
                and "{text_pair}" not in (self.task.prompt_template or ""):
            problems.append("task.prompt_template needs {text_pair}: data.text_pair_field names a second text")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def preference_problems(self) -> list[str]:
        """What does not apply to preference pairs."""
        problems = []
        if self.evaluation.metrics:
            problems.append(f"evaluation.metrics {self.evaluation.metrics}: task.type {self.task.type} reports its own "
                            "(loss, pairwise accuracy, margins, reward statistics)")
        if self.data.padding == "packed":
            problems.append(f"data.padding packed: task.type {self.task.type} pads each pair's two answers side by "
                            "side; use dynamic or max_length")
        data_defaults = DataSection.model_fields
        foreign = [name for name in ("text_pair_field", "label_columns", "label_names")
                   if getattr(self.data, name) != data_defaults[name].default]
        if foreign:
            problems.append(f"data.{', data.'.join(foreign)} apply to labelled data; preference rows name their "
                            "columns in task.prompt_field, task.chosen_field, task.rejected_field")
        return problems

    @property
    def problem_type(self) -> Optional[str]:
        """What the evaluation scores: the classification problem type; labelled causal_lm picks one class per
        example (single_label); None for generation without labels."""
        if self.task.type == "sequence_classification":
            return self.task.problem_type
        return "single_label" if self.task.format == "labelled" else None

    @property
    def metric_names(self) -> list[str]:
        """The metrics to compute: the recipe's, or the problem type's default (the pair tasks' own)."""
        if self.task.type in PREFERENCE_TASK_TYPES:
            return list(PREFERENCE_METRICS)
        if self.evaluation.metrics is not None:
            return list(self.evaluation.metrics)
        return list(DEFAULT_METRICS[self.problem_type]) if self.problem_type else []

    @property
    def evaluates_before_training(self) -> bool:
        if self.evaluation.before_training is not None:
            return self.evaluation.before_training
        return self.task.type != "sequence_classification"

    @property
    def eval_batch_size(self) -> int:
        return self.evaluation.batch_size or 2 * self.training.per_device_batch_size
