"""Hypothesis strategies for protobuf messages, built from their descriptors.

:func:`messages` walks a message descriptor and draws a message with a random subset of its
fields set, each from its type: integers at and past the extremes, floats with nan and
infinities, strings empty, huge, unicode or with NULs, enum values the proto does not define,
repeated fields and maps short or long, nested messages to a bounded depth, oneofs set to any
member or none, and the well-known ``Struct`` / ``Value`` through their own descriptors.

Half the messages have every field set, the others a random subset (none included).
``bias`` mixes chosen values into fields by name (the deployed model names into ``model``, so
that a share of requests gets past the name lookup into the engine); ``override`` replaces a
field's strategy outright (throwaway names for the fields of mutating RPCs).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import descriptor as _d
from google.protobuf import message as _message
from google.protobuf import message_factory
from hypothesis import strategies as st

F = _d.FieldDescriptor

INT32 = (-(2**31), 2**31 - 1)
UINT32 = (0, 2**32 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT64 = (0, 2**64 - 1)

# Sizes of "huge" values: big enough to hurt a server that copies or tokenizes without limits,
# small enough that a case stays well under the 64 MiB message limit and a 2-core machine.
HUGE_TEXT = (10_000, 1_000_000)
LONG_LIST = (100, 5_000)
HUGE_MAP = (1_000, 20_000)
MAX_MESSAGE_BYTES = 8 * 1024 * 1024

_INT_RANGES = {
    F.TYPE_INT32: INT32,
    F.TYPE_SINT32: INT32,
    F.TYPE_SFIXED32: INT32,
    F.TYPE_UINT32: UINT32,
    F.TYPE_FIXED32: UINT32,
    F.TYPE_INT64: INT64,
    F.TYPE_SINT64: INT64,
    F.TYPE_SFIXED64: INT64,
    F.TYPE_UINT64: UINT64,
    F.TYPE_FIXED64: UINT64,
}


def integers(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Any integer in [lo, hi], with the extremes, the small ones and -1 drawn often."""
    edges = sorted({v for v in (lo, hi, 0, 1, -1, 2, lo + 1, hi - 1, 2**31 - 1) if lo <= v <= hi})
    return st.one_of(
        st.sampled_from(edges),
        st.integers(-3, 64).filter(lambda v: lo <= v <= hi),
        st.integers(lo, hi),
    )


def floats(width: int) -> st.SearchStrategy[float]:
    """Any float of that width: nan, ±inf, ±0, tiny, huge and ordinary values."""
    special = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1.0, -1.0, 0.5, 1e-45]
    special.append(3.4e38 if width == 32 else 1.7e308)
    return st.one_of(
        st.sampled_from(special),
        st.floats(-10, 10, width=width),
        st.floats(width=width, allow_nan=True, allow_infinity=True),
    )


def text(*, huge: bool = True) -> st.SearchStrategy[str]:
    """Strings: empty, short ascii, any unicode (NUL included), and — when ``huge`` — long runs."""
    options = [
        st.just(""),
        st.text(st.characters(codec="ascii"), max_size=12),
        st.text(st.characters(codec="utf-8"), max_size=40),
        st.text(st.sampled_from("\x00 \n\t{}[]\"'\\/%$<|>é中😀\u202e\ufeff"), max_size=16),
    ]
    if huge:
        options.append(
            st.tuples(
                st.text(st.characters(codec="utf-8"), min_size=1, max_size=6),
                st.integers(*HUGE_TEXT),
            ).map(lambda t: (t[0] * (t[1] // len(t[0]) + 1))[: t[1]])
        )
    return st.one_of(options)


def raw_bytes(*, huge: bool = True) -> st.SearchStrategy[bytes]:
    """Bytes: short random ones and — when ``huge`` — long runs."""
    if not huge:
        return st.binary(max_size=32)
    return st.one_of(
        st.binary(max_size=32),
        st.integers(*HUGE_TEXT).map(lambda n: b"\x00\xff" * (n // 2)),
    )


class Builder:
    """Strategies for the messages of one set of protos.

    Args:
        bias: field name (``"model"``) or full name (``"llmesh.v1.ChatStart.model"``) → a
            strategy mixed in with the field's generic one.
        override: the same keys → a strategy that replaces the generic one.
        max_depth: nested messages deeper than this are left empty.
        huge: whether values may be huge (strings, lists, maps). The elements of a long list or
            a huge map come from a builder without huge values, so sizes multiply only once.
    """

    def __init__(
        self,
        *,
        bias: Mapping[str, st.SearchStrategy[Any]] | None = None,
        override: Mapping[str, st.SearchStrategy[Any]] | None = None,
        max_depth: int = 4,
        huge: bool = True,
    ) -> None:
        self.bias = dict(bias or {})
        self.override = dict(override or {})
        self.max_depth = max_depth
        self.huge = huge
        self._cache: dict[tuple[str, int], st.SearchStrategy[Any]] = {}
        self._small = (
            Builder(bias=bias, override=override, max_depth=min(max_depth, 2), huge=False)
            if huge
            else self
        )

    # -- one value of a field -------------------------------------------------------------

    def _scalar(self, field: _d.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        t = field.type
        if t in _INT_RANGES:
            return integers(*_INT_RANGES[t])
        if t == F.TYPE_DOUBLE:
            return floats(64)
        if t == F.TYPE_FLOAT:
            return floats(32)
        if t == F.TYPE_BOOL:
            return st.booleans()
        if t == F.TYPE_STRING:
            return text(huge=self.huge)
        if t == F.TYPE_BYTES:
            return raw_bytes(huge=self.huge)
        if t == F.TYPE_ENUM:
            defined = [v.number for v in field.enum_type.values]
            # proto3 enums are open: numbers the proto does not define travel fine.
            return st.one_of(st.sampled_from(defined), integers(*INT32))
        if t in (F.TYPE_MESSAGE, F.TYPE_GROUP):
            return self.message(field.message_type, depth + 1)
        raise TypeError(f"field type {t} of {field.full_name}")

    def _element(self, field: _d.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        """A field's single value (an element, for a repeated field), bias and override in."""
        # A bare field name matches string fields only ("model" is a Model elsewhere).
        keys = [field.full_name] + ([field.name] if field.type == F.TYPE_STRING else [])
        for key in keys:
            if key in self.override:
                return self.override[key]
        generic = self._scalar(field, depth)
        for key in keys:
            if key in self.bias:
                return st.one_of(self.bias[key], generic)
        return generic

    def _value(self, field: _d.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        """What to put in a field: a value, a list (repeated) or a dict (map)."""
        if _is_map(field):
            key_field = field.message_type.fields_by_name["key"]
            value_field = field.message_type.fields_by_name["value"]
            keys = self._element(key_field, depth)
            values = self._element(value_field, depth)
            if key_field.type == F.TYPE_STRING and self.huge:
                small = self._small._element(value_field, depth)
                big = st.tuples(small, st.integers(*HUGE_MAP)).map(
                    lambda t: {f"k{i}": t[0] for i in range(t[1])}
                )
                return st.one_of(st.dictionaries(keys, values, max_size=5), big)
            return st.dictionaries(keys, values, max_size=5)
        if field.is_repeated:
            element = self._element(field, depth)
            if not self.huge:
                return st.lists(element, max_size=4)
            small = self._small._element(field, depth)
            long = st.tuples(small, st.integers(*LONG_LIST)).map(lambda t: [t[0]] * t[1])
            return st.one_of(st.lists(element, max_size=4), long)
        return self._element(field, depth)

    # -- whole messages -------------------------------------------------------------------

    def message(self, descriptor: _d.Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
        """Messages of ``descriptor`` with a random subset of fields set."""
        key = (descriptor.full_name, depth)
        if key in self._cache:
            return self._cache[key]
        cls = message_factory.GetMessageClass(descriptor)
        if depth > self.max_depth:
            strategy: st.SearchStrategy[Any] = st.just(None).map(lambda _: cls())
            self._cache[key] = strategy
            return strategy
        # Placeholder breaks recursion (Struct -> Value -> Struct) while this one is built.
        self._cache[key] = st.deferred(lambda: self._cache[key])
        plain = {}
        oneofs = []
        for oneof in descriptor.oneofs:
            if oneof.name.startswith("_") and len(oneof.fields) == 1:
                continue  # a proto3 `optional` field's synthetic oneof: a plain field here
            members = [st.tuples(st.just(f.name), self._value(f, depth)) for f in oneof.fields]
            oneofs.append(st.one_of(st.none(), *members))
        in_oneof = {
            f.name
            for o in descriptor.oneofs
            if not (o.name.startswith("_") and len(o.fields) == 1)
            for f in o.fields
        }
        for field in descriptor.fields:
            if field.name not in in_oneof:
                plain[field.name] = st.deferred(lambda f=field: self._value(f, depth))
        # Half the time every field is set (and every oneof chooses a member): a random subset
        # rarely fills all that a request needs to get past validation into the deep code.
        full_oneofs = [o.filter(lambda c: c is not None) for o in oneofs]
        strategy = st.one_of(
            st.tuples(st.fixed_dictionaries({}, optional=plain), st.tuples(*oneofs)),
            st.tuples(st.fixed_dictionaries(plain), st.tuples(*full_oneofs)),
        ).map(lambda t: _build(cls, t[0], t[1]))
        if depth == 0:
            strategy = strategy.filter(lambda m: m.ByteSize() <= MAX_MESSAGE_BYTES)
        self._cache[key] = strategy
        return strategy


def _is_map(field: _d.FieldDescriptor) -> bool:
    return (
        field.type == F.TYPE_MESSAGE
        and field.message_type.GetOptions().map_entry
        and field.is_repeated
    )


def _set(msg: _message.Message, name: str, value: Any) -> None:
    field = msg.DESCRIPTOR.fields_by_name[name]
    if _is_map(field):
        target = getattr(msg, name)
        if field.message_type.fields_by_name["value"].type == F.TYPE_MESSAGE:
            for k, v in value.items():
                target[k].CopyFrom(v)
        else:
            target.update(value)
    elif field.is_repeated:
        target = getattr(msg, name)
        if field.type == F.TYPE_MESSAGE:
            for v in value:
                target.add().CopyFrom(v)
        else:
            target.extend(value)
    elif field.type == F.TYPE_MESSAGE:
        getattr(msg, name).CopyFrom(value)
    else:
        setattr(msg, name, value)


def _build(cls: type, fields: Mapping[str, Any], oneofs: tuple[Any, ...]) -> Any:
    msg = cls()
    for name, value in fields.items():
        _set(msg, name, value)
    for choice in oneofs:
        if choice is not None:
            _set(msg, choice[0], choice[1])
    return msg


def messages(
    message_class: type,
    *,
    bias: Mapping[str, st.SearchStrategy[Any]] | None = None,
    override: Mapping[str, st.SearchStrategy[Any]] | None = None,
    max_depth: int = 4,
) -> st.SearchStrategy[Any]:
    """Messages of ``message_class`` (a generated class), fields drawn from their types.

    Args:
        message_class: e.g. ``inference_service_pb2.ChatRequest``.
        bias: field name or full name → values mixed in with the generic ones.
        override: field name or full name → the only values that field takes.
        max_depth: how deep nested messages go before they are left empty.
    """
    builder = Builder(bias=bias, override=override, max_depth=max_depth)
    return builder.message(message_class.DESCRIPTOR)
