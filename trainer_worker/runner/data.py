"""Training data: validation before launch, prompt templates and tokenisation inside the ranks.

Fine-tuning rows come from ``data.jsonl``, one JSON object per line, in one of two forms:

* alpaca: ``{"instruction": ..., "input": ... (optional), "output": ...}``
* chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``

:func:`load_sft_rows` checks every line and raises :class:`~llmesh.errors.InvalidArgument`
naming the line and the field, so a bad file fails the job before any rank starts. The
validation half of this module is plain Python (the launcher imports it); the tokenising half
imports nothing heavy at module level either, it only receives a tokenizer.

Only response tokens are learned: prompt tokens get the label -100. The prompt is tokenised
exactly as the serving engines tokenise a rendered prompt (a BOS token is added unless the
rendered text already starts with one), and each response on its own, so what the model sees
at training time is what it sees when a replica serves the adapter.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from llmesh.common.errors import FailedPrecondition, InvalidArgument

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_WITH_INPUT",
    "Example",
    "SftRow",
    "alpaca_prompt",
    "check_pretrain_data",
    "check_template",
    "encode_sft_row",
    "has_chat_template",
    "load_pretrain_texts",
    "load_sft_rows",
    "pack_texts",
    "resolve_pretrain_files",
    "resolve_sft_file",
    "split_rows",
    "val_count",
]

DATA_FILE = "data.jsonl"
ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100

# The Stanford Alpaca prompt layout, the format "alpaca" means to users of alpaca-lora.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


@dataclasses.dataclass
class SftRow:
    """One validated fine-tuning row.

    Args:
        line: 1-based line number in the data file (for error messages).
        form: ``alpaca`` or ``chat``.
        instruction: Alpaca instruction.
        input: Alpaca input (may be empty).
        output: Alpaca output, the response to learn.
        messages: Chat messages (form chat); the last one is from the assistant.
    """

    line: int
    form: str
    instruction: str = ""
    input: str = ""
    output: str = ""
    messages: list[dict[str, str]] = dataclasses.field(default_factory=list)

    def as_messages(self) -> list[dict[str, str]]:
        """The row as a chat exchange (alpaca rows become one user turn and one answer)."""
        if self.form == "chat":
            return self.messages
        user = self.instruction if not self.input else f"{self.instruction}\n\n{self.input}"
        return [{"role": "user", "content": user}, {"role": "assistant", "content": self.output}]


@dataclasses.dataclass
class Example:
    """A tokenised training example: ids and labels of equal length (-100 = not learned)."""

    input_ids: list[int]
    labels: list[int]


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The alpaca prompt for an instruction and optional input, ending where the answer starts."""
    if input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT.format(instruction=instruction)


# -- files --------------------------------------------------------------------------------------


def resolve_sft_file(data_path: str | Path) -> Path:
    """The data.jsonl a fine-tuning job reads: the path itself, or ``data.jsonl`` inside it."""
    path = Path(data_path).expanduser()
    if path.is_dir():
        candidate = path / DATA_FILE
        if not candidate.is_file():
            raise InvalidArgument(
                f"data_path {path} is a directory without {DATA_FILE}; put the rows in "
                f"{candidate} or point data_path at the file"
            )
        return candidate
    if not path.exists():
        raise InvalidArgument(f"data_path {path} does not exist")
    if not path.is_file():
        raise InvalidArgument(f"data_path {path} is not a regular file")
    return path


def resolve_pretrain_files(data_path: str | Path) -> list[Path]:
    """The text files of a pretrain job: one .txt / .jsonl file, or those in a directory."""
    path = Path(data_path).expanduser()
    if path.is_file():
        return [path]
    if not path.exists():
        raise InvalidArgument(f"data_path {path} does not exist")
    files = sorted(
        p for p in path.iterdir() if p.is_file() and p.suffix in (".txt", ".jsonl", ".json")
    )
    if not files:
        raise InvalidArgument(
            f"data_path {path} holds no .txt or .jsonl files; pretraining reads raw text files "
            "or jsonl rows with a 'text' field"
        )
    return files


def _json_lines(path: Path) -> Iterable[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line; errors name the line."""
    name = path.name
    seen = False
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidArgument(
                    f"{name} line {lineno} is not valid UTF-8 (byte {exc.start}); save the "
                    "file as UTF-8"
                ) from None
            if not text.strip():
                continue
            seen = True
            try:
                obj = json.loads(text)
            except ValueError as exc:
                raise InvalidArgument(
                    f"{name} line {lineno} is not valid JSON ({exc}); each line must be one "
                    "JSON object"
                ) from None
            if not isinstance(obj, dict):
                raise InvalidArgument(
                    f"{name} line {lineno} must be a JSON object, not {_json_type(obj)}"
                )
            yield lineno, obj
    if not seen:
        raise InvalidArgument(
            f"{name} is empty; write one JSON object per line, e.g. "
            '{"instruction": "...", "output": "..."} or {"messages": [...]}'
        )


def _json_type(v: Any) -> str:
    return {
        list: "an array",
        dict: "an object",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(v), type(v).__name__)


# -- fine-tuning rows ----------------------------------------------------------------------------


def _alpaca_row(name: str, lineno: int, obj: dict[str, Any]) -> SftRow:
    where = f"{name} line {lineno}"
    for key in ("instruction", "output"):
        if key not in obj:
            raise InvalidArgument(
                f"{where}: field '{key}' is missing (alpaca rows need instruction and output)"
            )
    for key in ("instruction", "input", "output"):
        value = obj.get(key)
        if key == "input" and value is None:
            continue
        if not isinstance(value, str):
            raise InvalidArgument(
                f"{where}: field '{key}' must be a string, not {_json_type(value)}"
            )
    if not obj["output"].strip():
        raise InvalidArgument(f"{where}: field 'output' is empty; it is the answer to learn")
    if not obj["instruction"].strip() and not (obj.get("input") or "").strip():
        raise InvalidArgument(f"{where}: field 'instruction' is empty (and there is no input)")
    return SftRow(
        line=lineno,
        form="alpaca",
        instruction=obj["instruction"],
        input=obj.get("input") or "",
        output=obj["output"],
    )


def _chat_row(name: str, lineno: int, obj: dict[str, Any]) -> SftRow:
    where = f"{name} line {lineno}"
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument(
            f"{where}: field 'messages' must be a non-empty array of "
            '{"role": ..., "content": ...} objects'
        )
    out: list[dict[str, str]] = []
    for i, msg in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(msg, dict):
            raise InvalidArgument(f"{at} must be an object with role and content")
        role = msg.get("role")
        if "role" not in msg:
            raise InvalidArgument(f"{at}: field 'role' is missing")
        if role not in ROLES:
            raise InvalidArgument(
                f"{at}: field 'role' is {role!r}; roles must be system, user or assistant"
            )
        if "content" not in msg:
            raise InvalidArgument(f"{at}: field 'content' is missing")
        content = msg["content"]
        if not isinstance(content, str):
            raise InvalidArgument(
                f"{at}: field 'content' must be a string, not {_json_type(content)}"
            )
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant":
        raise InvalidArgument(
            f"{where}: the last message has role {out[-1]['role']!r}; a chat row must end with "
            "the assistant's answer, which is what the model learns"
        )
    if not out[-1]["content"].strip():
        raise InvalidArgument(f"{where}: the last assistant message is empty")
    return SftRow(line=lineno, form="chat", messages=out)


def load_sft_rows(data_path: str | Path) -> list[SftRow]:
    """Read and validate every row of a fine-tuning data file.

    Args:
        data_path: ``data.jsonl`` or a directory containing it.

    Raises:
        InvalidArgument: the first problem, naming the line and the field.
    """
    path = resolve_sft_file(data_path)
    name = path.name
    rows: list[SftRow] = []
    for lineno, obj in _json_lines(path):
        has_chat = "messages" in obj
        has_alpaca = any(k in obj for k in ("instruction", "input", "output"))
        if has_chat and has_alpaca:
            raise InvalidArgument(
                f"{name} line {lineno}: has both 'messages' (chat) and alpaca fields; "
                "use one form per row"
            )
        if has_chat:
            rows.append(_chat_row(name, lineno, obj))
        elif has_alpaca:
            rows.append(_alpaca_row(name, lineno, obj))
        else:
            keys = ", ".join(sorted(obj)) or "none"
            raise InvalidArgument(
                f"{name} line {lineno}: no 'instruction'/'output' (alpaca) or 'messages' (chat) "
                f"field; the row has {keys}"
            )
    return rows


def has_chat_template(tokenizer_dir: str | Path) -> bool:
    """Whether a tokenizer directory carries a chat template (checked without loading it)."""
    d = Path(tokenizer_dir)
    if (d / "chat_template.jinja").is_file() or (d / "chat_template.json").is_file():
        return True
    if (d / "additional_chat_templates").is_dir():
        return True
    try:
        config = json.loads((d / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(config.get("chat_template"))


def check_template(
    rows: Sequence[SftRow], template: str, tokenizer_dir: str | Path, *, file_name: str = DATA_FILE
) -> None:
    """Fail before launch when rows and the template cannot be combined.

    Raises:
        InvalidArgument: chat rows with the alpaca template.
        FailedPrecondition: the chat template is needed but the tokenizer has none.
    """
    chat_rows = [r for r in rows if r.form == "chat"]
    if template == "alpaca" and chat_rows:
        raise InvalidArgument(
            f"{file_name} line {chat_rows[0].line} is a chat row ('messages') but template is "
            "'alpaca'; use template 'auto' or 'chat', or write alpaca rows"
        )
    needs_chat = template == "chat" or (template == "auto" and chat_rows)
    if needs_chat and not has_chat_template(tokenizer_dir):
        what = (
            f"{file_name} line {chat_rows[0].line} is a chat row"
            if chat_rows
            else "template is 'chat'"
        )
        raise FailedPrecondition(
            f"{what}, but the tokenizer in {tokenizer_dir} has no chat template; add one "
            "(chat_template in tokenizer_config.json) or use alpaca rows with template 'alpaca'"
        )


def val_count(n_rows: int, val_set_size: float) -> int:
    """Rows held out for validation: a fraction of ``n_rows`` or a count; at least one
    training row must remain.

    Raises:
        InvalidArgument: when nothing would be left to train on.
    """
    if val_set_size <= 0:
        return 0
    n_val = round(n_rows * val_set_size) if val_set_size < 1 else int(val_set_size)
    n_val = max(n_val, 1)
    if n_val >= n_rows:
        raise InvalidArgument(
            f"hyperparameters.val_set_size {val_set_size:g} holds out {n_val} of {n_rows} "
            "rows and leaves none to train on; lower it or add rows"
        )
    return n_val


def split_rows(rows: Sequence[Any], val_set_size: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A seeded shuffle-split into (train, validation); every rank computes the same split."""
    n_val = val_count(len(rows), val_set_size)
    if n_val == 0:
        return list(rows), []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [r for i, r in enumerate(rows) if i not in val_idx]
    val = [r for i, r in enumerate(rows) if i in val_idx]
    return train, val


# -- tokenisation (inside the ranks) -----------------------------------------------------------


def _render(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    return str(
        tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    )


def _chat_segments(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """(text, learned) pieces whose concatenation is the rendered conversation.

    Each assistant reply is the text the template adds after the generation prompt, which is
    what a served model produces, end-of-turn marker included. Templates that rewrite earlier
    turns (so a shorter conversation does not render as a prefix of a longer one) fall back to
    learning the last reply only.
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            prompt = _render(tokenizer, messages[:-1], generation_prompt=True)
            full = _render(tokenizer, messages, generation_prompt=False)
            if not full.startswith(prompt):
                return [(prompt, False), (messages[-1]["content"], True)]
            return [(prompt, False), (full[len(prompt) :], True)]
        segments.append((prompt[len(done) :], False))
        segments.append((full[len(prompt) :], True))
        done = full
    return [(t, learned) for t, learned in segments if t]


def encode_sft_row(
    row: SftRow,
    tokenizer: Any,
    *,
    template: str,
    cutoff_len: int,
    train_on_inputs: bool = False,
) -> Example | None:
    """Tokenise one row with its prompt masked; ``None`` when truncation leaves nothing to learn.

    Args:
        row: A validated row.
        tokenizer: A HuggingFace tokenizer.
        template: ``auto``, ``alpaca`` or ``chat`` (see :class:`~.spec.JobSpec`).
        cutoff_len: Longest sequence kept.
        train_on_inputs: Learn the prompt tokens too.
    """
    use_chat = template == "chat" or (template == "auto" and row.form == "chat")
    eos_id = tokenizer.eos_token_id
    if use_chat:
        segments = _chat_segments(tokenizer, row.as_messages())
        append_eos = False  # the template's end-of-turn marker ends the reply
    else:
        segments = [(alpaca_prompt(row.instruction, row.input), False), (row.output, True)]
        append_eos = eos_id is not None
    ids: list[int] = []
    labels: list[int] = []
    bos = getattr(tokenizer, "bos_token", None)
    for i, (text, learned) in enumerate(segments):
        # Same rule as the serving engines: BOS in front unless the rendered text has one.
        special = i == 0 and not (bos and text.startswith(bos))
        piece = list(tokenizer.encode(text, add_special_tokens=special))
        ids.extend(piece)
        labels.extend(piece if (learned or train_on_inputs) else [IGNORE_INDEX] * len(piece))
    if append_eos:
        ids.append(eos_id)
        labels.append(eos_id)
    ids, labels = ids[:cutoff_len], labels[:cutoff_len]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return Example(input_ids=ids, labels=labels)


# -- pretraining text ----------------------------------------------------------------------------


def load_pretrain_texts(data_path: str | Path) -> list[str]:
    """The documents of a pretrain job: each .txt file, and each ``text`` of a jsonl file.

    Raises:
        InvalidArgument: a jsonl row without a string ``text``, a non-UTF-8 file, or no text.
    """
    docs: list[str] = []
    for path in resolve_pretrain_files(data_path):
        if path.suffix in (".jsonl", ".json"):
            for lineno, obj in _json_lines(path):
                if "text" not in obj:
                    raise InvalidArgument(
                        f"{path.name} line {lineno}: field 'text' is missing (pretraining "
                        "jsonl rows need a 'text' string)"
                    )
                if not isinstance(obj["text"], str):
                    raise InvalidArgument(
                        f"{path.name} line {lineno}: field 'text' must be a string, not "
                        f"{_json_type(obj['text'])}"
                    )
                if obj["text"].strip():
                    docs.append(obj["text"])
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidArgument(
                    f"{path.name} is not valid UTF-8 (byte {exc.start}); save it as UTF-8"
                ) from None
            if text.strip():
                docs.append(text)
    if not docs:
        raise InvalidArgument(f"data_path {data_path} holds no text to pretrain on")
    return docs


def check_pretrain_data(data_path: str | Path) -> int:
    """Check pretraining data before launch without reading a large corpus into memory.

    jsonl rows are parsed (each needs a string ``text``); .txt files must be non-empty and start
    as UTF-8. Returns the number of files.

    Raises:
        InvalidArgument: naming the file (and line) at fault.
    """
    files = resolve_pretrain_files(data_path)
    any_text = False
    for path in files:
        if path.suffix in (".jsonl", ".json"):
            for lineno, obj in _json_lines(path):
                text = obj.get("text")
                if "text" not in obj or not isinstance(text, str):
                    what = (
                        "is missing"
                        if "text" not in obj
                        else f"must be a string, not {_json_type(text)}"
                    )
                    raise InvalidArgument(
                        f"{path.name} line {lineno}: field 'text' {what} (pretraining jsonl rows "
                        "need a 'text' string)"
                    )
                any_text = any_text or bool(text.strip())
        else:
            with open(path, "rb") as f:
                head = f.read(1 << 20)
            try:
                # A multi-byte character cut at the 1 MiB boundary is not an error.
                head.decode("utf-8")
            except UnicodeDecodeError as exc:
                if exc.start < len(head) - 4:
                    raise InvalidArgument(
                        f"{path.name} is not valid UTF-8 (byte {exc.start}); save it as UTF-8"
                    ) from None
            any_text = any_text or bool(head.strip())
    if not any_text:
        raise InvalidArgument(f"data_path {data_path} holds no text to pretrain on")
    return len(files)


def pack_texts(texts: Sequence[str], tokenizer: Any, block_size: int) -> list[Example]:
    """Concatenate documents (EOS between them) and cut the stream into ``block_size`` blocks.

    A tail shorter than a block is dropped, unless it is all there is.
    """
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer.encode(text, add_special_tokens=True))
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
    blocks = [stream[i : i + block_size] for i in range(0, len(stream), block_size)]
    if len(blocks) > 1 and len(blocks[-1]) < block_size:
        blocks.pop()
    return [Example(input_ids=b, labels=list(b)) for b in blocks if len(b) >= 2]
