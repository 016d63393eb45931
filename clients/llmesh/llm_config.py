"""Byzer-LLM's ``llm_config`` dicts turned into ``GenerationParams`` for the workers.

Keys may carry Byzer-LLM's ``gen.`` / ``generation.`` prefix; known keys become typed fields,
the rest travel in ``params.extra`` for engines that understand them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from llmesh.common.errors import InvalidArgument
from llmesh.v1 import common_pb2

#: Byzer-LLM prefixes engine parameters with "gen." or "generation."; both are stripped.
CONFIG_PREFIXES = ("gen.", "generation.")
#: Spellings of the output-length limit, most specific first.
MAX_TOKENS_KEYS = ("max_tokens", "max_new_tokens", "max_length")
#: Times a stream that breaks after output moves to another replica, unless ``max_migrations``
#: says otherwise.
DEFAULT_MAX_MIGRATIONS = 3

#: Byzer-LLM's internal flags that mean nothing to a worker.
_DROPPED_KEYS = frozenset({"stream", "abort"})


@dataclasses.dataclass
class GenerationConfig:
    """What an ``llm_config`` dict asks for.

    Attributes:
        params: sampling and stopping parameters for the worker.
        request_id: the caller's request id (``gen.request_id``), or "" to let the SDK make one.
        timeout: deadline for the call in seconds (``timeout_s``), or None.
        affinity_key: requests with the same key go to the same replica (``affinity_key``).
        max_migrations: how many times a stream that breaks after output may move to another
            replica and continue where it was (``max_migrations``; 0 turns it off).
    """

    params: common_pb2.GenerationParams
    request_id: str = ""
    timeout: float | None = None
    affinity_key: str = ""
    max_migrations: int = DEFAULT_MAX_MIGRATIONS


def strip_config_prefix(key: str) -> str:
    """``"gen.temperature"`` and ``"generation.temperature"`` become ``"temperature"``."""
    for prefix in CONFIG_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def as_float(key: str, value: Any) -> float:
    """``llm_config[key]`` as a float (a number or its text).

    Args:
        key: the key, for the error message.
        value: the value given.

    Raises:
        InvalidArgument: not a number (booleans are refused).
    """
    if isinstance(value, bool):
        raise InvalidArgument(f"llm_config[{key!r}] must be a number, got {value!r}")
    try:
        return float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"llm_config[{key!r}] must be a number, got {value!r}") from None


def as_int(key: str, value: Any) -> int:
    """``llm_config[key]`` as a whole number (``3``, ``3.0`` or ``"3"``).

    Args:
        key: the key, for the error message.
        value: the value given.

    Raises:
        InvalidArgument: not a whole number.
    """
    number = as_float(key, value)
    if not number.is_integer():
        raise InvalidArgument(f"llm_config[{key!r}] must be a whole number, got {value!r}")
    return int(number)


def _as_int_list(key: str, value: Any) -> list[int]:
    items = value if isinstance(value, (list, tuple)) else [value]
    return [as_int(key, item) for item in items]


def _as_str_list(key: str, value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
        raise InvalidArgument(
            f"llm_config[{key!r}] must be a string or a list of strings, got {value!r}"
        )
    if any(s == "" for s in items):
        raise InvalidArgument(f"llm_config[{key!r}] holds an empty stop string")
    return list(items)


def check_max_migrations(value: Any) -> int:
    """``value`` as a migration bound (an int, 0 or more).

    Raises:
        InvalidArgument: it is not an int, or it is negative.
    """
    n = as_int("max_migrations", value)
    if n < 0:
        raise InvalidArgument(
            f"max_migrations must be 0 (no failover) or more, got {value!r}; it bounds how "
            "often a broken stream moves to another replica"
        )
    return n


def generation_config(llm_config: Mapping[str, Any] | None) -> GenerationConfig:
    """Turn a Byzer-LLM ``llm_config`` dict into a :class:`GenerationConfig`.

    Keys may carry Byzer-LLM's ``gen.`` / ``generation.`` prefix. Known keys become typed
    fields: ``temperature``, ``top_p``, ``top_k``, ``max_tokens`` (also ``max_new_tokens`` and
    ``max_length``, the first one present in that order wins), ``stop`` (string or list),
    ``stop_token_ids`` (int or list; Byzer-LLM's ``stopping_sequences`` is read as ``stop``),
    ``repetition_penalty``, ``seed``; ``request_id`` names the request (for ``abort``);
    ``timeout_s`` sets the call deadline; ``affinity_key`` keeps related requests on one
    replica; ``max_migrations`` bounds how often a broken stream moves to another replica.
    Keys set to None are skipped. Every other key goes to ``params.extra`` for engines
    that understand it.

    Args:
        llm_config: the dict given to ``chat_oai`` / ``stream_chat_oai``; None means empty.

    Raises:
        InvalidArgument: a known key has a value of the wrong type, or an unknown key's value
            cannot be carried as JSON.
    """
    params = common_pb2.GenerationParams()
    out = GenerationConfig(params=params)
    flat: dict[str, Any] = {}
    for raw_key, value in (llm_config or {}).items():
        if value is None:
            continue
        flat[strip_config_prefix(str(raw_key))] = value
    extra: dict[str, Any] = {}
    for key, value in flat.items():
        if key == "temperature":
            params.temperature = as_float(key, value)
        elif key == "top_p":
            params.top_p = as_float(key, value)
        elif key == "top_k":
            params.top_k = as_int(key, value)
        elif key in MAX_TOKENS_KEYS:
            continue  # resolved below, by precedence rather than by dict order
        elif key in ("stop", "stopping_sequences"):
            params.stop.extend(s for s in _as_str_list(key, value) if s not in params.stop)
        elif key == "stop_token_ids":
            params.stop_token_ids.extend(_as_int_list(key, value))
        elif key == "repetition_penalty":
            params.repetition_penalty = as_float(key, value)
        elif key == "seed":
            params.seed = as_int(key, value)
        elif key == "request_id":
            out.request_id = str(value)
        elif key == "timeout_s":
            out.timeout = as_float(key, value)
            if out.timeout <= 0:
                raise InvalidArgument(f"llm_config[{key!r}] must be positive, got {value!r}")
        elif key == "affinity_key":
            out.affinity_key = str(value)
        elif key == "max_migrations":
            out.max_migrations = check_max_migrations(value)
        elif key in _DROPPED_KEYS:
            continue
        else:
            extra[key] = value
    for key in MAX_TOKENS_KEYS:
        if key in flat:
            params.max_tokens = as_int(key, flat[key])
            if params.max_tokens <= 0:
                raise InvalidArgument(f"llm_config[{key!r}] must be positive, got {flat[key]!r}")
            break
    if extra:
        try:
            params.extra.update(extra)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(
                f"llm_config has a value that is not JSON-like ({exc}); "
                "use strings, numbers, booleans, lists and dicts"
            ) from None
    return out


def byzer_flags(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Flags with their ``gen.`` / ``generation.`` prefix removed, for non-generation calls."""
    return {strip_config_prefix(str(k)): v for k, v in (config or {}).items()}
