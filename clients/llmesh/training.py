"""Training jobs on the client side: Byzer-LLM's parameters into a canonical training spec.

The SDK (:meth:`llmesh.ByzerLLM.sft` / ``pretrain`` / ``merge_lora``) and the CLI (``llmesh
sft``) share what is here (following a job is :mod:`llmesh.training_watch`):

- :func:`parse_params` reads Byzer-LLM's typed keys (``sft.int.num_train_epochs`` = ``"3"``);
  :func:`sft_spec`, :func:`pretrain_spec` and :func:`merge_lora_spec` turn Byzer-LLM's
  arguments into a ``TrainingJobSpec`` with canonical names only (the aliases of
  :mod:`llmesh.common.training_spec` are resolved here, once) and check it with
  :func:`llmesh.common.training_spec.validate_spec`, so a bad key fails before anything is sent.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from llmesh.common.errors import (
    InvalidArgument,
    LLMeshError,
)
from llmesh.common.job_rules import kind_name, state_name
from llmesh.common.training_spec import (
    FIELD_ALIASES,
    HYPERPARAMETER_ALIASES,
    HYPERPARAMETERS,
    LORA_ALIASES,
    TEMPLATES,
    accumulation_for_global_batch,
    hyperparameter_text,
    hyperparameter_value,
    target_modules_value,
    validate_spec,
)
from llmesh.v1 import trainer_service_pb2 as tr

__all__ = [
    "PARAM_TYPES",
    "TrainingJobFailed",
    "merge_lora_spec",
    "parse_params",
    "pretrain_spec",
    "sft_spec",
    "split_json_config",
    "training_params",
]

#: The value types of Byzer-LLM's typed keys (``<prefix>.<type>.<name>``).
PARAM_TYPES = ("float", "int", "bool", "str", "list", "dict")

# LoRA settings by every name they may be given under (canonical flat names included).
LORA_KEYS: dict[str, str] = {**LORA_ALIASES, "target_modules": "target_modules"}
# The name this module gave the alias table before it moved to llmesh.common.training_spec.
HP_ALIASES = HYPERPARAMETER_ALIASES
# LazyLLM's global batch (rows per optimizer step over every rank): becomes accumulation steps.
_GLOBAL_BATCH = "batch_size"
# Other spec fields a parameter may set, by the kinds that use them.
_SPEC_KEYS: dict[str, tuple[str, tuple[int, ...]]] = {
    "method": ("method", (tr.TRAINING_JOB_KIND_SFT,)),
    "template": ("template", (tr.TRAINING_JOB_KIND_SFT,)),
    "resume": ("resume", (tr.TRAINING_JOB_KIND_SFT, tr.TRAINING_JOB_KIND_PRETRAIN)),
    "tokenizer_path": ("tokenizer_path", (tr.TRAINING_JOB_KIND_PRETRAIN,)),
    # Byzer's pretrain ran sfft.int.steps_per_epoch steps per epoch: max_steps = that x epochs.
    "steps_per_epoch": ("steps_per_epoch", (tr.TRAINING_JOB_KIND_PRETRAIN,)),
}
_SPEC_KEYS.update({alias: _SPEC_KEYS[field] for alias, field in FIELD_ALIASES.items()})
# Top-level DeepSpeed config keys that share a name with a training key: they stay in the
# DeepSpeed config instead of being lifted into the hyperparameters.
_DEEPSPEED_KEYS = frozenset({"gradient_accumulation_steps"})

_METHODS = {"lora": tr.TRAINING_METHOD_LORA, "full": tr.TRAINING_METHOD_FULL}


class TrainingJobFailed(LLMeshError):
    """A job the caller waited for ended FAILED or CANCELLED; ``job`` holds it (and its reason)."""

    # Client-side only (never sent): the wait itself worked, the job it waited for did not.
    code = grpc.StatusCode.ABORTED

    def __init__(self, job: tr.TrainingJob) -> None:
        state = state_name(job.state)
        reason = job.reason or "no reason was recorded"
        super().__init__(f"training job {job.id} ({kind_name(job.spec.kind)}) {state}: {reason}")
        self.job = job
        self.state = state


# -- Byzer-LLM's typed parameters ---------------------------------------------------------------


def _typed(key: str, tpe: str, value: Any) -> Any:
    """Convert ``value`` to the type a Byzer-LLM key names; a bad value names the key."""
    try:
        if tpe == "float":
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if tpe == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if tpe == "bool":
            # Byzer-LLM compared with "true" only, so True (a Python bool) read as false and any
            # typo as false too; here both spellings work and anything else is an error.
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text not in ("true", "false"):
                raise ValueError(value)
            return text == "true"
        if tpe == "str":
            return str(value)
        parsed = json.loads(value) if isinstance(value, str) else value
        want = list if tpe == "list" else dict
        if not isinstance(parsed, want):
            raise ValueError(value)
        return parsed
    except (ValueError, TypeError):
        example = {
            "float": "0.0002",
            "int": "3",
            "bool": "true",
            "str": "text",
            "list": '["q_proj", "v_proj"]',
            "dict": '{"a": 1}',
        }[tpe]
        raise InvalidArgument(
            f"{key}={value!r} is not a {tpe}; give e.g. {key}={example}"
        ) from None


def parse_params(params: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Byzer-LLM's ``parse_params``: ``{"sft.int.x": "10"}`` -> ``{"x": 10}``.

    Keys ``<prefix>.<type>.<name>`` are kept, with the value converted by ``<type>``: ``float``,
    ``int``, ``bool`` (``"true"`` / ``"false"``), ``str``, ``list`` or ``dict`` (JSON text).
    Keys without the prefix are skipped, as in Byzer-LLM.

    Args:
        params: the parameters, values as strings (or already typed).
        prefix: e.g. ``"sft"``, ``"pretrain"``.

    Raises:
        InvalidArgument: a key with the prefix but an unknown type or no name, or a value that
            is not of the type its key names (Byzer-LLM failed with a bare ValueError, or
            kept the string for an unknown type).
    """
    out: dict[str, Any] = {}
    for key, value in params.items():
        if not key.startswith(f"{prefix}."):
            continue
        parts = key.split(".")
        if len(parts) != 3 or not parts[2]:
            raise InvalidArgument(
                f"model_params key {key!r} is not {prefix}.<type>.<name>; "
                f"write e.g. {prefix}.int.logging_steps"
            )
        tpe, name = parts[1], parts[2]
        if tpe not in PARAM_TYPES:
            raise InvalidArgument(
                f"model_params key {key!r} names the type {tpe!r}; use one of "
                + ", ".join(PARAM_TYPES)
            )
        out[name] = _typed(key, tpe, value)
    return out


def training_params(
    params: Mapping[str, Any] | None, prefixes: Sequence[str]
) -> dict[str, tuple[str, Any]]:
    """Typed keys under any of ``prefixes`` and plain keys, as ``{name: (given_key, value)}``.

    Raises:
        InvalidArgument: a dotted key under another prefix, a name given twice, or a typed key
            :func:`parse_params` refuses.
    """
    out: dict[str, tuple[str, Any]] = {}
    for key, value in (params or {}).items():
        if not isinstance(key, str) or not key:
            raise InvalidArgument(f"model_params keys must be non-empty strings, got {key!r}")
        if "." in key:
            prefix = key.split(".", 1)[0]
            if prefix not in prefixes:
                raise InvalidArgument(
                    f"model_params key {key!r} has the prefix {prefix!r}; this job reads "
                    + " or ".join(f"{p}.<type>.<name>" for p in prefixes)
                    + " and plain names"
                )
            ((name, typed),) = parse_params({key: value}, prefix).items()
        else:
            name, typed = key, value
        if name in out:
            raise InvalidArgument(
                f"model_params sets {name!r} twice ({out[name][0]!r} and {key!r}); keep one"
            )
        out[name] = (key, typed)
    return out


def split_json_config(json_config: str | Mapping[str, Any] | None) -> tuple[dict[str, Any], str]:
    """Split ``json_config`` into training keys and DeepSpeed JSON text.

    Byzer-LLM's ``sft`` merged ``json_config`` into its QLoRA training settings, its
    ``pretrain`` used it as the DeepSpeed config. Here keys that name a training setting
    (hyperparameters and their aliases, LoRA keys, ``method``, ...) are lifted out and the rest
    is the DeepSpeed config; ``"{}"`` means none.

    Returns:
        ``(training_keys, deepspeed_config_json)``; the text is empty when nothing is left.

    Raises:
        InvalidArgument: not JSON, or not a JSON object.
    """
    if json_config is None:
        return {}, ""
    if isinstance(json_config, Mapping):
        config = dict(json_config)
    else:
        text = str(json_config).strip()
        if not text:
            return {}, ""
        try:
            config = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(
                f"json_config is not valid JSON ({exc}); give a JSON object such as "
                '\'{"zero_optimization": {"stage": 2}}\''
            ) from None
        if not isinstance(config, dict):
            raise InvalidArgument(f"json_config must be a JSON object, not {type(config).__name__}")
    known = {*HYPERPARAMETERS, *HYPERPARAMETER_ALIASES, *LORA_KEYS, *_SPEC_KEYS, _GLOBAL_BATCH}
    lifted = {k: v for k, v in config.items() if k in known and k not in _DEEPSPEED_KEYS}
    rest = {k: v for k, v in config.items() if k not in lifted}
    return lifted, (json.dumps(rest) if rest else "")


def _lora_number(key: str, value: Any) -> float:
    """A LoRA number (r, alpha, dropout) given as a number or its text, >= 0."""
    if isinstance(value, bool):
        raise InvalidArgument(f"{key}={value!r} must be a number, not a bool")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{key}={value!r} is not a number; give e.g. {key}=1") from None
    if not math.isfinite(number) or number < 0:
        raise InvalidArgument(f"{key}={value!r} must be a finite number >= 0")
    return number


def _apply_params(
    spec: tr.TrainingJobSpec, params: Mapping[str, tuple[str, Any]], *, prefix: str
) -> int | None:
    """Put parameters into ``spec`` under canonical names: hyperparameters, LoRA, spec fields.

    Returns LazyLLM's global ``batch_size`` when one was given (it needs the rank count, see
    :func:`_apply_global_batch`).
    """
    kind = spec.kind
    steps_per_epoch: int | None = None
    global_batch: int | None = None
    for name, (key, value) in params.items():
        canonical = HYPERPARAMETER_ALIASES.get(name, name)
        if canonical in HYPERPARAMETERS:
            if canonical in spec.hyperparameters and canonical != name:
                raise InvalidArgument(f"{key!r} sets {canonical!r} a second time; keep one")
            spec.hyperparameters[canonical] = hyperparameter_text(canonical, value, key)
        elif name == _GLOBAL_BATCH:
            global_batch = int(hyperparameter_value("max_steps", value, key))
        elif name in LORA_KEYS:
            if kind != tr.TRAINING_JOB_KIND_SFT:
                raise InvalidArgument(f"{key!r} is a LoRA setting; only SFT jobs train LoRA")
            field = LORA_KEYS[name]
            if field == "target_modules":
                # None (all-linear) leaves the list empty: the runner's default.
                spec.lora.target_modules[:] = target_modules_value(key, value) or []
                continue
            number = _lora_number(key, value)
            if field == "r":
                if not number.is_integer() or number < 1:
                    raise InvalidArgument(f"{key}={value!r} must be a whole number >= 1")
                spec.lora.r = int(number)
            elif field == "alpha":
                spec.lora.alpha = number
            elif not number < 1:
                raise InvalidArgument(f"{key}={value!r} must be below 1 (a dropout probability)")
            else:
                spec.lora.dropout = number
        elif name in _SPEC_KEYS:
            field, kinds = _SPEC_KEYS[name]
            if kind not in kinds:
                raise InvalidArgument(
                    f"{key!r} does not apply to a {kind_name(kind)} job; leave it out"
                )
            if field == "method":
                method = str(value).strip().lower()
                if method not in _METHODS:
                    raise InvalidArgument(f"{key}={value!r} must be lora or full")
                spec.method = _METHODS[method]
            elif field == "template":
                if value not in TEMPLATES:
                    raise InvalidArgument(f"{key}={value!r} must be one of {', '.join(TEMPLATES)}")
                spec.template = value
            elif field == "resume":
                spec.resume = _typed(key, "bool", value)
            elif field == "tokenizer_path":
                spec.tokenizer_path = str(value)
            else:
                steps_per_epoch = int(hyperparameter_value("max_steps", value, key))
        else:
            raise InvalidArgument(
                f"unknown model_params key {key!r}; known names (plain or as "
                f"{prefix}.<type>.<name>): "
                + ", ".join(
                    sorted({*HYPERPARAMETERS, *HYPERPARAMETER_ALIASES, *_known_extra(kind)})
                )
            )
    if steps_per_epoch is not None and "max_steps" not in spec.hyperparameters:
        epochs = float(spec.hyperparameters.get("num_train_epochs", "1"))
        spec.hyperparameters["max_steps"] = str(max(1, math.ceil(steps_per_epoch * epochs)))
    return global_batch


def _apply_global_batch(spec: tr.TrainingJobSpec, global_batch: int | None) -> None:
    """LazyLLM's ``batch_size`` (over every rank) as gradient_accumulation_steps.

    An explicit gradient_accumulation_steps wins, as in LazyLLM.
    """
    if global_batch is None or "gradient_accumulation_steps" in spec.hyperparameters:
        return
    micro = int(
        spec.hyperparameters.get(
            "per_device_train_batch_size",
            str(HYPERPARAMETERS["per_device_train_batch_size"].default),
        )
    )
    steps = accumulation_for_global_batch(global_batch, micro, max(1, spec.num_ranks))
    spec.hyperparameters["gradient_accumulation_steps"] = str(steps)


def _known_extra(kind: int) -> set[str]:
    extra = {k for k, (_, kinds) in _SPEC_KEYS.items() if kind in kinds} | {_GLOBAL_BATCH}
    if kind == tr.TRAINING_JOB_KIND_SFT:
        extra |= set(LORA_KEYS)
    return extra


def _resources(spec: tr.TrainingJobSpec, num_cpus: float, num_gpus: float, num_ranks: int) -> None:
    for name, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus), ("num_ranks", num_ranks)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise InvalidArgument(f"{name}={value!r} must be a number >= 0")
    if not float(num_ranks).is_integer():
        raise InvalidArgument(f"num_ranks={num_ranks!r} must be a whole number")
    spec.cpus = float(num_cpus)
    spec.gpus = float(num_gpus)
    spec.num_ranks = int(num_ranks)


def _params(
    json_config: str | Mapping[str, Any] | None,
    model_params: Mapping[str, Any] | None,
    prefixes: Sequence[str],
) -> tuple[dict[str, tuple[str, Any]], str]:
    lifted, deepspeed = split_json_config(json_config)
    params = {k: (f"json_config[{k!r}]", v) for k, v in lifted.items()}
    # model_params win over json_config, as Byzer-LLM merged {**config, **sft_params}.
    params.update(training_params(model_params, prefixes))
    return params, deepspeed


def sft_spec(
    *,
    local_data_dir_path: str,
    local_model_path: str,
    local_stage_path: str = "",
    num_cpus: float = 0,
    num_gpus: float = 0,
    json_config: str | Mapping[str, Any] | None = "{}",
    model_params: Mapping[str, Any] | None = None,
    num_ranks: int = 0,
    method: str | None = None,
    template: str | None = None,
    resume: bool | None = None,
) -> tr.TrainingJobSpec:
    """The ``TrainingJobSpec`` for Byzer-LLM's ``sft(...)`` arguments, validated.

    Args:
        local_data_dir_path: ``data.jsonl`` or a directory holding it, on the trainer worker.
        local_model_path: the base model directory, on the trainer worker.
        local_stage_path: the job's output directory; empty lets the worker choose.
        num_cpus: CPUs the job reserves (0: one per rank).
        num_gpus: GPUs the job reserves.
        json_config: a DeepSpeed config (JSON text or a dict); training keys in it are read
            as parameters (see :func:`split_json_config`).
        model_params: ``sft.<type>.<name>`` keys or plain names: hyperparameters (by their
            names or aliases in :mod:`llmesh.common.training_spec`, and LazyLLM's global
            ``batch_size``), LoRA settings (``lora_r``, ``lora_alpha``, ``lora_dropout``,
            ``target_modules``), ``method`` / ``finetuning_type``, ``template``, ``resume``.
        num_ranks: processes under the DeepSpeed launcher (0: one).
        method: ``"lora"`` or ``"full"``; overrides a method in ``model_params``.
        template: ``"auto"``, ``"alpaca"`` or ``"chat"``.
        resume: resume from the newest checkpoint in the output directory (default true).

    Raises:
        InvalidArgument: an unknown key or a bad value, naming it.
    """
    spec = tr.TrainingJobSpec(
        kind=tr.TRAINING_JOB_KIND_SFT,
        base_model_path=str(local_model_path or ""),
        data_path=str(local_data_dir_path or ""),
        output_dir=str(local_stage_path or ""),
    )
    params, spec.deepspeed_config_json = _params(json_config, model_params, ("sft",))
    if method is not None:
        params["method"] = ("method", method)
    if template is not None:
        params["template"] = ("template", template)
    if resume is not None:
        params["resume"] = ("resume", resume)
    global_batch = _apply_params(spec, params, prefix="sft")
    _resources(spec, num_cpus, num_gpus, num_ranks)
    _apply_global_batch(spec, global_batch)
    if spec.method == tr.TRAINING_METHOD_FULL and spec.HasField("lora"):
        raise InvalidArgument("LoRA settings were given for method=full; drop them or use lora")
    validate_spec(spec)
    return spec


def pretrain_spec(
    *,
    local_data_dir_path: str,
    local_model_path: str,
    local_stage_path: str = "",
    num_cpus: float = 0,
    num_gpus: float = 0,
    json_config: str | Mapping[str, Any] | None = "{}",
    model_params: Mapping[str, Any] | None = None,
    num_ranks: int | None = None,
    resume: bool | None = None,
) -> tr.TrainingJobSpec:
    """The ``TrainingJobSpec`` for Byzer-LLM's ``pretrain(...)`` arguments, validated.

    Args:
        local_data_dir_path: a .txt file, a directory of them, or jsonl rows with ``text``.
        local_model_path: a model directory with ``config.json`` and the tokenizer (the model
            is built from that config), or a ``config.json`` path (then pass
            ``tokenizer_path`` in ``model_params``).
        local_stage_path: the job's output directory; empty lets the worker choose.
        num_cpus: CPUs the job reserves (0: one per rank).
        num_gpus: GPUs the job reserves.
        json_config: the DeepSpeed config (JSON text or a dict).
        model_params: ``pretrain.<type>.<name>`` (or Byzer's ``sfft.<type>.<name>``) keys or
            plain names: hyperparameters, ``tokenizer_path``, ``steps_per_epoch``, ``resume``.
        num_ranks: processes under the DeepSpeed launcher; None: one per whole GPU reserved
            (Byzer-LLM ran one rank per GPU), at least one.
        resume: resume from the newest checkpoint in the output directory (default true).

    Raises:
        InvalidArgument: an unknown key or a bad value, naming it.
    """
    path = str(local_model_path or "")
    if path.endswith(".json"):
        model_config, tokenizer = path, ""
    else:
        tokenizer = path.rstrip("/") or path
        model_config = f"{tokenizer}/config.json" if path else ""
    spec = tr.TrainingJobSpec(
        kind=tr.TRAINING_JOB_KIND_PRETRAIN,
        data_path=str(local_data_dir_path or ""),
        output_dir=str(local_stage_path or ""),
        model_config=model_config,
        tokenizer_path=tokenizer,
    )
    params, spec.deepspeed_config_json = _params(json_config, model_params, ("pretrain", "sfft"))
    if resume is not None:
        params["resume"] = ("resume", resume)
    global_batch = _apply_params(spec, params, prefix="pretrain")
    if num_ranks is None:
        num_ranks = int(num_gpus) if isinstance(num_gpus, (int, float)) and num_gpus >= 1 else 0
    _resources(spec, num_cpus, num_gpus, num_ranks)
    _apply_global_batch(spec, global_batch)
    validate_spec(spec)
    return spec


def merge_lora_spec(
    *, local_model_path: str, local_adapter_path: str, local_target_path: str = ""
) -> tr.TrainingJobSpec:
    """The ``TrainingJobSpec`` for Byzer-LLM's ``merge_lora(...)`` arguments, validated.

    Raises:
        InvalidArgument: the base model or adapter path is empty.
    """
    spec = tr.TrainingJobSpec(
        kind=tr.TRAINING_JOB_KIND_MERGE_LORA,
        base_model_path=str(local_model_path or ""),
        adapter_path=str(local_adapter_path or ""),
        output_dir=str(local_target_path or ""),
    )
    validate_spec(spec)
    return spec


# -- following a job ----------------------------------------------------------------------------
