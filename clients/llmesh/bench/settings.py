"""What one benchmark run measures and how: the modes, the presets, and :class:`BenchSettings`
(the resolved options, with the engine settings every vLLM mode shares)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

#: Modes in report order, with the label the tables and the chart use.
MODES: dict[str, str] = {
    "asyncllm": "in-process AsyncLLM",
    "mesh-vllm": "mesh (vllm)",
    "vllm-serve": "vllm serve (HTTP)",
    "gateway": "llmesh gateway (HTTP) -> mesh (vllm)",
    "mesh-transformers": "mesh (transformers)",
}

#: Defaults for a real machine, and the ``--quick`` preset for smoke runs.
DEFAULTS: dict[str, Any] = {
    "concurrency": [1, 8, 32, 128],
    "num_requests": None,  # per level: max(16, 4 x concurrency)
    "input_len": 512,
    "output_len": 128,
    "warmup": 4,
}
QUICK: dict[str, Any] = {
    "concurrency": [1, 4],
    "num_requests": 4,
    "input_len": 32,
    "output_len": 16,
    "warmup": 1,
}

#: The model name every mode serves under.
BENCH_MODEL = "bench"


@dataclasses.dataclass
class BenchSettings:
    """Everything one run needs, resolved from the command line."""

    model: Path
    model_desc: str
    modes: list[str]
    concurrency: list[int]
    num_requests: dict[int, int]
    request_rate: float
    input_len: int
    output_len: int
    ignore_eos: bool
    seed: int
    warmup: int
    max_num_seqs: int
    max_model_len: int
    gpu_memory_utilization: float
    dtype: str
    enforce_eager: bool
    out: Path
    name: str
    startup_timeout: float
    command: str

    def requests_for(self, concurrency: int) -> int:
        """Requests at one level: from ``--num-requests``, else max(16, 4 x concurrency)."""
        return self.num_requests.get(concurrency) or max(16, 4 * concurrency)

    def vllm_infer_params(self) -> dict[str, str]:
        """infer_params for the mesh's vllm backend that match the in-process engine args."""
        return {
            "max_concurrency": str(max(self.concurrency)),
            "max_num_seqs": str(self.max_num_seqs),
            "max_model_len": str(self.max_model_len),
            "gpu_memory_utilization": str(self.gpu_memory_utilization),
            "dtype": self.dtype,
            "enforce_eager": str(self.enforce_eager).lower(),
        }

    def vllm_engine_kwargs(self) -> dict[str, Any]:
        """AsyncEngineArgs for in-process AsyncLLM: what the mesh's vllm engine builds from
        :meth:`vllm_infer_params` (see ``llmesh.inference_worker.engines.vllm_engine``)."""
        return {
            "model": str(self.model),
            "tokenizer": str(self.model),
            "served_model_name": BENCH_MODEL,
            "dtype": self.dtype,
            "tensor_parallel_size": 1,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_num_seqs": self.max_num_seqs,
            "max_model_len": self.max_model_len,
            "enable_lora": False,
            "enforce_eager": self.enforce_eager,
            "enable_log_requests": False,
            "disable_log_stats": True,
        }

    def vllm_serve_args(self, port: int) -> list[str]:
        """The OpenAI server's command line with the same engine settings."""
        return [
            *("--model", str(self.model), "--served-model-name", BENCH_MODEL),
            *("--host", "127.0.0.1", "--port", str(port)),
            *("--dtype", self.dtype, "--tensor-parallel-size", "1"),
            *("--gpu-memory-utilization", str(self.gpu_memory_utilization)),
            *("--max-num-seqs", str(self.max_num_seqs)),
            *("--max-model-len", str(self.max_model_len)),
            "--enforce-eager" if self.enforce_eager else "--no-enforce-eager",
            # Like the mesh: no per-request or periodic stats logging on the serving path.
            "--disable-log-stats",
            "--disable-uvicorn-access-log",
        ]

    def sampling(self) -> dict[str, Any]:
        """The one sampling setup: greedy, exactly ``output_len`` tokens with ignore_eos."""
        return {
            "temperature": 0.0,
            "max_tokens": self.output_len,
            "ignore_eos": self.ignore_eos,
        }
