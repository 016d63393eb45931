"""One training rank: ``python -m llmesh.trainer_worker.runner.train --spec job.json``.

The DeepSpeed launcher starts one of these per rank with ``RANK`` / ``LOCAL_RANK`` /
``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` set. Every rank loads the same data and
model, DeepSpeed keeps them in step; rank 0 writes the job's events and the artifact. Supervised
fine-tuning (LoRA or full) and pretraining from a config share the loop; they differ in how the
model is built and how examples are made.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from llmesh.common.errors import InvalidArgument
from llmesh.common.process import die_with_parent
from llmesh.trainer_worker.runner.artifacts import (
    ADAPTER_DIR,
    CHECKPOINT_DIR,
    MODEL_DIR,
    atomic_dir,
    copy_tokenizer_files,
)
from llmesh.trainer_worker.runner.data import (
    IGNORE_INDEX,
    Example,
    check_template,
    encode_sft_row,
    load_pretrain_texts,
    load_sft_rows,
    pack_texts,
    split_rows,
)
from llmesh.trainer_worker.runner.events import EventType, EventWriter, JobState
from llmesh.trainer_worker.runner.launch import ds_shm_segment
from llmesh.trainer_worker.runner.spec import JobSpec, resolve_batch_config

# DeepSpeed's own step logging duplicates our progress events; keep it quiet unless asked.
_QUIET_STEPS_PER_PRINT = 10**9


def _default_target_modules(model: Any) -> list[str]:
    """Names of every linear layer except the output head: attention and MLP projections."""
    import torch

    head = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            names.add(name.rsplit(".", 1)[-1])
    if not names:
        raise InvalidArgument(
            "the model has no linear layers to put LoRA on; set lora.target_modules"
        )
    return sorted(names)


def _torch_dtype(ds_config: dict[str, Any]) -> Any:
    import torch

    def on(key: str) -> bool:
        section = ds_config.get(key) or {}
        return isinstance(section, dict) and bool(section.get("enabled"))

    if on("bf16") or on("bfloat16"):
        return torch.bfloat16
    if on("fp16"):
        return torch.float16
    return torch.float32


def _load_model(spec: JobSpec, tokenizer: Any, dtype: Any) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec.model_config is None:
        return AutoModelForCausalLM.from_pretrained(spec.base_model_path, dtype=dtype)
    raw = spec.model_config
    if isinstance(raw, str):
        path = Path(raw)
        raw = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    cfg = dict(raw)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise InvalidArgument("model_config needs a model_type (e.g. 'llama')")
    # The tokenizer decides the vocabulary and the special ids unless the config says otherwise.
    cfg.setdefault("vocab_size", len(tokenizer))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, key, None)
        if value is not None:
            cfg.setdefault(key, value)
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except ValueError as exc:
        raise InvalidArgument(f"model_config is not a valid {model_type} config: {exc}") from None
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def _collate(batch: list[Example], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class _Rank:
    """State of one rank for one job; ``run()`` is the whole job."""

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.hp = spec.hyperparameters
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.out = Path(spec.output_dir)
        self.ckpt_root = self.out / CHECKPOINT_DIR
        self.lora = spec.training_method == "lora"
        self.events = EventWriter(self.out) if self.rank == 0 else None

    # -- helpers --------------------------------------------------------------------------------

    def emit(self, type_: EventType, **fields: Any) -> None:
        if self.events is not None:
            self.events.emit(type_, **fields)

    def log(self, line: str) -> None:
        self.emit(EventType.LOG, line=line)

    def _allreduce_sum(self, *values: float) -> list[float]:
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.engine.device)
        if self.world > 1:
            dist.all_reduce(t)
        return [float(x) for x in t.tolist()]

    def _drop_shm_name(self) -> None:
        """Unlink this rank's DeepSpeed allreduce segment name as soon as every rank mapped it.

        DeepSpeed never unlinks it, so a job killed by any signal would pin ~66 MB per rank in
        /dev/shm; after the barrier every rank holds the mappings it needs and the memory goes
        with the last process. The launcher side unlinks again for ranks that died earlier.
        """
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not addr or not port:
            return
        segment = ds_shm_segment(addr, port, self.rank)
        # Only DeepSpeed's CPU backend makes one, on every rank alike: all ranks skip (a GPU
        # job) or all wait at the barrier.
        if not segment.exists():
            return
        self._barrier()
        try:
            segment.unlink(missing_ok=True)
        except OSError as exc:
            self.log(
                f"cannot remove {segment} (~66 MB of shared memory until reboot): {exc}; "
                f"remove it by hand (rm {segment})"
            )

    def _barrier(self) -> None:
        import torch.distributed as dist

        if self.world > 1:
            dist.barrier()

    # -- setup ----------------------------------------------------------------------------------

    def _examples(self, tokenizer: Any) -> tuple[list[Example], list[Example]]:
        spec, hp = self.spec, self.hp
        if spec.kind == "pretrain":
            texts = load_pretrain_texts(spec.data_path)  # type: ignore[arg-type]
            blocks = pack_texts(texts, tokenizer, hp.cutoff_len)
            if not blocks:
                raise InvalidArgument("the pretraining text is too short to make one block")
            train, val = split_rows(blocks, hp.val_set_size, hp.seed)
            self.log(
                f"pretraining on {len(train)} blocks of up to {hp.cutoff_len} tokens "
                f"({len(val)} held out) from {len(texts)} documents"
            )
            return train, val
        rows = load_sft_rows(spec.data_path)  # type: ignore[arg-type]
        check_template(rows, spec.template, spec.base_model_path)  # type: ignore[arg-type]
        train_rows, val_rows = split_rows(rows, hp.val_set_size, hp.seed)

        def encode(rs: list[Any]) -> tuple[list[Example], list[int]]:
            out, skipped = [], []
            for r in rs:
                ex = encode_sft_row(
                    r,
                    tokenizer,
                    template=spec.template,
                    cutoff_len=hp.cutoff_len,
                    train_on_inputs=hp.train_on_inputs,
                )
                if ex is None:
                    skipped.append(r.line)
                else:
                    out.append(ex)
            return out, skipped

        train, skipped = encode(train_rows)
        val, skipped_val = encode(val_rows)
        skipped += skipped_val
        if skipped:
            self.log(
                f"skipped {len(skipped)} rows whose prompt fills cutoff_len {hp.cutoff_len} "
                f"tokens (lines {', '.join(map(str, sorted(skipped)[:10]))}"
                f"{', ...' if len(skipped) > 10 else ''})"
            )
        if not train:
            raise InvalidArgument(
                f"no training row has a response within cutoff_len {hp.cutoff_len} tokens; "
                "raise hyperparameters.cutoff_len or shorten the prompts"
            )
        longest = max(len(e.input_ids) for e in train)
        self.log(
            f"fine-tuning on {len(train)} rows ({len(val)} held out), longest {longest} tokens"
        )
        return train, val

    def _setup(self) -> None:
        import deepspeed
        import torch
        from torch.utils.data import DataLoader, DistributedSampler
        from transformers import AutoTokenizer

        spec, hp = self.spec, self.hp
        torch.manual_seed(hp.seed)
        tok_dir = spec.tokenizer_path or spec.base_model_path
        self.tokenizer_dir = tok_dir
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        self.tokenizer = tokenizer
        self.train_set, self.val_set = self._examples(tokenizer)

        ds_config = dict(spec.deepspeed_config)
        ds_config, micro, gas = resolve_batch_config(
            ds_config,
            micro=hp.per_device_train_batch_size,
            accumulation=hp.gradient_accumulation_steps,
            world=self.world,
        )
        ds_config.setdefault("gradient_clipping", hp.max_grad_norm)
        ds_config.setdefault("steps_per_print", _QUIET_STEPS_PER_PRINT)
        ds_config.setdefault("wall_clock_breakdown", False)
        self.micro, self.gas = micro, gas

        sampler = DistributedSampler(
            self.train_set, num_replicas=self.world, rank=self.rank, shuffle=True, seed=hp.seed
        )
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.sampler = sampler
        self.loader = DataLoader(
            self.train_set,
            batch_size=micro,
            sampler=sampler,
            collate_fn=lambda b: _collate(b, pad_id),
        )
        self.val_loader = None
        if self.val_set:
            self.val_loader = DataLoader(
                self.val_set,
                batch_size=micro,
                sampler=DistributedSampler(
                    self.val_set, num_replicas=self.world, rank=self.rank, shuffle=False
                ),
                collate_fn=lambda b: _collate(b, pad_id),
            )
        self.micro_per_epoch = len(self.loader)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / gas)
        if hp.max_steps > 0:
            self.total_steps = hp.max_steps
        else:
            self.total_steps = max(1, math.ceil(hp.num_train_epochs * self.steps_per_epoch))

        model = _load_model(spec, tokenizer, _torch_dtype(ds_config))
        if self.lora:
            from peft import LoraConfig, get_peft_model

            targets = spec.lora.target_modules or _default_target_modules(model)
            model = get_peft_model(
                model,
                LoraConfig(
                    r=spec.lora.r,
                    lora_alpha=spec.lora.alpha,
                    lora_dropout=spec.lora.dropout,
                    target_modules=targets,
                    task_type="CAUSAL_LM",
                ),
            )
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            self.log(
                f"LoRA r={spec.lora.r} alpha={spec.lora.alpha} on {', '.join(targets)}: "
                f"{trainable} trainable parameters"
            )
        params = [p for p in model.parameters() if p.requires_grad]

        optimizer = None
        scheduler = None
        if "optimizer" not in ds_config:
            # A plain torch AdamW as the client optimizer: DeepSpeed's own Adam variants
            # compile C++/CUDA ops on first use, which takes minutes on a CPU-only host.
            optimizer = torch.optim.AdamW(
                params, lr=spec.learning_rate, weight_decay=hp.weight_decay
            )
            if "scheduler" not in ds_config:
                scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_lambda)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=params if optimizer is None else None,
            lr_scheduler=scheduler,
            config=ds_config,
        )
        self.zero_stage = self.engine.zero_optimization_stage()

    def _lr_lambda(self, step: int) -> float:
        hp = self.hp
        if hp.warmup_steps and step < hp.warmup_steps:
            return (step + 1) / (hp.warmup_steps + 1)
        if hp.lr_scheduler_type == "constant":
            return 1.0
        span = max(1, self.total_steps - hp.warmup_steps)
        progress = min(1.0, (step - hp.warmup_steps) / span)
        if hp.lr_scheduler_type == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    # -- checkpoints ---------------------------------------------------------------------------

    def _latest_tag(self) -> str | None:
        latest = self.ckpt_root / "latest"
        try:
            tag = latest.read_text().strip()
        except OSError:
            return None
        return tag if tag and (self.ckpt_root / tag).is_dir() else None

    def _resume(self) -> int:
        if not self.spec.resume:
            return 0
        tag = self._latest_tag()
        if tag is None:
            return 0
        path, client = self.engine.load_checkpoint(
            str(self.ckpt_root),
            tag=tag,
            load_module_strict=not self.lora,  # LoRA checkpoints hold the adapter only
        )
        if path is None:
            raise RuntimeError(f"checkpoint {self.ckpt_root / tag} could not be loaded")
        step = int((client or {}).get("step", 0))
        self.emit(EventType.RESUME, step=step, path=str(self.ckpt_root / tag))
        self.log(f"resumed from checkpoint {tag} at step {step} of {self.total_steps}")
        return step

    def _save_checkpoint(self, step: int, epoch: float) -> None:
        tag = f"step-{step}"
        self.engine.save_checkpoint(
            str(self.ckpt_root),
            tag=tag,
            client_state={"step": step, "epoch": epoch, "total_steps": self.total_steps},
            # The frozen base model is already on disk; a LoRA checkpoint is the adapter plus
            # optimizer state, megabytes instead of the whole model.
            exclude_frozen_parameters=self.lora,
        )
        self._barrier()
        if self.rank == 0:
            self.emit(EventType.CHECKPOINT, step=step, path=str(self.ckpt_root / tag))
            limit = self.hp.save_total_limit
            if limit > 0:
                tags = sorted(
                    (p for p in self.ckpt_root.glob("step-*") if p.is_dir()),
                    key=lambda p: int(p.name.split("-", 1)[1]),
                )
                for old in tags[:-limit]:
                    shutil.rmtree(old, ignore_errors=True)

    # -- evaluation ----------------------------------------------------------------------------

    def _evaluate(self, step: int) -> None:
        import torch

        if self.val_loader is None:
            return
        engine = self.engine
        engine.eval()
        total, count = 0.0, 0.0
        with torch.no_grad():
            for batch in self.val_loader:
                batch = {k: v.to(engine.device) for k, v in batch.items()}
                loss = engine(**batch).loss
                tokens = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                total += float(loss.detach()) * tokens
                count += tokens
        engine.train()
        total, count = self._allreduce_sum(total, count)
        if count:
            self.emit(EventType.EVAL, step=step, eval_loss=total / count)

    # -- the loop ------------------------------------------------------------------------------

    def _train(self, start_step: int) -> None:
        engine, hp = self.engine, self.hp
        step = start_step
        total = self.total_steps
        engine.train()
        run_start = time.monotonic()
        window_start = run_start
        window_loss, window_micro, window_rows = 0.0, 0, 0
        step_loss_sum, step_micro = 0.0, 0
        eval_every = hp.eval_steps or hp.save_steps
        epoch = step // self.steps_per_epoch
        # Micro-batches of the current epoch that the checkpoint already covered.
        skip = (step % self.steps_per_epoch) * self.gas
        while step < total:
            self.sampler.set_epoch(epoch)
            for i, batch in enumerate(self.loader):
                if i < skip:
                    continue
                batch = {k: v.to(engine.device) for k, v in batch.items()}
                # The last micro-batches of an epoch form a (smaller) step of their own, so
                # every epoch starts on a step boundary and resuming knows where it is.
                boundary = (i + 1) % self.gas == 0 or i + 1 == self.micro_per_epoch
                engine.set_gradient_accumulation_boundary(boundary)
                loss = engine(**batch).loss
                engine.backward(loss)
                engine.step()
                step_loss_sum += float(loss.detach())
                step_micro += 1
                window_rows += int(batch["input_ids"].shape[0])
                if not boundary:
                    continue
                step += 1
                window_loss += step_loss_sum / step_micro
                window_micro += 1
                step_loss_sum, step_micro = 0.0, 0
                epoch_f = step / self.steps_per_epoch
                if step % hp.logging_steps == 0 or step == total:
                    now = time.monotonic()
                    loss_sum, rows = self._allreduce_sum(window_loss, float(window_rows))
                    done_here = step - start_step
                    self.emit(
                        EventType.PROGRESS,
                        step=step,
                        total_steps=total,
                        epoch=round(epoch_f, 4),
                        loss=loss_sum / (window_micro * self.world),
                        learning_rate=float(engine.get_lr()[0]),
                        samples_per_second=rows / max(now - window_start, 1e-9),
                        eta_seconds=(now - run_start) / done_here * (total - step),
                    )
                    window_start = now
                    window_loss, window_micro, window_rows = 0.0, 0, 0
                if eval_every and step % eval_every == 0 and step < total:
                    self._evaluate(step)
                if hp.save_steps and step % hp.save_steps == 0 and step < total:
                    self._save_checkpoint(step, epoch_f)
                if step >= total:
                    break
            epoch += 1
            skip = 0
        self._evaluate(step)

    # -- the artifact --------------------------------------------------------------------------

    def _save_artifact(self) -> None:
        module = self.engine.module
        state_dict = None
        if self.zero_stage == 3:
            # ZeRO-3 shards every parameter across ranks: all ranks gather them, one layer at
            # a time, into a full state dict on rank 0 (DeepSpeed's own route for
            # save_16bit_model, which writes a bare .bin instead of a HuggingFace directory).
            state_dict = self.engine._zero3_consolidated_16bit_state_dict(
                exclude_frozen_parameters=self.lora
            )
        if self.rank != 0:
            return
        name, kind = (ADAPTER_DIR, "lora_adapter") if self.lora else (MODEL_DIR, "full_model")
        final = self.out / name
        with atomic_dir(final) as tmp:
            # safetensors by default (PEFT and transformers)
            module.save_pretrained(tmp, state_dict=state_dict)
            copy_tokenizer_files(self.tokenizer_dir, tmp)  # type: ignore[arg-type]
            if kind == "full_model" and self.spec.base_model_path:
                gen = Path(self.spec.base_model_path) / "generation_config.json"
                if gen.is_file() and not (tmp / gen.name).exists():
                    shutil.copy2(gen, tmp / gen.name)
        self.emit(EventType.ARTIFACT, kind=kind, path=str(final))

    def run(self) -> None:
        import deepspeed
        import torch

        threads = self.spec.threads_per_rank or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)  # before NCCL comes up on it
        deepspeed.init_distributed(verbose=False)
        self._drop_shm_name()
        self.emit(EventType.STATE, state=JobState.RUNNING, ranks=self.world)
        self._setup()
        self.log(
            f"{self.total_steps} steps: {self.steps_per_epoch} per epoch, micro batch "
            f"{self.micro} x accumulation {self.gas} x {self.world} ranks"
        )
        start = self._resume()
        if start < self.total_steps:
            self._train(start)
        self._save_artifact()
        self._barrier()
        self.emit(EventType.DONE)


def main(argv: list[str] | None = None) -> int:
    """Run one rank of the job described by ``--spec``; returns the exit code."""
    die_with_parent()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True, help="the job spec JSON file")
    args, _ = parser.parse_known_args(argv)  # the launcher may add --local_rank
    spec = JobSpec.load(args.spec)
    rank = int(os.environ.get("RANK", "0"))
    try:
        _Rank(spec).run()
    except Exception as exc:  # noqa: BLE001 - reported as the job's failure reason
        traceback.print_exc()
        reason = str(exc) if isinstance(exc, InvalidArgument) else f"{type(exc).__name__}: {exc}"
        EventWriter(spec.output_dir).emit(EventType.ERROR, reason=reason, rank=rank)
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    # Everything the job produced is on disk (events are unbuffered writes, artifacts and
    # checkpoints are closed files); skip the interpreter teardown of torch/gloo/DeepSpeed,
    # which takes seconds per rank and holds the job's slot for nothing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
