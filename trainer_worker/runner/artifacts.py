"""Artifact directories: where they go, how they appear atomically, the tokenizer next to them."""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "ADAPTER_DIR",
    "CHECKPOINT_DIR",
    "MODEL_DIR",
    "atomic_dir",
    "copy_tokenizer_files",
]

ADAPTER_DIR = "adapter"  # a LoRA adapter in PEFT layout
MODEL_DIR = "model"  # a full HuggingFace model directory
CHECKPOINT_DIR = "checkpoints"  # DeepSpeed checkpoints, one tag per saved step

# What a tokenizer directory is made of, across tokenizer families.
_TOKENIZER_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template*",
    "vocab*",
    "merges.txt",
    "spiece.model",
    "sentencepiece*",
    "*.tiktoken",
    "qwen.tiktoken",
)


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy a model directory's tokenizer files into ``dst``; returns the names copied."""
    src, dst = Path(src), Path(dst)
    copied = []
    for item in sorted(src.iterdir()):
        if item.is_file() and any(fnmatch.fnmatch(item.name, p) for p in _TOKENIZER_FILES):
            shutil.copy2(item, dst / item.name)
            copied.append(item.name)
        elif item.is_dir() and item.name == "additional_chat_templates":
            shutil.copytree(item, dst / item.name, dirs_exist_ok=True)
            copied.append(item.name)
    return copied


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; on success it replaces ``final`` in one rename.

    A reader never sees a half-written artifact, and a job killed while saving leaves the
    previous artifact (or nothing) in place.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        yield tmp
        _open_up(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}-old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _open_up(root: Path) -> None:
    """Give an artifact the usual modes (umask applied).

    mkdtemp makes the directory 0700 and the safetensors writer makes its files 0600; a
    serving replica that runs as another user must still be able to read the artifact.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~umask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~umask)
