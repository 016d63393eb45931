"""Status messages fit the grpc-message trailer even when they echo a huge request value."""

from __future__ import annotations

import grpc

from llmesh.common.errors import (
    MAX_STATUS_MESSAGE_BYTES,
    NotFound,
    _encoded_len,
    fit_status_message,
    status_for,
)


def test_short_messages_are_kept_as_they_are() -> None:
    message = "model 'chat' is not deployed; deploy it first"
    assert fit_status_message(message) == message


def test_a_huge_echoed_value_is_cut_in_the_middle_keeping_what_and_how() -> None:
    name = "\U000433cc" * 200_000  # 4-byte characters: 12 bytes each once percent-encoded
    code, message = status_for(NotFound(f"model {name!r} is not deployed; see ListModels"))
    assert code == grpc.StatusCode.NOT_FOUND
    assert message.startswith("model '") and message.endswith("is not deployed; see ListModels")
    assert "characters cut" in message
    assert sum(map(_encoded_len, message)) <= MAX_STATUS_MESSAGE_BYTES
