"""The training-spec vocabulary: hyperparameter names, types, defaults and aliases, and the check.

One table for every process. The SDK and CLI resolve the names users bring from Byzer-LLM and
LazyLLM (``epoches``, ``max_seq_length``, ``micro_batch_size``, ``lora_rank``, ...) to the
canonical names here, once, where a request enters; the ``TrainingJobSpec`` that travels to
the control plane and the trainer worker carries canonical names only. :func:`validate_spec`
is the one check of a spec; an alias that reaches it is refused with the canonical name, so
a client that skipped the resolution learns what to send.

The runner's typed ``Hyperparameters`` read their defaults, types and bounds from here too
(:func:`hyperparameter_value`), so a value the control plane accepts is one the runner runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

from llmesh.common.errors import InvalidArgument
from llmesh.v1 import trainer_service_pb2 as tr

__all__ = [
    "FIELD_ALIASES",
    "HYPERPARAMETERS",
    "HYPERPARAMETER_ALIASES",
    "LORA_ALIASES",
    "LORA_FIELDS",
    "LR_SCHEDULERS",
    "TEMPLATES",
    "Hyperparameter",
    "accumulation_for_global_batch",
    "alias_error",
    "check_epochs",
    "hyperparameter_text",
    "hyperparameter_value",
    "target_modules_value",
    "validate_spec",
]

LR_SCHEDULERS = ("linear", "cosine", "constant")
TEMPLATES = ("auto", "alpaca", "chat")

Value = int | float | str | bool


@dataclasses.dataclass(frozen=True)
class Hyperparameter:
    """One training-loop setting (names follow HuggingFace ``TrainingArguments``).

    Args:
        name: the canonical name, the key in ``TrainingJobSpec.hyperparameters``.
        type: ``int``, ``float``, ``str`` or ``bool``.
        default: the runner's value when the spec leaves it out (None: derived, see help).
        minimum: the smallest allowed number.
        above_minimum: the number must be strictly greater than ``minimum``.
        choices: the allowed names of a ``str`` setting.
        aliases: names Byzer-LLM, LazyLLM or HuggingFace habits use for it.
        help: what it does.
    """

    name: str
    type: type
    default: Value | None
    help: str
    minimum: float = 0
    above_minimum: bool = False
    choices: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()


_TABLE = (
    Hyperparameter(
        "num_train_epochs",
        float,
        1.0,
        "passes over the training rows (ignored when max_steps > 0)",
        # Byzer's pretrain said sfft.int.epoches; LazyLLM says num_epochs.
        aliases=("num_epochs", "epochs", "epoches"),
    ),
    Hyperparameter("max_steps", int, 0, "optimizer steps to run; 0 derives them from the epochs"),
    Hyperparameter(
        "learning_rate",
        float,
        None,
        "peak learning rate; unset: 2e-4 for LoRA, 2e-5 full fine-tuning, 3e-4 pretraining",
        above_minimum=True,
        aliases=("lr",),
    ),
    Hyperparameter(
        "per_device_train_batch_size",
        int,
        4,
        "rows per rank per forward pass",
        minimum=1,
        aliases=("micro_batch_size", "per_device_batch_size"),
    ),
    Hyperparameter(
        "gradient_accumulation_steps", int, 1, "forward passes per optimizer step", minimum=1
    ),
    Hyperparameter(
        "cutoff_len",
        int,
        1024,
        "longest token sequence; longer rows are truncated (pretrain: the block size)",
        minimum=1,
        # Byzer's sft config said max_seq_length, its pretrain sfft.int.max_length.
        aliases=("max_seq_length", "max_length", "block_size"),
    ),
    Hyperparameter(
        "val_set_size", float, 0.0, "rows held out for evaluation: a fraction below 1 or a count"
    ),
    Hyperparameter("save_steps", int, 100, "checkpoint every this many steps (0: never)"),
    Hyperparameter("save_total_limit", int, 0, "keep the newest this many checkpoints (0: all)"),
    Hyperparameter("eval_steps", int, 0, "evaluate every this many steps (0: at checkpoints)"),
    Hyperparameter("logging_steps", int, 10, "report progress every this many steps"),
    Hyperparameter("seed", int, 42, "seeds the split, the shuffle and the adapter init"),
    Hyperparameter(
        "warmup_steps", int, 0, "linear warm-up steps of the learning rate", aliases=("warmup",)
    ),
    Hyperparameter(
        "lr_scheduler_type",
        str,
        "linear",
        "the learning rate after warm-up: linear (decay to 0), cosine or constant",
        choices=LR_SCHEDULERS,
        aliases=("lr_scheduler",),
    ),
    Hyperparameter("weight_decay", float, 0.0, "AdamW weight decay"),
    Hyperparameter(
        "max_grad_norm", float, 1.0, "gradient clipping (unless the DeepSpeed config sets it)"
    ),
    Hyperparameter(
        "train_on_inputs", bool, False, "also learn the prompt tokens (default: response only)"
    ),
)

#: Every hyperparameter by canonical name.
HYPERPARAMETERS: dict[str, Hyperparameter] = {hp.name: hp for hp in _TABLE}
#: Byzer-LLM / LazyLLM / HuggingFace names -> canonical hyperparameter names.
HYPERPARAMETER_ALIASES: dict[str, str] = {a: hp.name for hp in _TABLE for a in hp.aliases}
#: The fields of ``LoraConfig``.
LORA_FIELDS = ("r", "alpha", "dropout", "target_modules")
#: Byzer's QLoRA config and LazyLLM names for the LoRA fields.
LORA_ALIASES: dict[str, str] = {
    "lora_r": "r",
    "lora_rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lora_target_modules": "target_modules",
}
#: Byzer-LLM names for other spec fields.
FIELD_ALIASES: dict[str, str] = {"finetuning_type": "method", "prompt_template_name": "template"}

assert not set(HYPERPARAMETER_ALIASES) & set(HYPERPARAMETERS), "an alias shadows a name"


def alias_error(label: str, alias: str, canonical: str) -> InvalidArgument:
    """The refusal of an alias past the point where aliases are resolved.

    Args:
        label: how the caller names the place of the key (e.g. ``hyperparameter 'lr'``).
        alias: the alias found.
        canonical: the name to send instead.
    """
    return InvalidArgument(
        f"{label} uses the Byzer-LLM/LazyLLM alias {alias!r}; the spec takes the canonical "
        f"name {canonical!r} (the SDK and CLI translate aliases, servers accept canonical "
        "names only)"
    )


def hyperparameter_value(name: str, value: Any, label: str) -> Value:
    """``value`` (a number, bool or its text) as the type of hyperparameter ``name``, checked.

    Args:
        name: a canonical hyperparameter name.
        value: what was given; text is parsed (``"3"``, ``"2e-4"``, ``"true"``).
        label: how errors name the setting, e.g. ``"sft.int.max_steps"``.

    Raises:
        InvalidArgument: naming ``label``, the value and what it must be.
    """
    hp = HYPERPARAMETERS[name]
    if hp.type is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
        raise InvalidArgument(f"{label} must be true or false, not {value!r}")
    if hp.type is str:
        text = value.strip().lower() if isinstance(value, str) else value
        if text not in hp.choices:
            raise InvalidArgument(f"{label} must be one of {', '.join(hp.choices)}; got {value!r}")
        return text
    if isinstance(value, bool):
        raise InvalidArgument(f"{label} must be a number, not a bool ({value!r})")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{label} is not a number ({value!r}); give e.g. {name}=1") from None
    if not math.isfinite(number) or number < hp.minimum:
        raise InvalidArgument(f"{label} must be a finite number >= {hp.minimum:g}, got {value!r}")
    if hp.above_minimum and number <= hp.minimum:
        raise InvalidArgument(f"{label} must be > {hp.minimum:g}, got {value!r}")
    if hp.type is int:
        if not number.is_integer():
            raise InvalidArgument(f"{label} must be a whole number, got {value!r}")
        return int(number)
    if name == "val_set_size" and number >= 1 and not number.is_integer():
        raise InvalidArgument(
            f"{label} must be a fraction below 1 or a whole row count, got {value!r}"
        )
    return number


def hyperparameter_text(name: str, value: Any, label: str) -> str:
    """``value`` checked and written as ``TrainingJobSpec.hyperparameters`` holds it.

    ``3.0`` -> ``"3"``, ``2e-4`` -> ``"0.0002"``, ``True`` -> ``"true"``.

    Raises:
        InvalidArgument: as :func:`hyperparameter_value`.
    """
    typed = hyperparameter_value(name, value, label)
    if isinstance(typed, bool):
        return "true" if typed else "false"
    if isinstance(typed, str):
        return typed
    if isinstance(typed, float):
        # 3.0 -> "3" reads better; anything else keeps full precision (repr, not %g).
        return str(int(typed)) if typed.is_integer() else repr(typed)
    return str(typed)


def target_modules_value(label: str, value: Any) -> list[str] | None:
    """LoRA target modules as given: a list, ``"a,b"``, ``"[a,b]"`` (LazyLLM's spelling),
    JSON text, or ``"all-linear"`` / ``"all"`` / ``""`` (None: every attention and MLP layer).

    Args:
        label: how errors name the setting.
        value: what was given.

    Raises:
        InvalidArgument: not module names, or an empty list.
    """
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("", "all", "all-linear", "all_linear", "auto"):
            return None
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError:
                value = text.strip("[]").split(",")
        else:
            value = text.split(",")
    if not isinstance(value, (list, tuple)):
        raise InvalidArgument(
            f"{label} must be a list of module names such as ['q_proj', 'v_proj'], not {value!r}"
        )
    out = []
    for item in value:
        if not isinstance(item, str) or not item.strip().strip("'\""):
            raise InvalidArgument(f"{label} must contain module names (strings), got {item!r}")
        out.append(item.strip().strip("'\""))
    if not out:
        raise InvalidArgument(
            f"{label} is empty; leave it out to adapt every attention and MLP linear layer"
        )
    return out


def check_epochs(values: Mapping[str, Value], label: str = "num_train_epochs") -> None:
    """Refuse zero epochs without ``max_steps``: such a job would train nothing.

    Args:
        values: typed hyperparameters (missing ones take their defaults).
        label: how the error names num_train_epochs.
    """
    epochs = values.get("num_train_epochs", HYPERPARAMETERS["num_train_epochs"].default)
    if not epochs and not values.get("max_steps"):
        raise InvalidArgument(f"{label} must be > 0 unless max_steps is set")


def accumulation_for_global_batch(batch_size: int, micro: int, ranks: int) -> int:
    """LazyLLM's global ``batch_size`` as gradient accumulation steps.

    Args:
        batch_size: rows per optimizer step over every rank.
        micro: per_device_train_batch_size.
        ranks: processes training together.

    Raises:
        InvalidArgument: ``batch_size`` is not a multiple of ``micro * ranks``.
    """
    per_step = micro * ranks
    if batch_size < 1 or batch_size % per_step:
        raise InvalidArgument(
            f"'batch_size' ({batch_size}) must be a multiple of per_device_train_batch_size "
            f"({micro}) x num_ranks ({ranks})"
        )
    return batch_size // per_step


def _kind_name(kind: int) -> str:
    return tr.TrainingJobKind.Name(kind).removeprefix("TRAINING_JOB_KIND_")


def validate_spec(spec: tr.TrainingJobSpec) -> None:
    """Refuse a spec that can never run, naming the field and the fix.

    The one check of a ``TrainingJobSpec``: the SDK runs it before sending, the control plane
    before storing, the trainer worker before starting. Paths are checked by the trainer
    worker's runner (they are on its file system); this checks what can be checked anywhere:
    the kind, the fields the kind needs, hyperparameter names (canonical only) and values,
    LoRA numbers and JSON text.

    Args:
        spec: the spec as sent.

    Raises:
        InvalidArgument: the first problem found.
    """
    if spec.kind == tr.TRAINING_JOB_KIND_UNSPECIFIED:
        raise InvalidArgument("spec.kind is not set; use SFT, PRETRAIN or MERGE_LORA")
    if spec.kind not in tr.TrainingJobKind.values():
        raise InvalidArgument(f"spec.kind {spec.kind} is not a TrainingJobKind")
    need: dict[int, tuple[str, ...]] = {
        tr.TRAINING_JOB_KIND_SFT: ("base_model_path", "data_path"),
        tr.TRAINING_JOB_KIND_PRETRAIN: ("data_path", "model_config", "tokenizer_path"),
        tr.TRAINING_JOB_KIND_MERGE_LORA: ("base_model_path", "adapter_path"),
    }
    for name in need[spec.kind]:
        if not getattr(spec, name):
            raise InvalidArgument(
                f"spec.{name} is empty; a {_kind_name(spec.kind)} job needs "
                + " and ".join(f"spec.{n}" for n in need[spec.kind])
            )
    if spec.num_ranks < 0:
        raise InvalidArgument(f"spec.num_ranks={spec.num_ranks} is negative; use 1 or more")
    if spec.cpus < 0 or spec.gpus < 0:
        raise InvalidArgument("spec.cpus and spec.gpus must not be negative")
    if spec.gpus != int(spec.gpus):
        raise InvalidArgument(
            f"spec.gpus is {spec.gpus:g}; a training job holds whole GPUs: give 0, 1, 2, ..."
        )
    if spec.lora.r < 0 or spec.lora.alpha < 0 or not 0 <= spec.lora.dropout < 1:
        raise InvalidArgument(
            "spec.lora needs r >= 0, alpha >= 0 and 0 <= dropout < 1 (0 means the default)"
        )
    values: dict[str, Value] = {}
    for key in sorted(spec.hyperparameters):
        if key in HYPERPARAMETER_ALIASES:
            raise alias_error(f"hyperparameter {key!r}", key, HYPERPARAMETER_ALIASES[key])
        if key not in HYPERPARAMETERS:
            raise InvalidArgument(
                f"unknown hyperparameter {key!r}; known ones are {', '.join(HYPERPARAMETERS)}"
            )
        values[key] = hyperparameter_value(key, spec.hyperparameters[key], f"hyperparameter {key}")
    check_epochs(values, "hyperparameter num_train_epochs")
    if spec.deepspeed_config_json:
        try:
            config = json.loads(spec.deepspeed_config_json)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"spec.deepspeed_config_json is not valid JSON: {exc}") from None
        if not isinstance(config, dict):
            raise InvalidArgument("spec.deepspeed_config_json must be a JSON object")
    if spec.template not in ("", *TEMPLATES):
        raise InvalidArgument(
            f"spec.template {spec.template!r} is unknown; use {', '.join(TEMPLATES)}"
        )
    if spec.kind == tr.TRAINING_JOB_KIND_PRETRAIN and spec.template not in ("", "auto"):
        raise InvalidArgument("spec.template applies to SFT rows only; leave it out for PRETRAIN")
