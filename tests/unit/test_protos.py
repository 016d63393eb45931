"""The .proto files are the contract: committed stubs must match them, and they follow Buf style."""

from __future__ import annotations

import filecmp
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTOS = sorted((ROOT / "protos" / "llmesh" / "v1").glob("*.proto"))


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_protos(tmp_path: Path) -> None:
    generated = _load_generator().generate(tmp_path)
    assert generated, "protoc produced nothing"
    committed = ROOT / "clients" / "llmesh" / "v1"
    for path in generated:
        twin = committed / path.name
        assert twin.exists(), f"{path.name} is not committed; run python scripts/gen_protos.py"
        assert filecmp.cmp(path, twin, shallow=False), (
            f"{path.name} drifted from protos/; run python scripts/gen_protos.py and commit"
        )
    extra = {p.name for p in committed.glob("*_pb2*.py*")} - {p.name for p in generated}
    assert not extra, f"stale generated files with no .proto: {sorted(extra)}"


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_buf_style(proto: Path) -> None:
    text = proto.read_text()
    assert "package llmesh.v1;" in text
    for service in re.findall(r"^service (\w+)", text, re.M):
        assert service.endswith("Service"), service
        assert proto.name == re.sub(r"(?<!^)(?=[A-Z])", "_", service).lower() + ".proto"
    for rpc, req, resp in re.findall(
        r"rpc (\w+)\((?:stream )?(\w+)\) returns \((?:stream )?(\w+)\)", text
    ):
        assert req == f"{rpc}Request", f"{rpc} takes {req}"
        assert resp == f"{rpc}Response", f"{rpc} returns {resp}"
    for enum, body in re.findall(r"^enum (\w+) \{(.*?)^\}", text, re.M | re.S):
        prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum).upper()
        values = re.findall(r"^\s+(\w+) = (\d+);", body, re.M)
        assert values[0] == (f"{prefix}_UNSPECIFIED", "0"), enum
        assert all(v.startswith(prefix + "_") for v, _ in values), enum
