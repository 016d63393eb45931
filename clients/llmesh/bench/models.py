"""The models ``llmesh bench`` builds when ``--model`` is not given (``--model-preset``), cached
under ``--cache-dir``."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


def cache_dir(given: str | None) -> Path:
    """Where preset models are built: ``given``, else ``$XDG_CACHE_HOME/llmesh/bench``.

    Args:
        given: ``--cache-dir``, or None.
    """
    if given:
        return Path(given).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llmesh" / "bench"


def bench_model(preset: str, cache: Path) -> tuple[Path, str]:
    """Build (once, cached) the preset model; returns its path and a description.

    ``tiny`` is the llmesh test model (Llama, 2 layers, hidden 128, trained a little on a toy
    corpus). ``small`` is a random Llama with the test model's tokenizer, 8 layers, hidden 1024
    (about 100M parameters): enough work per token that engine time, not Python overhead,
    dominates on a CPU.

    Args:
        preset: ``tiny`` or ``small``.
        cache: the directory the models are built in (see :func:`cache_dir`).
    """
    from llmesh.testing import make_test_model

    base = make_test_model(cache / "tiny-llama")
    if preset == "tiny":
        return base, "llmesh test model (Llama, 2 layers, hidden 128, vocab 1.5k)"
    out = cache / "small-llama"
    desc = "random Llama, 8 layers, hidden 1024, head_dim 128 (~100M parameters, float32)"
    if (out / "config.json").exists():
        return out, desc
    import shutil

    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(base)
    config.update(
        {
            "hidden_size": 1024,
            "intermediate_size": 2816,
            "num_hidden_layers": 8,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "torch_dtype": "float32",
        }
    )
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix=".small-llama-", dir=cache))
    LlamaForCausalLM(config).save_pretrained(tmp)
    for f in base.iterdir():  # tokenizer, chat template, generation config
        if (
            f.is_file()
            and f.name not in ("config.json", "model.safetensors")
            and (not f.name.startswith("."))
        ):
            shutil.copy(f, tmp / f.name)
    os.replace(tmp, out)
    return out, desc


def model_max_len(model: Path) -> int | None:
    """The model's context length from its config.json (``max_position_embeddings``).

    Args:
        model: a HuggingFace-layout model directory.

    Returns:
        The length, or None when the config does not say (or cannot be read).
    """
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((model / "config.json").read_text())
        value = config.get("max_position_embeddings")
        return int(value) if value else None
    return None
