from __future__ import annotations

import typing as t

import pytest

from flask_eventstream.event import Event
from flask_eventstream.parser import EventParser
from flask_eventstream.parser import parse

if t.TYPE_CHECKING:
    import collections.abc as cabc


def message(data: str, *, id: str | None = None, retry: int | None = None) -> Event:
    return Event(data, event="message", id=id, retry=retry)


STREAMS = [
    pytest.param(b"data: x\n\n", [message("x")], id="lf"),
    pytest.param(b"data: x\r\n\r\n", [message("x")], id="crlf"),
    pytest.param(b"data: x\r\r", [message("x")], id="cr"),
    pytest.param(
        b"data: a\rdata: b\r\ndata: c\n\r\ndata: d\r\n\n",
        [message("a\nb\nc"), message("d")],
        id="mixed-line-breaks",
    ),
    pytest.param(b"\xef\xbb\xbfdata: x\n\n", [message("x")], id="bom-stripped"),
    pytest.param(
        b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\ndata: y\n\n",
        [message("y")],
        id="second-bom-kept",
    ),
    pytest.param(
        b"data: x\n\n\xef\xbb\xbfdata: y\n\n",
        [message("x")],
        id="bom-in-second-event-kept",
    ),
    pytest.param(
        b": hello\n:\ndata: x\n: between\n\n", [message("x")], id="comments-ignored"
    ),
    pytest.param(b": only a comment\n\n", [], id="comment-only-not-dispatched"),
    pytest.param(b"data\n\n", [message("")], id="field-without-colon"),
    pytest.param(b"data\ndata\n\n", [message("\n")], id="two-fields-without-colon"),
    pytest.param(b"data:x\n\n", [message("x")], id="no-space"),
    pytest.param(b"data:  x\n\n", [message(" x")], id="two-spaces-keep-one"),
    pytest.param(b"data:\tx\n\n", [message("\tx")], id="tab-kept"),
    pytest.param(b"data: a:b: c\n\n", [message("a:b: c")], id="colon-in-value"),
    pytest.param(b"data: x \n\n", [message("x ")], id="trailing-space-kept"),
    pytest.param(b"data: a\ndata: b\n\n", [message("a\nb")], id="data-lines-joined"),
    pytest.param(b"data:\ndata:\n\n", [message("\n")], id="empty-data-lines"),
    pytest.param(b"data: a\ndata:\n\n", [message("a\n")], id="trailing-empty-line"),
    pytest.param(b"data:\n\n", [message("")], id="empty-data"),
    pytest.param(
        b"event: tick\ndata: x\n\n",
        [Event("x", event="tick")],
        id="event-type",
    ),
    pytest.param(b"event:\ndata: x\n\n", [message("x")], id="empty-event-type"),
    pytest.param(
        b"event: a\nevent: b\ndata: x\n\n",
        [Event("x", event="b")],
        id="last-event-type-wins",
    ),
    pytest.param(
        b"event: tick\ndata: x\n\ndata: y\n\n",
        [Event("x", event="tick"), message("y")],
        id="event-type-reset-after-dispatch",
    ),
    pytest.param(
        b"event: tick\n\ndata: y\n\n",
        [message("y")],
        id="event-type-reset-without-dispatch",
    ),
    pytest.param(b"event: tick\nid: 1\n\n", [], id="no-data-not-dispatched"),
    pytest.param(b"id: 1\ndata: x\n\n", [message("x", id="1")], id="id"),
    pytest.param(
        b"id: 1\ndata: x\n\ndata: y\n\n",
        [message("x", id="1"), message("y", id="1")],
        id="id-persists",
    ),
    pytest.param(
        b"id: 1\n\ndata: y\n\n",
        [message("y", id="1")],
        id="id-set-by-event-without-data",
    ),
    pytest.param(
        b"id: 1\ndata: x\n\nid\ndata: y\n\n",
        [message("x", id="1"), message("y")],
        id="empty-id-resets",
    ),
    pytest.param(
        b"id: 1\ndata: x\n\nid: \ndata: y\n\n",
        [message("x", id="1"), message("y")],
        id="empty-id-with-space-resets",
    ),
    pytest.param(
        b"id: 1\ndata: x\n\nid: 2\x003\ndata: y\n\n",
        [message("x", id="1"), message("y", id="1")],
        id="id-with-nul-ignored",
    ),
    pytest.param(b"id:  1\ndata: x\n\n", [message("x", id=" 1")], id="id-space"),
    pytest.param(b"retry: 1000\ndata: x\n\n", [message("x", retry=1000)], id="retry"),
    pytest.param(b"retry: 0\ndata: x\n\n", [message("x", retry=0)], id="retry-0"),
    pytest.param(
        b"retry: 1000\ndata: x\n\ndata: y\n\n",
        [message("x", retry=1000), message("y")],
        id="retry-belongs-to-its-event",
    ),
    pytest.param(b"retry: 1e3\ndata: x\n\n", [message("x")], id="retry-non-digit"),
    pytest.param(b"retry: -1\ndata: x\n\n", [message("x")], id="retry-negative"),
    pytest.param(b"retry:  1\ndata: x\n\n", [message("x")], id="retry-space"),
    pytest.param(b"retry:\ndata: x\n\n", [message("x")], id="retry-empty"),
    pytest.param(
        "retry: \u0661\ndata: x\n\n".encode(), [message("x")], id="retry-arabic-digit"
    ),
    pytest.param(
        b"retry: 5\ndata: x\nretry: y\n\n",
        [message("x", retry=5)],
        id="invalid-retry-keeps-valid-one",
    ),
    pytest.param(
        b"foo: bar\nData: y\ndata : z\ndata: x\n\n",
        [message("x")],
        id="unknown-fields-ignored",
    ),
    pytest.param(b"data: x\n\ndata: y\n", [message("x")], id="unterminated-dropped"),
    pytest.param(b"data: x", [], id="unterminated-line-dropped"),
    pytest.param(b"", [], id="empty-stream"),
    pytest.param(b"\n\n\n", [], id="blank-lines-only"),
    pytest.param(
        b"data: \xff\xfe\n\n", [message("\ufffd\ufffd")], id="invalid-utf8-replaced"
    ),
    pytest.param(
        "data: é ☃ \U0001f600\n\n".encode(), [message("é ☃ \U0001f600")], id="utf-8"
    ),
    pytest.param(b"data: a\x00b\n\n", [message("a\x00b")], id="nul-in-data-kept"),
    pytest.param(
        b"data: a\x0bb\x0cc\xc2\x85d\xe2\x80\xa8e\n\n",
        [message("a\x0bb\x0cc\x85d\u2028e")],
        id="only-cr-and-lf-break-lines",
    ),
]


@pytest.mark.parametrize(("stream", "expected"), STREAMS)
def test_stream_dispatches_exactly_the_expected_events(
    stream: bytes, expected: list[Event]
) -> None:
    """Each stream dispatches exactly the events a browser would."""
    assert list(parse(stream)) == expected


@pytest.mark.parametrize(("stream", "expected"), STREAMS)
def test_stream_fed_one_byte_at_a_time_gives_the_same_events(
    stream: bytes, expected: list[Event]
) -> None:
    """Splitting the stream into single bytes does not change the events."""
    assert list(parse(stream[i : i + 1] for i in range(len(stream)))) == expected


@pytest.mark.parametrize(("stream", "expected"), STREAMS)
def test_stream_split_anywhere_gives_the_same_events(
    stream: bytes, expected: list[Event]
) -> None:
    """Splitting the stream into two chunks, at any point, gives the same events."""
    for i in range(len(stream) + 1):
        assert list(parse([stream[:i], stream[i:]])) == expected


def test_crlf_split_across_chunks_is_one_line_break() -> None:
    """A CR that ends one chunk and a LF that starts the next are one break."""
    parser = EventParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\ndata: b\r") == []
    # Had the LF counted as a line of its own, this blank line would dispatch.
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\r") == [message("a\nb")]
    assert parser.feed(b"\n") == []
    assert parser.close() == []


def test_cr_ends_a_line_without_waiting_for_the_next_chunk() -> None:
    """An event ended by CR is dispatched at once, not when more data arrives."""
    parser = EventParser()
    assert parser.feed(b"data: a\r\r") == [message("a")]


def test_multibyte_character_split_across_chunks_is_decoded() -> None:
    """A UTF-8 character split between chunks is decoded whole."""
    parser = EventParser()
    snowman = "☃".encode()
    assert parser.feed(b"data: " + snowman[:1]) == []
    assert parser.feed(snowman[1:2]) == []
    assert parser.feed(snowman[2:] + b"\n\n") == [message("☃")]


def test_bom_split_across_chunks_is_stripped() -> None:
    """A BOM at the start is stripped even when it arrives byte by byte."""
    chunks = [b"\xef", b"", b"\xbb", b"\xbf", b"data: x\n\n"]
    assert list(parse(chunks)) == [message("x")]


def test_bom_is_stripped_only_at_the_start_of_the_stream() -> None:
    """A BOM at the start of a later chunk is part of the text."""
    parser = EventParser()
    assert parser.feed(b"\xef\xbb\xbf") == []
    assert parser.feed(b"\xef\xbb\xbfdata: x\n\n") == []
    assert parser.feed(b"data: y\n\n") == [message("y")]


def test_events_in_one_chunk_are_returned_in_order() -> None:
    """A chunk that completes several events returns all of them, in order."""
    parser = EventParser()
    assert parser.feed(b"data: 1\n\ndata: 2\n\ndata: 3") == [
        message("1"),
        message("2"),
    ]
    assert parser.feed(b"\n\n") == [message("3")]


def test_close_drops_an_unterminated_event() -> None:
    """Closing the parser discards an event that no blank line ended."""
    parser = EventParser()
    assert parser.feed(b"data: x\n") == []
    assert parser.close() == []


def test_close_keeps_the_last_event_id() -> None:
    """The last event id is stream state, not part of the dropped event."""
    parser = EventParser()
    assert parser.feed(b"id: 1\n\ndata: x\n") == []
    assert parser.close() == []
    assert parser.feed(b"data: y\n\n") == [message("y", id="1")]


def test_parse_accepts_bytes() -> None:
    """``parse`` reads a whole stream given as bytes."""
    assert list(parse(b"data: x\n\n")) == [message("x")]


def test_parse_accepts_str() -> None:
    """``parse`` reads a whole stream given as text."""
    assert list(parse("\ufeffdata: é\r\n\r\n")) == [message("é")]


def test_parse_accepts_an_iterable_of_chunks() -> None:
    """``parse`` reads a stream from an iterable of bytes and str chunks."""
    chunks: list[bytes | str] = [b"data: a", "\r", b"\ndata: \xe2\x98", b"\x83\n", "\n"]
    assert list(parse(iter(chunks))) == [message("a\n☃")]


def test_parse_is_lazy() -> None:
    """``parse`` yields each event as soon as its chunk has been read."""
    read: list[bytes] = []

    def body() -> cabc.Iterator[bytes]:
        for chunk in [b"data: 1\n\n", b"data: 2\n\n"]:
            read.append(chunk)
            yield chunk

    events = parse(body())
    assert next(events) == message("1")
    assert len(read) == 1


def test_str_after_incomplete_bytes_replaces_them() -> None:
    """An incomplete UTF-8 sequence followed by a str chunk becomes U+FFFD."""
    parser = EventParser()
    assert parser.feed(b"data: \xe2\x98") == []
    assert parser.feed("x\n\n") == [message("\ufffdx")]
