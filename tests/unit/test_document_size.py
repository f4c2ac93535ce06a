"""The size of a merged document, computed from the keys a write changed, is the size of
the whole document encoded as a Struct (what every answer carries)."""

from __future__ import annotations

from typing import Any

from google.protobuf import struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor_svc import document_size
from monitor_svc import metadata_rules as rules

_LEAF = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=40)
_VALUE = st.recursive(
    _LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
_KEYS = st.sampled_from(["a", "b", "c", "ünï", "long-key-" * 4])
_PATCH = st.dictionaries(_KEYS, _VALUE, max_size=3)


def _struct_bytes(document: dict[str, Any]) -> int:
    message = struct_pb2.Struct()
    message.update(document)
    return message.ByteSize()


@settings(max_examples=200, deadline=None)
@given(st.lists(_PATCH, min_size=1, max_size=6))
def test_the_size_after_each_write_is_the_encoded_size(patches: list[dict[str, Any]]) -> None:
    document: dict[str, Any] = {}
    for patch in patches:
        merged = rules.merge_metadata(document, patch).metadata
        size = document_size.size_after(document, merged)
        assert size == document_size.encoded_size(merged) == _struct_bytes(merged)
        document = merged


def test_a_step_stat_write_changes_the_size_by_its_entry_only() -> None:
    entries = [{"step_id": f"s{i}", "step_index": i, "status": "pending"} for i in range(50)]
    document = rules.merge_metadata({}, {"step_stats": entries, "x": "y"}).metadata
    update = rules.set_step_stat_status(document, "s7", rules.Status.SPAWNED)
    assert document_size.size_after(document, update.metadata) == document_size.encoded_size(
        update.metadata
    )
    assert update.metadata["completed_steps"] == 0
    ended = rules.set_step_stat_status(update.metadata, "s7", rules.Status.COMPLETED)
    assert ended.metadata["completed_steps"] == 1
