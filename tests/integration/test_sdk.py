"""The Byzer-LLM compatible SDK against a real mesh: two workers, real engines, real etcd."""

from __future__ import annotations

import asyncio
import math
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmesh import ByzerLLM
from llmesh.common.errors import DeadlineExceeded, InvalidArgument, NotFound

from .conftest import Mesh

HELLO = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def sdk_mesh(
    etcd_server: Any, test_model_dir: Path, embedding_model_dir: Path
) -> Iterator[tuple[Mesh, ByzerLLM]]:
    """Two workers; chat on two replicas (one per worker), embeddings on one."""
    mesh = Mesh(etcd_server.endpoint, f"/llmesh-sdk-{uuid.uuid4().hex[:6]}")
    address = mesh.start_control_plane()
    mesh.start_worker("w0", cpus=2)
    mesh.start_worker("w1", cpus=2)
    llm = ByzerLLM(control_plane=address)
    llm.setup_num_workers(2).setup_cpus_per_worker(1).setup_infer_backend("transformers")
    llm.deploy(str(test_model_dir), "custom/llama", "chat", {"max_concurrency": 4})
    llm.setup_num_workers(1).setup_cpus_per_worker(0.5).setup_infer_backend("embedding")
    llm.deploy(str(embedding_model_dir), "custom/auto", "emb", {})
    llm.setup_infer_backend("rerank").deploy(str(embedding_model_dir), "custom/auto", "rerank", {})
    yield mesh, llm
    llm.close()
    mesh.close()


def _served(mesh: Mesh, model: str = "chat") -> dict[str, int]:
    return mesh.served(model)


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after}


def test_deploy_places_replicas_on_both_workers(sdk_mesh: Any) -> None:
    _, llm = sdk_mesh
    model = llm.get_model("chat")
    assert sorted(r.worker_id for r in model.replicas) == ["w0", "w1"]
    assert llm.is_model_exist("chat") and not llm.is_model_exist("nope")


def test_stream_chat_oai_end_to_end(sdk_mesh: Any) -> None:
    _, llm = sdk_mesh
    items = list(llm.stream_chat_oai(HELLO, model="chat", llm_config={"max_length": 16}))
    assert len(items) >= 2
    texts = [t for t, _ in items]
    assert all(texts[i].startswith(texts[i - 1]) for i in range(1, len(texts)))
    final_meta = items[-1][1]
    assert final_meta["finish_reason"] in ("stop", "length")
    assert final_meta["generated_tokens_count"] >= 1 and final_meta["input_tokens_count"] > 0
    (resp,) = llm.chat_oai(HELLO, model="chat", llm_config={"max_length": 16, "temperature": 0})
    assert (
        resp.output
        == llm.chat_oai(HELLO, model="chat", llm_config={"max_length": 16, "temperature": 0})[
            0
        ].output
    )


def test_seeded_sampling_is_reproducible_across_replicas(sdk_mesh: Any) -> None:
    _, llm = sdk_mesh
    llm.setup_load_balance_way("round_robin")
    cfg = {"max_length": 20, "temperature": 1.0, "seed": 7, "ignore_eos": True}
    outs = {llm.chat_oai(HELLO, model="chat", llm_config=cfg)[0].output for _ in range(4)}
    llm.setup_load_balance_way("lru")
    assert len(outs) == 1


def test_embeddings_of_similar_sentences_are_closer(sdk_mesh: Any) -> None:
    _, llm = sdk_mesh
    a, b, c = (
        r.output
        for r in llm.emb(
            "emb",
            [
                "A man is eating food.",
                "A man is eating a piece of bread.",
                "A man is riding a horse.",
            ],
        )
    )

    def cos(x: list[float], y: list[float]) -> float:
        return sum(i * j for i, j in zip(x, y, strict=True)) / math.sqrt(
            sum(i * i for i in x) * sum(j * j for j in y)
        )

    assert len(a) == 384
    assert cos(a, b) > cos(a, c) + 0.2
    assert llm.emb_query("hello", model="emb")[0].output


def test_rerank_puts_relevant_passage_first(sdk_mesh: Any) -> None:
    _, llm = sdk_mesh
    query = "How do plants make food?"
    passages = [
        "The stock market closed higher on Friday.",
        "Photosynthesis lets plants turn sunlight, water and CO2 into sugar.",
        "My cat sleeps most of the afternoon.",
    ]
    ranked = llm.emb_rerank("rerank", [(query, p) for p in passages])[0].output
    assert ranked[0][0][1] == passages[1]
    assert ranked[0][1] > ranked[1][1] >= ranked[2][1]


def test_tokenize_template_meta(sdk_mesh: Any) -> None:
    _, llm = sdk_mesh
    assert llm.tokenize("chat", "hello world")[0].output[0]
    prompt = llm.apply_chat_template("chat", HELLO)
    assert "capital of France" in prompt
    meta = llm.get_meta(model="chat")
    assert meta["backend"] == "transformers" and meta["support_stream"]


@pytest.mark.parametrize("policy", ["round_robin", "random", "lru"])
def test_two_replicas_share_load(sdk_mesh: Any, policy: str) -> None:
    mesh, llm = sdk_mesh
    llm.setup_load_balance_way(policy)
    before = _served(mesh)
    cfg = {"max_length": 4, "temperature": 0}
    if policy == "lru":
        # Least-loaded needs concurrency to tell replicas apart: 8 requests at once.
        threads = [
            threading.Thread(
                target=llm.chat_oai, args=(HELLO,), kwargs={"model": "chat", "llm_config": cfg}
            )
            for _ in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    else:
        for _ in range(20):
            llm.chat_oai(HELLO, model="chat", llm_config=cfg)
    llm.setup_load_balance_way("lru")
    got = _delta(before, _served(mesh))
    assert got["w0"] > 0 and got["w1"] > 0, got
    if policy == "round_robin":
        assert got == {"w0": 10, "w1": 10}


def test_pinning_holds(sdk_mesh: Any) -> None:
    mesh, llm = sdk_mesh
    chat = llm.get_model("chat")
    pinned = next(r for r in chat.replicas if r.index == 1).worker_id
    before = _served(mesh)
    llm.setup_pin_model_worker_mapping({"chat": 1}).setup_load_balance_way("round_robin")
    for _ in range(6):
        llm.chat_oai(HELLO, model="chat", llm_config={"max_length": 2})
    llm.setup_pin_model_worker_mapping(None).setup_load_balance_way("lru")
    got = _delta(before, _served(mesh))
    assert got[pinned] == 6 and sum(got.values()) == 6, got


def test_abort_through_the_sdk(sdk_mesh: Any) -> None:
    mesh, llm = sdk_mesh
    rid = f"sdk-{uuid.uuid4().hex[:6]}"
    cfg = {"max_length": 1500, "ignore_eos": True, "request_id": rid, "temperature": 0}
    stream = llm.stream_chat_oai(HELLO, model="chat", llm_config=cfg)
    next(stream)
    assert llm.abort(rid, model="chat")
    *_, (_, meta) = stream
    assert meta["finish_reason"] == "abort"
    assert mesh.wait_idle(5)


def test_breaking_out_of_a_stream_frees_the_slot(sdk_mesh: Any) -> None:
    mesh, llm = sdk_mesh
    cfg = {"max_length": 1500, "ignore_eos": True}
    for i, _ in enumerate(llm.stream_chat_oai(HELLO, model="chat", llm_config=cfg)):
        if i == 2:
            break
    assert mesh.wait_idle(5)


def test_sdk_errors_are_typed(sdk_mesh: Any) -> None:
    _, llm = sdk_mesh
    with pytest.raises(NotFound, match="nope"):
        llm.chat_oai(HELLO, model="nope")
    with pytest.raises(InvalidArgument, match="temperature"):
        llm.chat_oai(HELLO, model="chat", llm_config={"temperature": -1})
    with pytest.raises(InvalidArgument, match="token"):
        llm.chat_oai([{"role": "user", "content": "word " * 5000}], model="chat")


def test_over_capacity_waits_in_line_until_its_deadline(sdk_mesh: Any) -> None:
    mesh, llm = sdk_mesh
    cfg = {"max_length": 1500, "ignore_eos": True}
    # 2 replicas x max_concurrency 4 = 8 slots: hold them all; the ninth waits in a queue
    # (instead of bouncing) until its own deadline passes. The held streams are pinned four
    # to a replica so this test does not depend on how the router spreads them.
    held = []
    try:
        for index in (0, 1):
            llm.setup_pin_model_worker_mapping({"chat": index})
            for _ in range(4):
                stream = llm.stream_chat_oai(HELLO, model="chat", llm_config=cfg)
                next(stream)
                held.append(stream)
        llm.setup_pin_model_worker_mapping(None)
        try:
            answer = llm.chat_oai(HELLO, model="chat", llm_config={"max_length": 2, "timeout_s": 1})
        except DeadlineExceeded as e:
            assert "deadline" in str(e)
        else:
            loads = [(r.worker_id, r.inflight, r.queued) for r in llm.get_model("chat").replicas]
            pytest.fail(
                f"the ninth request was served while eight slots were held: {answer[0].metadata}; "
                f"replicas (worker, in flight, queued): {loads}"
            )
    finally:
        llm.setup_pin_model_worker_mapping(None)
        for s in held:
            s.close()
    assert mesh.wait_idle(10)


@pytest.fixture(scope="module")
def burst_model(sdk_mesh: Any, test_model_dir: Path) -> Iterator[str]:
    """A model on two replicas with 16 slots each, for bursts of concurrent streams."""
    _, llm = sdk_mesh
    llm.setup_num_workers(2).setup_cpus_per_worker(0.5).setup_infer_backend("transformers")
    llm.deploy(str(test_model_dir), "custom/llama", "burst", {"max_concurrency": 16})
    yield "burst"
    llm.undeploy("burst", wait=True)


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_burst_of_streams_spreads_over_replicas(
    sdk_mesh: Any, burst_model: str, flavour: str
) -> None:
    """16 streams started at once over two equal replicas land 8 ± 1 on each."""
    mesh, llm = sdk_mesh
    llm.setup_load_balance_way("lru")
    before = _served(mesh, burst_model)
    cfg = {"max_length": 6, "temperature": 0, "ignore_eos": True}
    if flavour == "async":

        async def one() -> int:
            n = 0
            async for _ in llm.async_stream_chat_oai(HELLO, model=burst_model, llm_config=cfg):
                n += 1
            return n

        async def burst() -> list[int]:
            try:
                return await asyncio.gather(*(one() for _ in range(16)))
            finally:
                await llm.aclose_async_channels()

        counts = asyncio.run(burst())
    else:
        gate = threading.Barrier(16)
        counts = []

        def one() -> None:
            gate.wait()
            counts.append(len(list(llm.stream_chat_oai(HELLO, model=burst_model, llm_config=cfg))))

        threads = [threading.Thread(target=one) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert len(counts) == 16 and all(n >= 1 for n in counts), counts
    got = _delta(before, _served(mesh, burst_model))
    assert sorted(got) == ["w0", "w1"] and abs(got["w0"] - got["w1"]) <= 2, got
