"""A small local chat model for tests, demos and benchmarks: built on the spot, never downloaded.

:func:`make_test_model` writes a Llama-architecture causal LM with a byte-level BPE tokenizer
(trained here with the ``tokenizers`` library on a built-in English corpus) and a chat template,
in the HuggingFace layout that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load. A few hundred quick training steps on the same corpus
make its output look like words rather than noise; nobody should expect sense from it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "corpus", "make_test_model"]

# Bump when the recipe changes so that a directory built by an older recipe is rebuilt.
_RECIPE_VERSION = 2
_MARKER = ".llmesh-test-model.json"

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
ROLE_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>")
# Order fixes the ids: <unk>=0, <s>=1, </s>=2 as in Llama checkpoints, then <pad> and the roles.
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, *ROLE_MARKERS)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant, not ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '</s>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_VOCAB_SIZE = 1500
_ARCH = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,  # head_dim 64: vLLM's CPU backend rejects smaller heads
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}
_TRAIN_STEPS = 150
_TRAIN_BLOCK = 64
_TRAIN_BATCH = 8

# (question, answer) pairs; every line of the corpus is derived from these.
_FACTS: tuple[tuple[str, str], ...] = (
    ("What color is the sky?", "The sky is blue on a clear day."),
    ("What color is grass?", "Grass is green."),
    ("What color is snow?", "Snow is white."),
    ("What color is the sun?", "The sun looks yellow at noon and red at sunset."),
    ("What do cats like?", "Cats like to sleep in the sun and to chase mice."),
    ("What do dogs like?", "Dogs like to run, to play with a ball and to go for a walk."),
    ("What do birds do?", "Birds fly in the sky and sing in the morning."),
    ("What do fish do?", "Fish swim in the river and in the sea."),
    ("What do cows eat?", "Cows eat grass in the field."),
    ("What do bees make?", "Bees make honey from flowers."),
    ("Where do people live?", "People live in houses, in towns and in cities."),
    ("Where does the sun rise?", "The sun rises in the east and sets in the west."),
    ("Where is the moon at night?", "The moon is in the sky at night."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("How many months are in a year?", "There are twelve months in a year."),
    ("How many hours are in a day?", "There are twenty four hours in a day."),
    ("How many legs does a dog have?", "A dog has four legs."),
    ("How many legs does a bird have?", "A bird has two legs."),
    ("What is two plus two?", "Two plus two is four."),
    ("What is three plus four?", "Three plus four is seven."),
    ("What is ten minus one?", "Ten minus one is nine."),
    ("What is five times two?", "Five times two is ten."),
    ("What is the first day of the week?", "Many people say the first day of the week is Monday."),
    ("What do we drink in the morning?", "Many people drink tea or coffee in the morning."),
    ("What do we eat for breakfast?", "For breakfast we eat bread, eggs and fruit."),
    ("What is bread made of?", "Bread is made of flour, water, salt and yeast."),
    ("What is water?", "Water is a clear liquid that we drink every day."),
    ("What is rain?", "Rain is water that falls from the clouds."),
    ("What is a tree?", "A tree is a tall plant with a trunk, branches and leaves."),
    ("What is a river?", "A river is water that flows to the sea."),
    ("What is a mountain?", "A mountain is a very high hill made of rock."),
    ("What is a book?", "A book has pages with words and stories."),
    ("What is a computer?", "A computer is a machine that runs programs."),
    ("What is a program?", "A program is a list of steps that a computer follows."),
    ("What is a model?", "A model is a program that learns from data."),
    ("What is a language model?", "A language model predicts the next word in a sentence."),
    ("What is a server?", "A server is a computer that answers requests from clients."),
    ("What is a network?", "A network connects computers so they can talk to each other."),
    ("What is a token?", "A token is a small piece of text, like a word or part of a word."),
    ("Who writes programs?", "Programmers write programs and fix bugs."),
    ("Who teaches children?", "Teachers teach children to read and to write."),
    ("Who grows food?", "Farmers grow food in the fields."),
    ("Who helps sick people?", "Doctors and nurses help sick people."),
    ("What do you do when you are tired?", "When I am tired, I go to bed and sleep."),
    ("What do you do when you are hungry?", "When I am hungry, I eat some food."),
    ("What do you do when it is cold?", "When it is cold, I wear a warm coat."),
    ("What do you do when it rains?", "When it rains, I take an umbrella."),
    ("What is your name?", "My name is Tiny Llama. I am a small test model."),
    ("Who are you?", "I am a small language model made for tests."),
    ("Can you help me?", "Yes, I can help you. What do you need?"),
    ("Hello!", "Hello! How can I help you today?"),
    ("Good morning!", "Good morning! I hope you have a nice day."),
    ("Thank you!", "You are welcome."),
    ("How are you?", "I am fine, thank you. How are you?"),
    ("Tell me a story.", "Once upon a time, a little cat lived in a big house by the river."),
    ("Tell me a joke.", "Why did the computer sleep? Because it was tired of work."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the biggest animal?", "The blue whale is the biggest animal."),
    ("What is the fastest animal?", "The cheetah is the fastest animal on land."),
    ("What is ice?", "Ice is frozen water. It is cold and hard."),
    ("What is fire?", "Fire is hot and bright. It burns wood."),
    ("What is a garden?", "A garden is a place where flowers and vegetables grow."),
    ("What is music?", "Music is sound that people sing and play for joy."),
)

_NARRATIVE = (
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a small village near a big forest.",
    "Every morning the baker made fresh bread for the whole village.",
    "The children walked to school and talked about the weather.",
    "In the evening the family ate dinner together and told stories.",
    "The old man sat by the window and watched the rain.",
    "A small boat sailed across the lake in the afternoon.",
    "The library was quiet, and the books stood in long rows.",
    "She opened the door, looked outside and smiled at the sun.",
    "He wrote a long letter to his friend in the city.",
    "The train left the station at nine in the morning.",
    "The garden was full of red roses and yellow tulips.",
    "The server answered every request in a few milliseconds.",
    "The model read the prompt and wrote the next word.",
    "The worker loaded the model and waited for requests.",
    "The client sent a message and waited for the answer.",
)


def corpus() -> list[str]:
    """The built-in English training corpus: a few hundred short lines, always the same."""
    lines: list[str] = []
    for question, answer in _FACTS:
        lines.append(answer)
        lines.append(f"Question: {question} Answer: {answer}")
        lines.append(f"Q: {question}\nA: {answer}")
    lines.extend(_NARRATIVE)
    for a, b in zip(_NARRATIVE, _NARRATIVE[1:] + _NARRATIVE[:1], strict=True):
        lines.append(f"{a} {b}")
    return lines


def _chat_samples() -> list[str]:
    """The facts rendered through :data:`CHAT_TEMPLATE`, so the model learns the turn format."""
    system = "<|system|>\nYou are a helpful assistant.</s>\n"
    out = []
    for i, (question, answer) in enumerate(_FACTS):
        prefix = system if i % 3 == 0 else ""
        out.append(f"{prefix}<|user|>\n{question}</s>\n<|assistant|>\n{answer}</s>\n")
    return out


def _train_tokenizer() -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on the corpus and the chat samples."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        # Every byte gets a token, so any text (emoji, CJK) encodes without <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus() + _chat_samples(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def _marker(seed: int, train_steps: int) -> dict[str, int]:
    return {"recipe": _RECIPE_VERSION, "seed": seed, "train_steps": train_steps}


def _is_complete(out_dir: Path, seed: int, train_steps: int) -> bool:
    try:
        marker = json.loads((out_dir / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker == _marker(seed, train_steps)


def _build(tmp: Path, seed: int, train_steps: int) -> None:
    import torch
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    backend = _train_tokenizer()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens=list(ROLE_MARKERS),
        model_max_length=_ARCH["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {t: backend.token_to_id(t) for t in (BOS, EOS, PAD)}

    config = LlamaConfig(
        vocab_size=backend.get_vocab_size(),
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        tie_word_embeddings=True,
        **_ARCH,
    )
    # fork_rng keeps the caller's global torch RNG untouched while seeding ours.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        if train_steps > 0:
            _train(model, backend, seed=seed, steps=train_steps, eos_id=ids[EOS])
    model.eval()
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD], do_sample=False
    ).save_pretrained(tmp)


def _train(model: Any, backend: Any, *, seed: int, steps: int, eos_id: int) -> None:
    """A few hundred AdamW steps over the corpus: enough for word-like output, done in seconds."""
    import torch

    rng = random.Random(seed)
    texts = corpus() + _chat_samples() * 2
    stream: list[int] = []
    for _ in range(3):  # three shuffled passes, so block boundaries fall in different places
        rng.shuffle(texts)
        for text in texts:
            stream.extend(backend.encode(text).ids)
            stream.append(eos_id)
    n_blocks = len(stream) // _TRAIN_BLOCK
    data = torch.tensor(stream[: n_blocks * _TRAIN_BLOCK]).view(n_blocks, _TRAIN_BLOCK)
    model.train()
    # One intra-op thread: for a model this small it costs ~20% when the machine is idle, but
    # OpenMP barriers across threads stall badly (5x and worse) when other processes compete
    # for the cores, as they do under parallel test runs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_steps(model, data, seed=seed, steps=steps)
    finally:
        torch.set_num_threads(threads)


def _train_steps(model: Any, data: Any, *, seed: int, steps: int) -> None:
    import torch

    n_blocks = data.shape[0]
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = data[torch.randint(0, n_blocks, (_TRAIN_BATCH,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def make_test_model(out_dir: str | Path, *, seed: int = 0, train_steps: int = _TRAIN_STEPS) -> Path:
    """Write the tiny Llama chat model and its tokenizer into ``out_dir`` and return the path.

    Idempotent: a directory that already holds a complete model from the same recipe and seed
    is returned as is. The build happens in a sibling temporary directory and is moved into
    place at the end, so an interrupted build never leaves a half-written model behind.

    Args:
        out_dir: Target directory (created if missing).
        seed: Seeds weights, training order and sampling; the same seed gives the same model
            on the same machine.
        train_steps: Training steps on the built-in corpus (0 keeps random weights).

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.
    """
    out = Path(out_dir)
    if _is_complete(out, seed, train_steps):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        _build(tmp, seed, train_steps)
        (tmp / _MARKER).write_text(json.dumps(_marker(seed, train_steps)))
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if not out.exists():
            try:
                os.replace(tmp, out)
                return out
            except OSError:
                # Another process finished the same build first; keep theirs if it is complete.
                if _is_complete(out, seed, train_steps):
                    return out
                raise
        # A directory with other content (an older recipe, a partial copy): overwrite our files
        # in it, the marker last so it only claims completeness once everything is there.
        out.mkdir(parents=True, exist_ok=True)
        (out / _MARKER).unlink(missing_ok=True)
        for item in sorted(tmp.iterdir(), key=lambda p: p.name == _MARKER):
            os.replace(item, out / item.name)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
