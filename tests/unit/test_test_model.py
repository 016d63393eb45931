"""The local test model: layout, architecture, tokenizer and chat template, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmesh.testing import CHAT_TEMPLATE, SPECIAL_TOKENS, corpus, make_test_model


def test_corpus_is_a_few_hundred_english_lines() -> None:
    lines = corpus()
    assert 150 <= len(lines) <= 1000
    assert lines == corpus()
    assert any("sky is blue" in line for line in lines)


def test_config_is_small_llama_with_wide_heads(test_model_dir: Path) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(test_model_dir, local_files_only=True)
    assert config.model_type == "llama"
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.hidden_size // config.num_attention_heads >= 64
    assert config.max_position_embeddings == 2048
    assert 1000 <= config.vocab_size <= 2000
    generation = json.loads((test_model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config.eos_token_id


def test_model_and_tokenizer_load_with_auto_classes(test_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(test_model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(test_model_dir, local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(tokenizer) == model.config.vocab_size
    assert tokenizer.eos_token == "</s>"
    assert tokenizer.eos_token_id == model.config.eos_token_id
    assert tokenizer.bos_token == "<s>"
    assert tokenizer.unk_token == "<unk>"
    assert tokenizer.pad_token == "<pad>"
    for token in SPECIAL_TOKENS:
        ids = tokenizer.encode(token, add_special_tokens=False)
        assert len(ids) == 1, f"{token} is not a single special token"
        assert ids[0] in tokenizer.all_special_ids


@pytest.mark.parametrize(
    "text",
    [
        "The sky is blue on a clear day.",
        "  spaces,\ttabs\nand newlines  ",
        "Ünïcødé — 日本語 and emoji 😀👍🏽",
        "",
    ],
)
def test_tokenizer_round_trips(test_model_dir: Path, text: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(test_model_dir, local_files_only=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids  # byte-level: nothing is unknown
    assert tokenizer.decode(ids) == text
    with_bos = tokenizer.encode(text)
    assert with_bos[0] == tokenizer.bos_token_id
    assert tokenizer.decode(with_bos, skip_special_tokens=True) == text


def test_chat_template_renders_role_markers(test_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(test_model_dir, local_files_only=True)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What color is the sky?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|system|>\nBe brief.</s>\n<|user|>\nWhat color is the sky?</s>\n<|assistant|>\n"
    )
    no_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert not no_prompt.endswith("<|assistant|>\n")
    with pytest.raises(Exception, match="roles must be"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "hi"}], tokenize=False)


def test_trained_model_answers_in_words(test_model_dir: Path) -> None:
    # The quick training pass should make greedy output look like the corpus, not noise.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(test_model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(test_model_dir, local_files_only=True)
    ids = tokenizer("The quick brown", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    words = text.split()
    assert words and sum(w.strip(".,?!").isalpha() for w in words) >= len(words) // 2


def test_existing_model_is_not_rebuilt(test_model_dir: Path) -> None:
    weights = test_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert make_test_model(test_model_dir) == test_model_dir
    assert weights.stat().st_mtime_ns == before


def test_same_seed_same_weights(tmp_path: Path) -> None:
    # train_steps=0 keeps this fast; seeding covers init, tokenizer training and data order.
    a = make_test_model(tmp_path / "a", seed=3, train_steps=0)
    b = make_test_model(tmp_path / "b", seed=3, train_steps=0)
    c = make_test_model(tmp_path / "c", seed=4, train_steps=0)

    def weights(p: Path) -> bytes:
        return (p / "model.safetensors").read_bytes()

    assert weights(a) == weights(b)
    assert weights(a) != weights(c)
    assert (a / "tokenizer.json").read_text() == (c / "tokenizer.json").read_text()
    # No temporary build directories are left next to the models.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_incomplete_directory_is_completed(tmp_path: Path) -> None:
    out = tmp_path / "m"
    out.mkdir()
    (out / "config.json").write_text("{}")  # a half-written build
    make_test_model(out, train_steps=0)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert (out / "tokenizer.json").is_file()
