"""Tokens: format, hashing, records, verification, the role table and training path roots."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from llmesh.common.auth import (
    ROLE_ADMIN,
    ROLE_USER,
    TokenRecord,
    TokenTable,
    bearer_of,
    check_model,
    new_token,
    parse_token,
    reset_current_principal,
    set_current_principal,
)
from llmesh.common.auth_policy import OPEN, RULES, role_allows, rule_for
from llmesh.common.auth_store import read_token_file, write_token_file
from llmesh.common.errors import PermissionDenied, Unauthenticated, error_for_code
from llmesh.trainer_worker.path_policy import PathPolicy, roots_from_env
from llmesh.v1 import (
    control_plane_service_pb2,
    inference_service_pb2,
    replica_service_pb2,
    trainer_service_pb2,
)
from llmesh.v1 import trainer_service_pb2 as tr


def test_a_token_is_an_id_and_a_secret_and_only_the_hash_is_stored() -> None:
    token, record = new_token("ci", ROLE_USER, ["chat", " ", "chat", "emb"])
    prefix, token_id, secret = token.split("_", 2)
    assert prefix == "llmesh" and token_id == record.id and len(token_id) == 12
    assert len(secret) >= 43  # 32 random bytes, URL-safe base64
    assert record.secret_sha256 == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in record.to_json().decode()
    assert record.models == ("chat", "emb")
    assert parse_token(token) == (token_id, secret)
    assert new_token("ci", ROLE_USER)[0] != token  # random every time


def test_records_round_trip_and_bad_ones_are_refused() -> None:
    _, record = new_token("ops", ROLE_ADMIN)
    assert TokenRecord.from_json(record.to_json()) == record
    raw = json.loads(record.to_json())
    for field, value in (("role", "root"), ("id", "XYZ"), ("secret_sha256", "abc")):
        with pytest.raises(ValueError):
            TokenRecord.from_dict({**raw, field: value})
    with pytest.raises(ValueError, match="is not one of"):
        new_token("x", "superuser")


@pytest.mark.parametrize(
    "text",
    ["", "Bearer", "llmesh_abc_def", "llmesh_0123456789ab_short", "sk-0123456789abcdef0123456789"],
)
def test_text_that_is_not_a_token_is_unauthenticated(text: str) -> None:
    with pytest.raises(Unauthenticated, match="llmesh_<id>_<secret>"):
        parse_token(text)


def test_verify_accepts_the_token_and_refuses_wrong_unknown_and_revoked() -> None:
    token, record = new_token("alice", ROLE_USER, ["chat"])
    other, other_record = new_token("bob", ROLE_ADMIN)
    table = TokenTable([record, other_record])
    principal = table.verify(token)
    assert (principal.id, principal.name, principal.role, principal.models) == (
        record.id,
        "alice",
        ROLE_USER,
        ("chat",),
    )
    assert principal.who == f"alice ({record.id})" and principal.token == token
    assert "llmesh_" not in repr(principal)  # the token never shows up in logs
    with pytest.raises(Unauthenticated, match="requires a bearer token"):
        table.verify(None)
    wrong_secret = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(Unauthenticated, match="unknown, revoked or wrong"):
        table.verify(wrong_secret)
    # Another token's secret with this id: the hash is per record.
    with pytest.raises(Unauthenticated):
        table.verify(f"llmesh_{record.id}_{other.split('_', 2)[2]}")
    table.remove(record.id)
    with pytest.raises(Unauthenticated, match="unknown, revoked or wrong"):
        table.verify(token)
    table.replace([])
    with pytest.raises(Unauthenticated):
        table.verify(other)


def test_bearer_metadata() -> None:
    assert bearer_of([("authorization", "Bearer abc")]) == "abc"
    assert bearer_of([("x", "y"), ("Authorization", b"bearer  abc ")]) == "abc"
    assert bearer_of([("authorization", "Basic abc")]) is None
    assert bearer_of(None) is None


def test_model_scope() -> None:
    token, record = new_token("limited", ROLE_USER, ["chat"])
    principal = TokenTable([record]).verify(token)
    check_model("anything")  # no caller: tokens are off
    ctx = set_current_principal(principal)
    try:
        check_model("chat")
        with pytest.raises(PermissionDenied, match="may use only chat, not model 'emb'"):
            check_model("emb")
    finally:
        reset_current_principal(ctx)


def test_a_revoke_reaches_a_caller_resolved_before_it() -> None:
    token, record = new_token("long stream", ROLE_USER)
    other = new_token("other", ROLE_USER)[1]
    table = TokenTable([record, other])
    ctx = set_current_principal(table.verify(token))
    try:
        check_model("chat")
        table.remove(other.id)  # a change elsewhere: looked up again, still valid
        check_model("chat")
        table.remove(record.id)
        with pytest.raises(Unauthenticated, match="revoked while this stream was open"):
            check_model("chat")
    finally:
        reset_current_principal(ctx)


def test_token_file_follower_survives_a_broken_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio
    import time

    from llmesh.common.auth_store import TokenFileFollower

    path = tmp_path / "tokens.json"
    first, second = (new_token(n, ROLE_USER)[1] for n in ("first", "second"))
    write_token_file(path, [first])
    table = TokenTable()

    async def wait_for(condition: object) -> None:
        deadline = time.monotonic() + 15
        while not condition():  # type: ignore[operator]
            assert time.monotonic() < deadline, "the follower did not catch up"
            await asyncio.sleep(0.02)

    async def scenario() -> None:
        follower = TokenFileFollower(path, table, interval=0.02)
        await follower.start()
        try:
            assert table.records() == [first]
            # A KeyError (no role) and a TypeError (not an object), not just a ValueError.
            for broken, error in (
                ('{"tokens": [{"id": "0123456789ab"}]}', "KeyError"),
                ('{"tokens": [5]}', "TypeError"),
            ):
                path.write_text(broken)
                await wait_for(lambda e=error: e in caplog.text)
            await asyncio.sleep(0.1)  # several polls on the broken file
            assert table.records() == [first]  # kept: see the auth_store docstring
            assert follower._task is not None and not follower._task.done()
            write_token_file(path, [second])
            await wait_for(lambda: table.records() == [second])
        finally:
            await follower.stop()

    with caplog.at_level("ERROR", logger="llmesh.common.auth_store"):
        asyncio.run(scenario())
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    # Once per distinct error, not once per poll.
    assert len(errors) <= 4, [r.getMessage() for r in errors]


def test_errors_travel_as_their_status_codes() -> None:
    import grpc

    assert isinstance(error_for_code(grpc.StatusCode.UNAUTHENTICATED, "x"), Unauthenticated)
    assert isinstance(error_for_code(grpc.StatusCode.PERMISSION_DENIED, "x"), PermissionDenied)


def test_every_rpc_of_every_service_has_a_rule() -> None:
    served = {
        f"/{service.full_name}/{method.name}"
        for module in (
            control_plane_service_pb2,
            inference_service_pb2,
            replica_service_pb2,
            trainer_service_pb2,
        )
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert served == set(RULES), "classify new RPCs in llmesh.common.auth_policy.RULES"
    # Unary requests that name a model say where (the interceptor checks the scope).
    for method, rule in RULES.items():
        if rule.models is None and not rule.streamed_models:
            assert method.rsplit("/", 1)[1] in {
                "ListModels",
                "ListWorkers",
                "CreateTrainingJob",
                "GetTrainingJob",
                "ListTrainingJobs",
                "CancelTrainingJob",
                "WatchTrainingJob",
                "Abort",
                "WatchReplica",
                "Drain",
                "GetJob",
                "WatchJob",
            }, method


def test_roles() -> None:
    assert rule_for("/grpc.health.v1.Health/Check").role == OPEN
    assert rule_for("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo").role == (
        ROLE_USER
    )
    assert rule_for("/llmesh.v1.ControlPlaneService/SomethingNew").role == ROLE_ADMIN
    assert role_allows(ROLE_ADMIN, ROLE_USER) and not role_allows(ROLE_USER, ROLE_ADMIN)


def test_token_file_round_trip(tmp_path: Path) -> None:
    records = [new_token(n, ROLE_USER)[1] for n in ("a", "b")]
    path = tmp_path / "tokens.json"
    assert read_token_file(path) == []
    write_token_file(path, records)
    assert read_token_file(path) == records
    assert path.stat().st_mode & 0o777 == 0o600
    path.write_text("{}")
    with pytest.raises(ValueError, match="must hold"):
        read_token_file(path)


def test_training_paths_stay_under_the_roots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, jobs, outside = tmp_path / "data", tmp_path / "jobs", tmp_path / "elsewhere"
    for d in (root, jobs, outside):
        d.mkdir()
    (root / "escape").symlink_to(outside)
    policy = PathPolicy([root], jobs)
    ok = tr.TrainingJobSpec(base_model_path=str(root / "m"), data_path=str(root / "d.jsonl"))
    policy.check(ok, str(jobs / "sft-1"))
    bad = {
        "data_path": str(root / ".." / "elsewhere" / "d.jsonl"),
        "base_model_path": str(root / "escape" / "m"),  # a symlink out of the root
        "tokenizer_path": "/etc",
        "model_config": str(outside / "config.json"),
    }
    for field, value in bad.items():
        spec = tr.TrainingJobSpec()
        spec.CopyFrom(ok)
        setattr(spec, field, value)
        with pytest.raises(PermissionDenied, match=f"spec.{field} .* is outside"):
            policy.check(spec, str(jobs / "sft-1"))
    with pytest.raises(PermissionDenied, match=r"spec\.output_dir"):
        policy.check(ok, str(outside / "out"))
    policy.check(tr.TrainingJobSpec(model_config='{"hidden_size": 64}'), str(jobs / "x"))
    monkeypatch.setenv("LLMESH_ALLOWED_ROOTS", f"{root}:{outside}")
    assert roots_from_env(None) == [root.resolve(), outside.resolve()]
    monkeypatch.delenv("LLMESH_ALLOWED_ROOTS")
    assert roots_from_env(None) is None


def test_training_paths_must_be_absolute_and_deepspeed_paths_are_checked(
    tmp_path: Path,
) -> None:
    root, jobs = tmp_path / "data", tmp_path / "jobs"
    root.mkdir()
    jobs.mkdir()
    policy = PathPolicy([root], jobs)
    out = str(jobs / "sft-1")
    # Relative: the worker would check it against its own cwd, the runner use it in out.
    for field in ("data_path", "base_model_path", "output_dir"):
        spec = tr.TrainingJobSpec(**{field: "data/d.jsonl"})
        with pytest.raises(PermissionDenied, match=f"spec.{field} .* is a relative path"):
            policy.check(spec, out)
    ok = {
        "zero_optimization": {"offload_param": {"device": "nvme", "nvme_path": str(root)}},
        "tensorboard": {"enabled": True, "output_path": "tb"},  # under out: allowed
        "train_batch_size": 8,
    }
    policy.check(tr.TrainingJobSpec(deepspeed_config_json=json.dumps(ok)), out)
    for config, where in (
        ({"zero_optimization": {"offload_param": {"nvme_path": "/tmp"}}}, "nvme_path"),
        ({"tensorboard": {"output_path": "../../.."}}, "tensorboard.output_path"),
        ({"csv_monitor": {"output_path": "/etc"}}, "csv_monitor.output_path"),
        ({"flops_profiler": {"output_file": "/etc/x"}}, "flops_profiler.output_file"),
        ({"checkpoint": {"dirs": [1], "load_dir": ["/etc"]}}, "checkpoint.load_dir"),
    ):
        spec = tr.TrainingJobSpec(deepspeed_config_json=json.dumps(config))
        with pytest.raises(PermissionDenied, match=rf"deepspeed_config_json\..*{where} .* outside"):
            policy.check(spec, out)
    from llmesh.common.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="not valid JSON"):
        policy.check(tr.TrainingJobSpec(deepspeed_config_json="{nope"), out)


def test_remote_code_needs_both_keys() -> None:
    from llmesh.common.backends import check_infer_params
    from llmesh.inference_worker.engines.base import EngineConfig
    from llmesh.inference_worker.remote_code import check_remote_code, remote_code_guard

    for backend in ("transformers", "vllm", "deepspeed", "embedding", "rerank", "auto"):
        assert check_infer_params(backend, {"trust_remote_code": "true"}) == {
            "trust_remote_code": True
        }
    check_remote_code("m", {}, allowed=False)
    check_remote_code("m", {"trust_remote_code": "false"}, allowed=False)
    check_remote_code("m", {"trust_remote_code": "true"}, allowed=True)
    built: list[str] = []

    def factory(config: EngineConfig) -> object:
        built.append(config.model_name)
        return object()

    guarded = remote_code_guard(factory, allowed=False)  # type: ignore[arg-type]
    config = EngineConfig(
        model_name="m",
        model_path="/x",
        backend="transformers",
        infer_params={"trust_remote_code": "TRUE"},
    )
    with pytest.raises(PermissionDenied, match="does not allow it"):
        guarded(config)
    assert built == []  # refused before any engine was built
    remote_code_guard(factory, allowed=True)(config)  # type: ignore[arg-type]
    assert built == ["m"]


def test_replicas_token_dir_must_be_private(tmp_path: Path) -> None:
    from llmesh.common.errors import FailedPrecondition
    from llmesh.inference_worker.agent_auth import private_dir

    fresh = tmp_path / "run" / "auth"
    private_dir(fresh)
    assert fresh.stat().st_mode & 0o777 == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(FailedPrecondition, match="chmod 700"):
        private_dir(shared)
    (tmp_path / "link").symlink_to(fresh)
    with pytest.raises(FailedPrecondition, match="must be a directory"):
        private_dir(tmp_path / "link")


def test_a_failed_write_of_the_replicas_token_file_is_retried(tmp_path: Path) -> None:
    import asyncio
    import time

    from llmesh.inference_worker.agent_auth import AgentAuth

    source = tmp_path / "source.json"
    record = new_token("ops", ROLE_USER)[1]
    write_token_file(source, [record])
    target = tmp_path / "run" / "auth" / "tokens.json"
    target.mkdir(parents=True)  # a directory where the file goes: the first writes fail

    async def scenario() -> list[TokenRecord]:
        auth = AgentAuth("127.0.0.1:1", "/ns", source_file=str(source))
        await auth.start("w0", target)
        try:
            assert target.is_dir()
            target.rmdir()  # the obstacle goes away: a retry must write the file
            deadline = time.monotonic() + 15
            while not target.is_file():
                assert time.monotonic() < deadline, "the token file was never written"
                await asyncio.sleep(0.05)
            return read_token_file(target)
        finally:
            await auth.close()

    written = asyncio.run(scenario())
    assert record in written and any(r.role == ROLE_ADMIN for r in written)


def test_concurrent_token_file_updates_lose_nothing(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from llmesh.common.auth_store import update_token_file

    path = tmp_path / "tokens.json"
    made = [new_token(f"t{i}", ROLE_USER)[1] for i in range(40)]
    with ThreadPoolExecutor(8) as pool:
        # Each update reads, adds one and writes: without the lock, some would be lost.
        list(pool.map(lambda r: update_token_file(path, lambda rs: [*rs, r]), made))
    assert sorted(r.id for r in read_token_file(path)) == sorted(r.id for r in made)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
