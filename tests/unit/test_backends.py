"""The backends table: accepted infer_params keys, typed values and the sentences refusing them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llmesh.common.backends import (
    AUTO_BACKENDS,
    AUTO_CAUSAL_BACKENDS,
    BACKENDS,
    ENGINE_BACKENDS,
    INFER_PARAMS,
    accepted_keys,
    check_infer_params,
)
from llmesh.common.errors import InvalidArgument


def refusal(backend: str, params: dict[str, str], **kwargs: object) -> str:
    with pytest.raises(InvalidArgument) as err:
        check_infer_params(backend, params, **kwargs)  # type: ignore[arg-type]
    return str(err.value)


def test_every_backend_has_a_table_with_descriptions() -> None:
    assert set(INFER_PARAMS) == set(BACKENDS)
    for backend in BACKENDS:
        for key, param in INFER_PARAMS[backend].items():
            assert param.description and param.accepts, (backend, key)
            assert "\n" not in param.description
        assert "max_concurrency" in accepted_keys(backend)


def test_auto_accepts_the_keys_of_every_backend_it_may_pick() -> None:
    union = {k for b in AUTO_BACKENDS for k in accepted_keys(b)}
    assert set(accepted_keys("auto")) == union
    # transformers' and vLLM's keys, as auto took them before the table existed.
    assert {k for b in ("transformers", "vllm") for k in accepted_keys(b)} <= union
    assert set(AUTO_CAUSAL_BACKENDS) <= set(ENGINE_BACKENDS)
    assert "deepspeed" not in AUTO_BACKENDS


def test_values_come_back_typed() -> None:
    params = {
        "max_concurrency": " 4 ",
        "max_model_len": "1024",
        "dtype": "HALF",
        "device": "Cuda:1",
        "torch_threads": "2",
    }
    assert check_infer_params("transformers", params) == {
        "max_concurrency": 4,
        "max_model_len": 1024,
        "dtype": "float16",
        "device": "cuda:1",
        "torch_threads": 2,
    }
    vllm = {
        "gpu_memory_utilization": "0.25",
        "enable_lora": "Yes",
        "enforce_eager": "0",
        "max_lora_rank": "8",
        "dtype": "bf16",
    }
    assert check_infer_params("vllm", vllm) == {
        "gpu_memory_utilization": 0.25,
        "enable_lora": True,
        "enforce_eager": False,
        "max_lora_rank": 8,
        "dtype": "bfloat16",
    }
    assert check_infer_params("embedding", {"batch_size": "16"}) == {"batch_size": 16}
    assert check_infer_params("deepspeed", {"kernel_inject": "true"}) == {"kernel_inject": True}


def test_empty_values_are_unset() -> None:
    assert check_infer_params("vllm", {"max_concurrency": "", "dtype": "  "}) == {}
    assert check_infer_params("transformers", {}) == {}


def test_unknown_key_names_it_suggests_the_close_one_and_lists_the_accepted() -> None:
    message = refusal("transformers", {"max_concurency": "4"}, model="chat")
    assert message.startswith(
        "unknown infer_params key 'max_concurency' for backend 'transformers' (model chat); "
        "did you mean 'max_concurrency'? Accepted keys: max_concurrency, max_model_len,"
    )
    message = refusal("embedding", {"pooling": "cls"})
    assert "unknown infer_params key 'pooling' for backend 'embedding';" in message
    assert "remove it or use one of the accepted keys: max_concurrency, device" in message
    # A key of another backend is still unknown to this one.
    assert "'gpu_memory_utilization' for backend 'transformers'" in refusal(
        "transformers", {"gpu_memory_utilization": "0.5"}
    )


@pytest.mark.parametrize(
    ("backend", "params", "expected"),
    [
        (
            "transformers",
            {"max_concurrency": "many"},
            "infer_params max_concurrency='many' is not an integer; give a whole number >= 1. "
            "max_concurrency (backend 'transformers', model chat): requests decoded at once",
        ),
        (
            "vllm",
            {"max_num_seqs": "0"},
            "infer_params max_num_seqs=0 is too small; it must be >= 1",
        ),
        (
            "vllm",
            {"gpu_memory_utilization": "1.5"},
            "gpu_memory_utilization=1.5 is out of range; give a number in (0, 1]",
        ),
        (
            "vllm",
            {"gpu_memory_utilization": "lots"},
            "gpu_memory_utilization='lots' is not a number; give a number in (0, 1]",
        ),
        ("vllm", {"gpu_memory_utilization": "nan"}, "gpu_memory_utilization=nan is out of range"),
        (
            "vllm",
            {"enable_lora": "maybe"},
            "enable_lora='maybe' is not a boolean; use true or false",
        ),
        ("vllm", {"dtype": "int3"}, "dtype='int3' is not supported; use one of auto, bf16,"),
        ("transformers", {"device": "tpu"}, "device='tpu' is not a device; use cpu, cuda, cuda:N"),
        (
            "vllm",
            {"enable_lora": "true", "max_lora_rank": "24"},
            "max_lora_rank=24 is not one vLLM supports; use one of 1, 8, 16,",
        ),
        (
            "vllm",
            {"max_loras": "2"},
            "infer_params max_loras only applies with enable_lora=true; add enable_lora=true or "
            "drop max_loras (backend 'vllm', model chat)",
        ),
        (
            "deepspeed",
            {"tensor_parallel_size": "2"},
            "tensor_parallel_size=2 is not supported by the deepspeed backend yet",
        ),
        ("deepspeed", {"kernel_inject": "maybe"}, "kernel_inject='maybe' is not a boolean"),
    ],
)
def test_ill_typed_values_are_named_with_what_is_accepted(
    backend: str, params: dict[str, str], expected: str
) -> None:
    assert expected in refusal(backend, params, model="chat")


def test_transformers_takes_any_lora_rank_and_lora_keys_without_a_switch() -> None:
    # vLLM's rank set and its enable_lora switch are vLLM's own rules.
    assert check_infer_params("transformers", {"max_lora_rank": "24", "max_loras": "2"}) == {
        "max_lora_rank": 24,
        "max_loras": 2,
    }


def test_auto_takes_a_value_any_candidate_takes() -> None:
    # 24 is no vLLM rank but transformers takes it; which engine runs is decided at load.
    assert check_infer_params("auto", {"max_lora_rank": "24", "batch_size": "3"}) == {
        "max_lora_rank": 24,
        "batch_size": 3,
    }
    assert "max_lora_rank='x' is accepted by none of vllm, transformers" in refusal(
        "auto", {"max_lora_rank": "x"}
    )
    # Once the model is known to be a causal LM, embedding-only keys are refused.
    message = refusal("auto", {"batch_size": "3"}, model="m", among=AUTO_CAUSAL_BACKENDS)
    assert message.startswith(
        "unknown infer_params key 'batch_size' for backend 'auto' "
        "(model m; choosing among vllm, transformers)"
    )


def test_unknown_backend() -> None:
    with pytest.raises(InvalidArgument, match="unknown backend 'tensorflow'; valid backends"):
        check_infer_params("tensorflow", {})


def test_importing_the_table_imports_no_engine_library() -> None:
    code = (
        "import sys, llmesh.common.backends as b; b.check_infer_params('vllm', {'dtype': 'half'}); "
        "bad = {'torch', 'vllm', 'transformers'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
