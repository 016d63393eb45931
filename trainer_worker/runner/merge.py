"""Fold a LoRA adapter into its base model: ``python -m llmesh.trainer_worker.runner.merge --spec``.

One process, no launcher: the merge is a weight update per adapted layer. The result is a plain
HuggingFace model directory (``{output_dir}/model``) that any engine loads without PEFT, with the
tokenizer next to it (the adapter's copy if it has one, else the base model's).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import traceback
from pathlib import Path

from llmesh.common.errors import InvalidArgument
from llmesh.common.process import die_with_parent
from llmesh.trainer_worker.runner.artifacts import MODEL_DIR, atomic_dir, copy_tokenizer_files
from llmesh.trainer_worker.runner.events import EventType, EventWriter, JobState
from llmesh.trainer_worker.runner.spec import JobSpec


def merge(spec: JobSpec, events: EventWriter) -> Path:
    """Merge ``spec.adapter_path`` into ``spec.base_model_path``; returns the model directory."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert spec.base_model_path and spec.adapter_path
    events.emit(EventType.STATE, state=JobState.RUNNING, ranks=1)
    threads = spec.threads_per_rank
    if threads > 0:
        torch.set_num_threads(threads)
    # The base model's own dtype: merging must not silently up- or down-cast the weights.
    base = AutoModelForCausalLM.from_pretrained(spec.base_model_path, dtype="auto")
    events.emit(EventType.LOG, line=f"loaded base model {spec.base_model_path}")
    model = PeftModel.from_pretrained(base, spec.adapter_path)
    merged = model.merge_and_unload()
    events.emit(EventType.LOG, line=f"merged adapter {spec.adapter_path}")
    final = Path(spec.output_dir) / MODEL_DIR
    with atomic_dir(final) as tmp:
        merged.save_pretrained(tmp)
        adapter, base_dir = Path(spec.adapter_path), Path(spec.base_model_path)
        if not copy_tokenizer_files(adapter, tmp):
            copy_tokenizer_files(base_dir, tmp)
        gen = base_dir / "generation_config.json"
        if gen.is_file() and not (tmp / gen.name).exists():
            shutil.copy2(gen, tmp / gen.name)
    events.emit(EventType.ARTIFACT, kind="full_model", path=str(final))
    events.emit(EventType.DONE)
    return final


def main(argv: list[str] | None = None) -> int:
    """Run the merge job described by ``--spec``; returns the exit code."""
    die_with_parent()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True, help="the job spec JSON file")
    args = parser.parse_args(argv)
    spec = JobSpec.load(args.spec)
    events = EventWriter(spec.output_dir)
    try:
        merge(spec, events)
    except Exception as exc:  # noqa: BLE001 - reported as the job's failure reason
        traceback.print_exc()
        reason = str(exc) if isinstance(exc, InvalidArgument) else f"{type(exc).__name__}: {exc}"
        events.emit(EventType.ERROR, reason=reason, rank=0)
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    # Everything is on disk; skip the seconds-long interpreter teardown of torch (see train.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
