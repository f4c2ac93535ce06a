"""The web view's wire format (pure): event ids that resume a stream, and SSE frames a
browser parses as one event each."""

from __future__ import annotations

import json

import pytest

from monitor_svc.web.wire import Position, comment, frame


def test_an_event_id_names_both_positions_and_parses_back() -> None:
    position = Position(change_seq=41, log_seq=7)
    assert str(position) == "41.7"
    assert Position.parse("41.7") == position
    assert Position.parse(" 41.7 ") == position


@pytest.mark.parametrize("text", [None, "", "41", "41.", ".7", "a.b", "-1.2", "1.2.3", "4 1.2"])
def test_an_id_not_of_ours_starts_the_stream_afresh(text: str | None) -> None:
    assert Position.parse(text) is None


def test_a_frame_is_one_event_with_its_id_and_one_line_of_data() -> None:
    data = json.dumps({"message": "two\nlines", "x": "é"})
    raw = frame("log", data, Position(3, 9)).decode()
    assert raw.endswith("\n\n") and raw.count("\n\n") == 1
    fields = dict(line.split(": ", 1) for line in raw.strip().split("\n"))
    assert fields == {"id": "3.9", "event": "log", "data": data}
    assert json.loads(fields["data"])["message"] == "two\nlines"


def test_a_comment_is_ignored_by_event_source() -> None:
    assert comment("ping") == b": ping\n\n"
