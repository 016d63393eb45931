"""LoRA adapters served unmerged on a shared model, chosen per request.

PEFT's own multi-adapter switching is unsafe for the transformers engine: ``set_adapter`` is
global to the model, and its ``adapter_names=`` forward registers hooks for the length of one
forward pass, while requests with different adapters share one model, whose step loop
switches adapters from one forward pass to the next (and adapters load meanwhile).
So adapters are applied here instead:

* :func:`read_adapter_config` checks a PEFT adapter directory (``adapter_config.json``) and
  refuses what we cannot serve unmerged (DoRA, LoRA bias, trained extra modules, initialisations
  that change the base weights, ...). The vLLM engine uses it too, to fail early and clearly.
* :func:`load_adapter` reads the weights (``adapter_model.safetensors`` or ``.bin``), matches
  them to the model's linear layers and puts them on the layers' device and dtype.
* :func:`install` wraps each targeted layer once with :class:`LoraLinear`, which adds
  ``scale * B(A(x))`` for the adapter the calling thread has made current with
  :func:`activate`; without one it returns the base layer's output untouched (bit-identical).

Adapters are immutable once loaded: an engine publishes and withdraws them by swapping its
name -> adapter mapping, and a request keeps a reference to its adapter for its lifetime, so
removing an adapter never changes a request that is already decoding.

Imports torch; engines import this module only when adapters are used.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmesh.common.errors import FailedPrecondition, InvalidArgument

__all__ = [
    "CONFIG_FILE",
    "AdapterConfig",
    "LoraAdapter",
    "LoraLinear",
    "LoraWeights",
    "activate",
    "check_name",
    "check_rank",
    "install",
    "load_adapter",
    "read_adapter_config",
]

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# PEFT prefixes every key of a saved LoRA with the PeftModel's path to the base model.
_KEY_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
# Adapter names travel as model names (and comma-joined in meta); same alphabet as model names.
_NAME = re.compile(r"[A-Za-z0-9._-]+")
# init_lora_weights values that leave the base weights alone (PiSSA, OLoRA, CorDA and LoftQ
# rewrite them when PEFT loads the adapter, which an unmerged shared base cannot do).
_INITS_KEEPING_BASE = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")

# The adapter the current thread's forward passes use; None means the base model.
_CURRENT: contextvars.ContextVar[LoraAdapter | None] = contextvars.ContextVar(
    "llmesh_lora", default=None
)
# Serialises wrapping layers: two adapters loading at once must not both wrap one layer.
_INSTALL_LOCK = threading.Lock()


def check_name(name: str) -> str:
    """An adapter name as given, or InvalidArgument when it cannot be one."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        raise InvalidArgument(
            f"adapter name {name!r} is not valid: use only letters, digits, '.', '_' and '-'"
        )
    return name


@dataclass(frozen=True)
class AdapterConfig:
    """What :func:`read_adapter_config` found in ``adapter_config.json``."""

    path: str
    r: int
    lora_alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    target_modules: tuple[str, ...] | str = ()
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    weights_file: str = ""

    @property
    def max_rank(self) -> int:
        """The largest rank of any layer (``r`` or a ``rank_pattern`` override)."""
        return max([self.r, *self.rank_pattern.values()])

    def scale(self, module: str, rank: int) -> float:
        """PEFT's scaling for one layer: alpha / rank, or alpha / sqrt(rank) with rsLoRA.

        Args:
            module: The layer's name in the base model (``model.layers.0.self_attn.q_proj``),
                matched against ``alpha_pattern`` the way PEFT matches it.
            rank: The layer's rank (the shape of its A matrix).
        """
        alpha = self.lora_alpha
        for key, value in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({key})$", module):
                alpha = float(value)
                break
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _refuse(path: str, what: str) -> FailedPrecondition:
    return FailedPrecondition(f"LoRA adapter at {path!r} cannot be served: {what}")


def read_adapter_config(path: str) -> AdapterConfig:
    """Check a PEFT LoRA adapter directory and read its configuration (no weights, no torch).

    Args:
        path: The directory ``PeftModel.save_pretrained`` wrote.

    Raises:
        FailedPrecondition: naming the path and what is wrong: not a directory, no
            ``adapter_config.json`` or no weights file, not a LoRA adapter, or a LoRA feature
            that cannot be served unmerged on a shared base model.
    """
    path = os.path.abspath(os.path.expanduser(str(path or "")))
    if not os.path.isdir(path):
        raise _refuse(
            path,
            "it is not a directory on this worker; give the local directory "
            "that PeftModel.save_pretrained wrote",
        )
    config_file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_file):
        hint = (
            " (it looks like a full model; merged models deploy as models, not adapters)"
            if os.path.isfile(os.path.join(path, "config.json"))
            else ""
        )
        raise _refuse(path, f"it has no {CONFIG_FILE}, so it is not a PEFT adapter{hint}")
    try:
        with open(config_file, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        raise _refuse(path, f"{CONFIG_FILE} is not readable JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise _refuse(path, f"{CONFIG_FILE} is not a JSON object")
    peft_type = str(cfg.get("peft_type") or "")
    if peft_type.upper() != "LORA":
        raise _refuse(
            path, f"peft_type is {peft_type or 'missing'!r}; only LORA adapters can be loaded"
        )
    problems = _unsupported_features(cfg)
    if problems:
        raise _refuse(path, "; ".join(problems))
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise _refuse(path, f"r={r!r} in {CONFIG_FILE} is not a positive integer")
    alpha = cfg.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise _refuse(path, f"lora_alpha={alpha!r} in {CONFIG_FILE} is not a number")
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in rank_pattern.values()
    ):
        raise _refuse(path, f"rank_pattern in {CONFIG_FILE} must map names to positive ranks")
    if not isinstance(alpha_pattern, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in alpha_pattern.values()
    ):
        raise _refuse(path, f"alpha_pattern in {CONFIG_FILE} must map names to numbers")
    weights = next((w for w in WEIGHT_FILES if os.path.isfile(os.path.join(path, w))), "")
    if not weights:
        raise _refuse(path, f"it has {CONFIG_FILE} but no weights ({' or '.join(WEIGHT_FILES)})")
    targets = cfg.get("target_modules") or ()
    return AdapterConfig(
        path=path,
        r=r,
        lora_alpha=float(alpha),
        use_rslora=bool(cfg.get("use_rslora", False)),
        fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
        target_modules=targets if isinstance(targets, str) else tuple(str(t) for t in targets),
        rank_pattern={str(k): int(v) for k, v in rank_pattern.items()},
        alpha_pattern={str(k): float(v) for k, v in alpha_pattern.items()},
        weights_file=os.path.join(path, weights),
    )


def _unsupported_features(cfg: Mapping[str, Any]) -> list[str]:
    """Sentences for each PEFT option in ``cfg`` that unmerged serving cannot honour."""
    out: list[str] = []
    if cfg.get("use_dora"):
        out.append(
            "it is a DoRA adapter (use_dora=true), which is not supported; merge it into "
            "the base model with merge_lora and deploy the result instead"
        )
    if cfg.get("lora_bias"):
        out.append("it trains LoRA biases (lora_bias=true), which is not supported")
    bias = cfg.get("bias", "none")
    if bias not in (None, "none"):
        out.append(
            f"it trains the base model's biases (bias={bias!r}); only bias='none' adapters "
            "can share a base model"
        )
    if cfg.get("modules_to_save"):
        out.append(
            f"it saves whole trained modules (modules_to_save={cfg['modules_to_save']!r}), "
            "which would replace layers of the shared base model"
        )
    if cfg.get("trainable_token_indices"):
        out.append("it trains token embeddings (trainable_token_indices), which is not supported")
    if cfg.get("target_parameters"):
        out.append("it targets parameters directly (target_parameters), which is not supported")
    if cfg.get("layer_replication"):
        out.append("it replicates layers (layer_replication), which is not supported")
    for key, what in (
        ("use_qalora", "QALoRA"),
        ("use_bdlora", "block-diagonal LoRA"),
        ("alora_invocation_tokens", "activated LoRA (aLoRA)"),
        ("megatron_config", "Megatron-parallel LoRA"),
        ("arrow_config", "Arrow routing"),
    ):
        if cfg.get(key):
            out.append(f"{what} ({key}) is not supported")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _INITS_KEEPING_BASE:
        out.append(
            f"init_lora_weights={init!r} changes the base weights when PEFT loads the "
            "adapter; convert it to a plain LoRA (PEFT's "
            "path_initial_model_for_weight_conversion) first"
        )
    return out


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """One layer's low-rank update: ``out += scale * B(A(x))``."""

    a: torch.Tensor  # (rank, in_features)
    b: torch.Tensor  # (out_features, rank)
    scale: float


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """A loaded adapter: immutable, shared by every request that uses it."""

    name: str
    path: str
    rank: int
    weights: Mapping[str, LoraWeights]

    @property
    def modules(self) -> list[str]:
        """Names of the layers it changes."""
        return sorted(self.weights)


def _read_tensors(config: AdapterConfig) -> dict[str, torch.Tensor]:
    file = config.weights_file
    try:
        if file.endswith(".safetensors"):
            from safetensors.torch import load_file

            return dict(load_file(file, device="cpu"))
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - safetensors/unpickling errors: all "unreadable"
        raise _refuse(config.path, f"{os.path.basename(file)} is not readable ({exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _refuse(config.path, f"{os.path.basename(file)} is not a tensor state dict")
    return dict(state)


def _layer_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a layer LoRA can wrap, or None."""
    if isinstance(module, LoraLinear):
        module = module.base_layer
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    # GPT-2 style Conv1D: a linear layer storing its weight transposed (fan_in_fan_out).
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        nx, nf = module.weight.shape
        return int(nx), int(nf)
    return None


def check_rank(config: AdapterConfig, max_rank: int) -> None:
    """FailedPrecondition when the adapter's rank exceeds the engine's ``max_lora_rank``."""
    if config.max_rank > max_rank:
        raise _refuse(
            config.path,
            f"its rank is {config.max_rank} but this model accepts adapters of rank at most "
            f"{max_rank} (infer_params max_lora_rank); redeploy the model with a "
            f"max_lora_rank of at least {config.max_rank}",
        )


def load_adapter(
    name: str, config: AdapterConfig, model: nn.Module, *, max_rank: int | None = None
) -> LoraAdapter:
    """Read an adapter's weights and match them to ``model``'s layers.

    Blocking (file reads, tensor copies): call it from a thread.

    Args:
        name: The adapter's name.
        config: From :func:`read_adapter_config`.
        model: The base model the adapter will run on (wrapped layers are fine).
        max_rank: Largest rank accepted; None for no limit.

    Raises:
        FailedPrecondition: naming the path and what does not fit: rank above ``max_rank``,
            weights for layers the model does not have (an adapter for another base model),
            layers that are not linear, or shapes that differ from the model's.
    """
    path = config.path
    if max_rank is not None:
        check_rank(config, max_rank)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in _read_tensors(config).items():
        match = _KEY.match(key.removeprefix(_KEY_PREFIX))
        if match is None:
            raise _refuse(
                path,
                f"its weights contain {key!r}, which is not a LoRA A/B matrix "
                "of a linear layer (embedding LoRA, DoRA magnitudes and full "
                "module weights are not supported)",
            )
        pairs.setdefault(match["module"], {})[match["part"]] = tensor
    if not pairs:
        raise _refuse(path, f"{os.path.basename(config.weights_file)} holds no LoRA weights")
    modules = dict(model.named_modules())
    weights: dict[str, LoraWeights] = {}
    rank_seen = 0
    for module_name, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise _refuse(path, f"layer {module_name} has no {missing} weight")
        layer = modules.get(module_name)
        if layer is None:
            targets = config.target_modules
            shown = targets if isinstance(targets, str) else ", ".join(targets)
            raise _refuse(
                path,
                f"it targets layer {module_name}, which this model does not have "
                f"(target_modules: {shown}); it was trained for another base model",
            )
        shape = _layer_shape(layer)
        if shape is None:
            raise _refuse(
                path,
                f"it targets {module_name}, a {type(layer).__name__}; only "
                "linear layers can take a LoRA here",
            )
        a, b = ab["A"], ab["B"]
        rank = int(a.shape[0]) if a.dim() == 2 else -1
        if (
            a.dim() != 2
            or b.dim() != 2
            or a.shape[1] != shape[0]
            or tuple(b.shape)
            != (
                shape[1],
                rank,
            )
        ):
            raise _refuse(
                path,
                f"layer {module_name} has LoRA shapes A {tuple(a.shape)}, B "
                f"{tuple(b.shape)} but the model's layer maps {shape[0]} -> {shape[1]} "
                "features; it was trained for another base model",
            )
        if max_rank is not None and rank > max_rank:
            raise _refuse(
                path,
                f"layer {module_name} has rank {rank} but this model accepts "
                f"adapters of rank at most {max_rank} (infer_params max_lora_rank)",
            )
        rank_seen = max(rank_seen, rank)
        base = layer.base_layer if isinstance(layer, LoraLinear) else layer
        weight = base.weight
        # Same device and dtype as the layer, so the update needs no casts at decode time.
        weights[module_name] = LoraWeights(
            a=a.to(device=weight.device, dtype=weight.dtype).contiguous(),
            b=b.to(device=weight.device, dtype=weight.dtype).contiguous(),
            scale=config.scale(module_name, rank),
        )
    return LoraAdapter(name=name, path=path, rank=rank_seen, weights=weights)


class LoraLinear(nn.Module):
    """A linear layer plus the low-rank update of the current thread's adapter, if any.

    Args:
        base_layer: The wrapped ``nn.Linear`` (or Conv1D); its output is returned as is when
            the current adapter does not touch this layer.
        name: The layer's name in the model, the key adapters use for it.
    """

    def __init__(self, base_layer: nn.Module, name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.name = name

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        adapter = _CURRENT.get()
        if adapter is None:
            return result
        lora = adapter.weights.get(self.name)
        if lora is None:
            return result
        # PEFT's unmerged forward, op for op (dropout is the identity at inference), so greedy
        # output matches PeftModel's.
        dtype = result.dtype
        x = x.to(lora.a.dtype)
        return (result + F.linear(F.linear(x, lora.a), lora.b) * lora.scale).to(dtype)

    # Model code sometimes reads a projection's weight directly (its dtype, or the matrix for
    # a fused kernel); it gets the base layer's, as from PEFT's wrappers.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def install(model: nn.Module, adapter: LoraAdapter) -> int:
    """Wrap the layers ``adapter`` changes with :class:`LoraLinear` (each layer once, ever).

    Safe while other threads run forward passes: a layer is swapped in its parent with one
    attribute assignment, and a wrapper returns the base output for every adapter that does
    not touch its layer, so a forward pass sees the same numbers whichever object it finds.

    Returns:
        How many layers were newly wrapped.
    """
    added = 0
    with _INSTALL_LOCK:
        for module_name in adapter.weights:
            layer = model.get_submodule(module_name)
            if isinstance(layer, LoraLinear):
                continue
            parent_name, _, child = module_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LoraLinear(layer, module_name))
            added += 1
    return added


@contextlib.contextmanager
def activate(adapter: LoraAdapter | None) -> Iterator[None]:
    """Make ``adapter`` the one this thread's forward passes use (None: the base model)."""
    token = _CURRENT.set(adapter)
    try:
        yield
    finally:
        _CURRENT.reset(token)
