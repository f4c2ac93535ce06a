"""A metadata document's encoded size (its ``google.protobuf.Struct`` bytes), the figure the
document limit bounds, computed from the keys a write changed: the size of the document a
write produced is remembered, so the next write of the same job costs only its own keys,
whatever the size of the rest."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

# The encoded size of a document a write produced, kept (with the document, so its identity
# is not reused) for the next write of the same job: the write after it then costs only the
# keys it changed, whatever the size of the rest of the document.
_KNOWN_SIZES_MAX = 1024
_known_sizes: dict[int, tuple[Mapping[str, Any], int]] = {}
_known_sizes_lock = threading.Lock()


def document_size(document: Mapping[str, Any]) -> int:
    """``encoded_size`` of ``document``, remembered for the next ``size_after``."""
    hit = _known_sizes.get(id(document))
    if hit is not None and hit[0] is document:
        return hit[1]
    size = encoded_size(document)
    _remember(document, size)
    return size


def size_after(old: Mapping[str, Any], new: Mapping[str, Any]) -> int:
    """The encoded size of ``new``, a merge of ``old``: the size of ``old`` plus the change
    of the keys whose value is not the very same object (a merge keeps the others)."""
    size = document_size(old)
    for key, value in new.items():
        before = old.get(key, _ABSENT)
        if before is not value:
            size += _entry_size(key, value)
            if before is not _ABSENT:
                size -= _entry_size(key, before)
    for key, before in old.items():
        if key not in new:
            size -= _entry_size(key, before)
    _remember(new, size)
    return size


_ABSENT = object()


def _remember(document: Mapping[str, Any], size: int) -> None:
    with _known_sizes_lock:  # several monitors in one process have a writer thread each
        if len(_known_sizes) >= _KNOWN_SIZES_MAX:
            del _known_sizes[next(iter(_known_sizes))]  # the oldest
        _known_sizes[id(document)] = (document, size)


def encoded_size(document: Mapping[str, Any]) -> int:
    """Bytes of ``document`` encoded as a google.protobuf.Struct: what every answer carries.

    Computed by walking the values (no message is built), so checking a merge costs one pass.
    """
    return _struct_size(document)


def _struct_size(value: Mapping[str, Any]) -> int:
    return sum(_entry_size(key, item) for key, item in value.items())


def _entry_size(key: str, item: Any) -> int:
    """Bytes of one ``fields`` map entry of a Struct (its tag and length included)."""
    key_len = len(key.encode("utf-8", "surrogatepass"))
    entry = 1 + _varint_len(key_len) + key_len
    inner = _value_size(item)
    entry += 1 + _varint_len(inner) + inner
    return 1 + _varint_len(entry) + entry


def _value_size(value: Any) -> int:
    """Size of a google.protobuf.Value holding ``value`` (its oneof field included)."""
    if value is None or isinstance(value, bool):
        return 2
    if isinstance(value, int | float):
        return 9
    if isinstance(value, str):
        n = len(value.encode("utf-8", "surrogatepass"))
        return 1 + _varint_len(n) + n
    if isinstance(value, Mapping):
        n = _struct_size(value)
    else:
        n = 0
        for item in value:
            inner = _value_size(item)
            n += 1 + _varint_len(inner) + inner
    return 1 + _varint_len(n) + n


def _varint_len(n: int) -> int:
    return (max(n.bit_length(), 1) + 6) // 7
