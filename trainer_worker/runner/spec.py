"""The job spec: what a trainer worker hands the runner, as a JSON file next to the job's output.

:meth:`JobSpec.from_dict` takes canonical names only (the vocabulary of
:mod:`llmesh.common.training_spec`; Byzer-LLM's and LazyLLM's aliases are resolved where a
request enters, by the SDK and CLI), hyperparameter and LoRA keys flat or nested, and turns them
into one typed shape. Every problem raises :class:`~llmesh.errors.InvalidArgument` naming the
key; an alias is refused with the canonical name to use.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmesh.common.errors import InvalidArgument
from llmesh.common.training_spec import (
    FIELD_ALIASES,
    HYPERPARAMETER_ALIASES,
    HYPERPARAMETERS,
    LORA_ALIASES,
    LORA_FIELDS,
    TEMPLATES,
    alias_error,
    check_epochs,
    hyperparameter_value,
    target_modules_value,
)

__all__ = [
    "KINDS",
    "METHODS",
    "TEMPLATES",
    "Hyperparameters",
    "JobSpec",
    "LoraSpec",
    "resolve_batch_config",
]

KINDS = ("sft", "pretrain", "merge_lora")
METHODS = ("lora", "full")

# Default learning rates by what is trained: LoRA adapters tolerate (and need) a much larger
# step than full weights; a model pretrained from random weights sits in between.
DEFAULT_LR = {"lora": 2e-4, "full": 2e-5, "pretrain": 3e-4}

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _default(name: str) -> Any:
    return HYPERPARAMETERS[name].default


@dataclasses.dataclass
class LoraSpec:
    """LoRA adapter shape.

    Args:
        r: Rank of the update matrices.
        alpha: Scale numerator (the update is scaled by ``alpha / r``).
        dropout: Dropout on the adapter input while training. 0 by default (PEFT's default),
            which also keeps "0 = not set" in the gRPC contract meaning what it says.
        target_modules: Module names to adapt (``q_proj``, ...); ``None`` means every linear
            layer of the attention and MLP blocks (never the output head).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None


@dataclasses.dataclass
class Hyperparameters:
    """Training loop settings; names, defaults and bounds are those of
    :data:`llmesh.common.training_spec.HYPERPARAMETERS` (HuggingFace ``TrainingArguments`` names).

    Args:
        num_train_epochs: Passes over the training rows (ignored when ``max_steps`` > 0).
        max_steps: Optimizer steps to run; 0 derives them from the epochs.
        learning_rate: Peak learning rate; ``None`` picks 2e-4 for LoRA, 2e-5 for full
            fine-tuning and 3e-4 for pretraining.
        per_device_train_batch_size: Rows per rank per forward pass.
        gradient_accumulation_steps: Forward passes per optimizer step.
        cutoff_len: Longest token sequence; longer rows are truncated (pretrain: block size).
        val_set_size: Rows held out for evaluation: a fraction (0 < x < 1) or a count.
        save_steps: Checkpoint every this many optimizer steps (0: no checkpoints).
        save_total_limit: Keep only the newest this many checkpoints (0: keep all).
        eval_steps: Evaluate every this many steps (0: when checkpointing, and at the end).
        logging_steps: Report progress every this many steps (the last step always reports).
        seed: Seeds the split, the shuffle and the adapter initialisation.
        warmup_steps: Linear warm-up steps of the learning rate.
        lr_scheduler_type: ``linear`` (decay to 0), ``cosine`` or ``constant`` after warm-up.
        weight_decay: AdamW weight decay.
        max_grad_norm: Gradient clipping (DeepSpeed ``gradient_clipping`` unless the config
            sets it).
        train_on_inputs: Also learn the prompt tokens (default: only the response is learned).
    """

    num_train_epochs: float = _default("num_train_epochs")
    max_steps: int = _default("max_steps")
    learning_rate: float | None = _default("learning_rate")
    per_device_train_batch_size: int = _default("per_device_train_batch_size")
    gradient_accumulation_steps: int = _default("gradient_accumulation_steps")
    cutoff_len: int = _default("cutoff_len")
    val_set_size: float = _default("val_set_size")
    save_steps: int = _default("save_steps")
    save_total_limit: int = _default("save_total_limit")
    eval_steps: int = _default("eval_steps")
    logging_steps: int = _default("logging_steps")
    seed: int = _default("seed")
    warmup_steps: int = _default("warmup_steps")
    lr_scheduler_type: str = _default("lr_scheduler_type")
    weight_decay: float = _default("weight_decay")
    max_grad_norm: float = _default("max_grad_norm")
    train_on_inputs: bool = _default("train_on_inputs")


# The table and this class name the same settings (the table is the contract).
assert {f.name for f in dataclasses.fields(Hyperparameters)} == set(HYPERPARAMETERS)


def _fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _bad(key: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"job spec field '{key}' {why}")


def _as_int(key: str, v: Any, *, minimum: int = 0) -> int:
    if isinstance(v, bool):
        raise _bad(key, f"must be an integer, not {v!r}")
    if isinstance(v, str):
        try:
            v = int(v.strip())
        except ValueError:
            raise _bad(key, f"must be an integer, not {v!r}") from None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int):
        raise _bad(key, f"must be an integer, not {v!r}")
    if v < minimum:
        raise _bad(key, f"must be >= {minimum}, got {v}")
    return v


def _as_float(key: str, v: Any, *, minimum: float = 0.0) -> float:
    if isinstance(v, bool):
        raise _bad(key, f"must be a number, not {v!r}")
    if isinstance(v, str):
        try:
            v = float(v.strip())
        except ValueError:
            raise _bad(key, f"must be a number, not {v!r}") from None
    if not isinstance(v, (int, float)) or v != v:  # NaN check
        raise _bad(key, f"must be a number, not {v!r}")
    if v < minimum:
        raise _bad(key, f"must be >= {minimum}, got {v}")
    return float(v)


def _as_bool(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return v.strip().lower() in ("true", "1", "yes")
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise _bad(key, f"must be true or false, not {v!r}")


def _as_str(key: str, v: Any, *, allow_none: bool = True) -> str | None:
    if v is None and allow_none:
        return None
    if isinstance(v, Path):
        return str(v)
    if not isinstance(v, str) or not v.strip():
        raise _bad(key, f"must be a non-empty string, not {v!r}")
    return v


def _as_choice(key: str, v: Any, choices: tuple[str, ...]) -> str:
    s = v.strip().lower() if isinstance(v, str) else v
    if s not in choices:
        raise _bad(key, f"must be one of {', '.join(choices)}; got {v!r}")
    return s


def _as_ds_config(key: str, v: Any) -> dict[str, Any]:
    """A dict, a JSON string (Byzer-LLM's ``json_config``) or a path to a JSON file."""
    if v is None:
        return {}
    if isinstance(v, Path):
        v = str(v)
    if isinstance(v, str):
        s = v.strip()
        if not s:
            return {}
        if not s.startswith("{"):
            path = Path(s).expanduser()
            if not path.is_file():
                raise _bad(key, f"must be a JSON object or a path to a JSON file; {s!r} is neither")
            s = path.read_text()
        try:
            v = json.loads(s)
        except ValueError as exc:
            raise _bad(key, f"is not valid JSON ({exc})") from None
    if not isinstance(v, Mapping):
        raise _bad(key, f"must be a JSON object with DeepSpeed settings, not {type(v).__name__}")
    return dict(v)


def _parse_hp(raw: Mapping[str, Any], origins: Mapping[str, str]) -> Hyperparameters:
    """The typed hyperparameters, checked by the rules of the one table.

    ``origins`` maps each key to how the user spelled its place (``hyperparameters.x`` or a
    flat ``x``), so errors point at what they wrote.
    """
    hp = Hyperparameters()
    values: dict[str, Any] = {}
    for key, value in raw.items():
        where = origins.get(key, f"hyperparameters.{key}")
        if key in HYPERPARAMETER_ALIASES:
            raise alias_error(f"job spec field {where!r}", key, HYPERPARAMETER_ALIASES[key])
        if key not in HYPERPARAMETERS:
            raise _bad(where, f"is not a known hyperparameter; known: {', '.join(HYPERPARAMETERS)}")
        if key == "learning_rate" and value is None:
            continue  # None: the default for what is trained
        values[key] = hyperparameter_value(key, value, f"job spec field {where!r}")
        setattr(hp, key, values[key])
    check_epochs(values, "job spec field 'hyperparameters.num_train_epochs'")
    return hp


def _parse_lora(raw: Mapping[str, Any], origins: Mapping[str, str]) -> LoraSpec:
    lora = LoraSpec()
    for key, value in raw.items():
        where = origins.get(key, f"lora.{key}")
        if key in LORA_ALIASES:
            raise alias_error(f"job spec field {where!r}", key, f"lora.{LORA_ALIASES[key]}")
        name = key
        if name == "r":
            lora.r = _as_int(where, value, minimum=1)
        elif name == "alpha":
            lora.alpha = _as_int(where, value, minimum=1)
        elif name == "dropout":
            lora.dropout = _as_float(where, value)
            if lora.dropout >= 1:
                raise _bad(where, f"must be below 1, got {value}")
        elif name == "target_modules":
            lora.target_modules = target_modules_value(f"job spec field {where!r}", value)
        else:
            raise _bad(where, f"is not a LoRA setting; known: {', '.join(LORA_FIELDS)}")
    return lora


@dataclasses.dataclass
class JobSpec:
    """One training job: kind, inputs, outputs and how to train.

    Build it with :meth:`from_dict` (validates; canonical names only); ``to_dict``
    round-trips. Paths are kept as given; :func:`llmesh.trainer_worker.runner.launch` checks
    that they exist before starting any process.

    Args:
        job_id: Unique job name (letters, digits, ``._-``); also marks the job's processes.
        kind: ``sft`` (fine-tune on prompt/response rows), ``pretrain`` (causal LM on raw text)
            or ``merge_lora`` (fold an adapter into its base model).
        output_dir: Where events, checkpoints and the artifact go.
        base_model_path: HuggingFace model directory (sft, merge_lora; pretrain: optional
            starting weights instead of ``model_config``).
        data_path: ``data.jsonl`` or a directory holding it (pretrain: a .txt file, a directory
            of .txt files, or a jsonl file with a ``text`` field per row).
        adapter_path: The LoRA adapter directory to merge (merge_lora).
        method: ``lora`` or ``full``; ``None`` picks lora for sft and full for pretrain.
        lora: Adapter shape (method lora).
        hyperparameters: Training loop settings.
        template: Prompt format for sft rows: ``auto`` (alpaca rows use the alpaca prompt, chat
            rows the tokenizer's chat template), ``alpaca``, or ``chat`` (alpaca rows are
            rendered as a user/assistant exchange through the chat template).
        deepspeed_config: DeepSpeed JSON config, passed through; batch-size keys, gradient
            clipping and logging are filled in only when absent.
        num_ranks: Training processes (one per GPU; on CPU, one per core group).
        model_config: Pretrain: a dict for ``AutoConfig`` (with ``model_type``) or a path to a
            ``config.json``.
        tokenizer_path: Pretrain: tokenizer directory (defaults to ``base_model_path``).
        resume: Continue from the newest checkpoint in ``output_dir`` if there is one.
        threads_per_rank: Intra-op threads per rank; 0 shares this machine's cores evenly.
    """

    job_id: str
    kind: str
    output_dir: str
    base_model_path: str | None = None
    data_path: str | None = None
    adapter_path: str | None = None
    method: str | None = None
    lora: LoraSpec = dataclasses.field(default_factory=LoraSpec)
    hyperparameters: Hyperparameters = dataclasses.field(default_factory=Hyperparameters)
    template: str = "auto"
    deepspeed_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    num_ranks: int = 1
    model_config: dict[str, Any] | str | None = None
    tokenizer_path: str | None = None
    resume: bool = True
    threads_per_rank: int = 0

    # -- derived ------------------------------------------------------------------------------

    @property
    def training_method(self) -> str:
        """``lora`` or ``full``, with the kind's default applied."""
        if self.method:
            return self.method
        return "full" if self.kind == "pretrain" else "lora"

    @property
    def learning_rate(self) -> float:
        """The configured learning rate, or the default for what is trained."""
        if self.hyperparameters.learning_rate is not None:
            return self.hyperparameters.learning_rate
        if self.kind == "pretrain" and self.base_model_path is None:
            return DEFAULT_LR["pretrain"]
        return DEFAULT_LR[self.training_method]

    # -- (de)serialisation --------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobSpec:
        """Validate a job spec and fill in defaults.

        Accepts hyperparameter and LoRA keys either nested (``hyperparameters``, ``lora``) or
        flat at the top level (of LoRA, only ``target_modules``), under the canonical names of
        :mod:`llmesh.common.training_spec`.

        Raises:
            InvalidArgument: naming the first bad or unknown key and what it should be.
        """
        if not isinstance(data, Mapping):
            raise InvalidArgument(f"a job spec must be a JSON object, not {type(data).__name__}")
        top: dict[str, Any] = {}
        hp_raw: dict[str, Any] = {}
        lora_raw: dict[str, Any] = {}
        spec_fields = _fields(cls)
        origins: dict[str, str] = {}

        def put(target: dict[str, Any], key: str, value: Any, origin: str) -> None:
            if key in target:
                raise _bad(origin, f"sets {key!r} a second time (flat and nested)")
            target[key] = value
            origins[key] = origin

        for key, value in data.items():
            if not isinstance(key, str):
                raise InvalidArgument(f"job spec keys must be strings, got {key!r}")
            if key == "hyperparameters":
                if not isinstance(value, Mapping):
                    raise _bad(key, "must be an object of training settings")
                for k, v in value.items():
                    put(hp_raw, k, v, f"hyperparameters.{k}")
            elif key == "lora":
                if value is None:
                    continue
                if not isinstance(value, Mapping):
                    raise _bad(key, "must be an object with r, alpha, dropout, target_modules")
                for k, v in value.items():
                    put(lora_raw, k, v, f"lora.{k}")
            elif key in spec_fields:
                put(top, key, value, key)
            elif key in HYPERPARAMETERS or key in HYPERPARAMETER_ALIASES:
                put(hp_raw, key, value, key)  # an alias is refused with its canonical name
            elif key in LORA_ALIASES or key == "target_modules":
                put(lora_raw, key, value, key)
            elif key in FIELD_ALIASES:
                raise alias_error(f"job spec field {key!r}", key, FIELD_ALIASES[key])
            else:
                known = sorted({*spec_fields, *HYPERPARAMETERS, "target_modules"})
                raise _bad(key, f"is not a known setting; known: {', '.join(known)}")

        for required in ("job_id", "kind", "output_dir"):
            if top.get(required) in (None, ""):
                raise _bad(required, "is required")
        job_id = _as_str("job_id", top["job_id"], allow_none=False)
        assert job_id is not None
        if not _JOB_ID.match(job_id):
            raise _bad(
                "job_id",
                f"must be 1-128 letters, digits, '.', '_' or '-' (starting with a letter or "
                f"digit), got {job_id!r}",
            )
        kind = _as_choice("kind", top["kind"], KINDS)
        hp = _parse_hp(hp_raw, origins)
        num_ranks = _as_int("num_ranks", top.get("num_ranks", 1), minimum=1)
        method = top.get("method")
        if method is not None:
            method = _as_choice("method", method, (*METHODS, "lora_sft", "full_sft"))
            method = {"lora_sft": "lora", "full_sft": "full"}.get(method, method)
        model_config = top.get("model_config")
        if model_config is not None and not isinstance(model_config, (Mapping, str, Path)):
            raise _bad("model_config", "must be an object for AutoConfig or a path to config.json")
        if isinstance(model_config, Mapping):
            model_config = dict(model_config)
        elif model_config is not None:
            model_config = str(model_config)

        spec = cls(
            job_id=job_id,
            kind=kind,
            output_dir=str(_as_str("output_dir", top["output_dir"], allow_none=False)),
            base_model_path=_as_str("base_model_path", top.get("base_model_path")),
            data_path=_as_str("data_path", top.get("data_path")),
            adapter_path=_as_str("adapter_path", top.get("adapter_path")),
            method=method,
            lora=_parse_lora(lora_raw, origins),
            hyperparameters=hp,
            template=_as_choice("template", top.get("template", "auto"), TEMPLATES),
            deepspeed_config=_as_ds_config("deepspeed_config", top.get("deepspeed_config")),
            num_ranks=num_ranks,
            model_config=model_config,
            tokenizer_path=_as_str("tokenizer_path", top.get("tokenizer_path")),
            resume=_as_bool("resume", top.get("resume", True)),
            threads_per_rank=_as_int("threads_per_rank", top.get("threads_per_rank", 0)),
        )
        spec._check_kind()
        return spec

    def _check_kind(self) -> None:
        """Cross-field rules that depend on the kind of job."""
        if self.kind == "sft":
            for key in ("base_model_path", "data_path"):
                if not getattr(self, key):
                    raise _bad(key, "is required for an sft job")
        elif self.kind == "pretrain":
            if not self.data_path:
                raise _bad("data_path", "is required for a pretrain job (.txt, dir or jsonl)")
            if self.model_config is None and self.base_model_path is None:
                raise _bad(
                    "model_config",
                    "is required for a pretrain job (an AutoConfig dict or a config.json path), "
                    "unless base_model_path gives weights to continue from",
                )
            if self.model_config is not None and self.base_model_path is not None:
                raise _bad("model_config", "and base_model_path exclude each other; set one")
            if self.tokenizer_path is None and self.base_model_path is None:
                raise _bad("tokenizer_path", "is required for a pretrain job from model_config")
            if self.model_config is not None and self.method == "lora":
                raise _bad("method", "must be full when pretraining from model_config")
        else:  # merge_lora
            for key in ("base_model_path", "adapter_path"):
                if not getattr(self, key):
                    raise _bad(key, "is required for a merge_lora job")
        if self.kind == "pretrain" and self.template != "auto":
            raise _bad("template", "applies to sft rows only; leave it out for pretrain")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that :meth:`from_dict` reads back to an equal spec."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """``to_dict`` as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: str | Path) -> JobSpec:
        """Read and validate a spec JSON file."""
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise InvalidArgument(f"cannot read job spec {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise InvalidArgument(f"job spec {path} is not valid JSON: {exc}") from None
        return cls.from_dict(data)


def resolve_batch_config(
    ds_config: dict[str, Any], *, micro: int, accumulation: int, world: int
) -> tuple[dict[str, Any], int, int]:
    """Fill the batch keys of a user's DeepSpeed config and resolve them as DeepSpeed will.

    The user's keys win: when ``train_batch_size`` is given, we add nothing and DeepSpeed derives
    the rest from it; otherwise the job's micro batch and accumulation fill whichever of the two
    is missing. Returns (config, micro batch per rank, accumulation steps).

    Raises:
        InvalidArgument: the config's batch sizes do not fit the number of ranks.
    """
    cfg = dict(ds_config)
    tb = cfg.get("train_batch_size")
    if tb is None:
        cfg.setdefault("train_micro_batch_size_per_gpu", micro)
        cfg.setdefault("gradient_accumulation_steps", accumulation)
    mb = cfg.get("train_micro_batch_size_per_gpu")
    gas = cfg.get("gradient_accumulation_steps")
    try:
        if tb is not None and mb is not None and gas is None:
            gas = int(tb) // (int(mb) * world)
        elif tb is not None and gas is not None and mb is None:
            mb = int(tb) // (int(gas) * world)
        elif tb is not None and mb is None and gas is None:
            mb, gas = int(tb) // world, 1
        mb, gas = int(mb), int(gas)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidArgument(
            "deepspeed_config batch keys (train_batch_size, train_micro_batch_size_per_gpu, "
            "gradient_accumulation_steps) must be integers"
        ) from None
    if mb < 1 or gas < 1 or (tb is not None and int(tb) != mb * gas * world):
        raise InvalidArgument(
            f"deepspeed_config train_batch_size {tb} does not equal "
            f"train_micro_batch_size_per_gpu x gradient_accumulation_steps x ranks "
            f"({mb} x {gas} x {world}); fix the config or leave train_batch_size out"
        )
    return cfg, mb, gas
