from __future__ import annotations

import ast
import dataclasses
import json
import pathlib
import typing as t

import pytest
from hypothesis import given
from hypothesis import strategies as st

import flask_eventstream.event as event_module
from flask_eventstream.event import encode_comment
from flask_eventstream.event import Event
from flask_eventstream.event import set_json_dumps_lookup
from flask_eventstream.parser import parse

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from flask_eventstream.event import JSONDumps

PACKAGE = pathlib.Path(event_module.__file__).parent

# Text that can travel through UTF-8: lone surrogates cannot be encoded.
texts = st.text(st.characters(exclude_categories=["Cs"]))
# Values allowed in the one-line fields: no line break, and for ids no NUL.
names = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"))
ids = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\r\n\0"))


def normalize_lines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        pytest.param(Event("hello"), b"data: hello\n\n", id="str"),
        pytest.param(Event(), b"", id="nothing"),
        pytest.param(Event(None, event="ping"), b"event: ping\n\n", id="none"),
        pytest.param(Event(""), b"data:\n\n", id="empty-str"),
        pytest.param(Event(" x"), b"data:  x\n\n", id="leading-space"),
        pytest.param(Event("a\nb"), b"data: a\ndata: b\n\n", id="lf"),
        pytest.param(Event("a\rb"), b"data: a\ndata: b\n\n", id="cr"),
        pytest.param(Event("a\r\nb"), b"data: a\ndata: b\n\n", id="crlf"),
        pytest.param(Event("a\n\nb"), b"data: a\ndata:\ndata: b\n\n", id="blank"),
        pytest.param(Event("a\n"), b"data: a\ndata:\n\n", id="trailing-lf"),
        pytest.param(Event("\n"), b"data:\ndata:\n\n", id="only-lf"),
        pytest.param(Event("a\r\n\rb"), b"data: a\ndata:\ndata: b\n\n", id="mix"),
        pytest.param(Event("é ☃"), "data: é ☃\n\n".encode(), id="utf-8"),
        pytest.param(Event({"a": 1, "b": [1, 2]}), b'data: {"a":1,"b":[1,2]}\n\n'),
        pytest.param(Event({"s": "é"}), 'data: {"s":"é"}\n\n'.encode(), id="json-utf8"),
        pytest.param(Event([1, "x"]), b'data: [1,"x"]\n\n', id="list"),
        pytest.param(Event({"s": "a\nb"}), b'data: {"s":"a\\nb"}\n\n', id="json-lf"),
        pytest.param(Event(42), b"data: 42\n\n", id="int"),
        pytest.param(Event(1.5), b"data: 1.5\n\n", id="float"),
        pytest.param(Event(True), b"data: true\n\n", id="true"),
        pytest.param(Event(False), b"data: false\n\n", id="false"),
        pytest.param(Event("x", event="tick"), b"event: tick\ndata: x\n\n", id="event"),
        pytest.param(Event("x", event=""), b"event:\ndata: x\n\n", id="event-empty"),
        pytest.param(Event("x", id="7"), b"id: 7\ndata: x\n\n", id="id"),
        pytest.param(Event("x", id=""), b"id:\ndata: x\n\n", id="id-empty"),
        pytest.param(Event("x", retry=0), b"retry: 0\ndata: x\n\n", id="retry-0"),
        pytest.param(Event(retry=3000), b"retry: 3000\n", id="retry-only"),
        pytest.param(Event("x", comment="hi"), b": hi\ndata: x\n\n", id="comment"),
        pytest.param(Event(comment=""), b":\n", id="comment-empty"),
        pytest.param(
            Event(comment="a\r\nb\n\rc"), b": a\n: b\n:\n: c\n", id="comment-lines"
        ),
        pytest.param(
            Event(retry=5, comment="c"), b": c\nretry: 5\n", id="comment-retry"
        ),
        pytest.param(
            Event(comment="c", event="e"), b": c\nevent: e\n\n", id="comment-event"
        ),
        pytest.param(Event(comment="c", id="1"), b": c\nid: 1\n\n", id="comment-id"),
        pytest.param(
            Event("x\ny", event="e", id="1", retry=5, comment="c"),
            b": c\nevent: e\nid: 1\nretry: 5\ndata: x\ndata: y\n\n",
            id="all-fields",
        ),
    ],
)
def test_event_encodes_to_exact_bytes(event: Event, expected: bytes) -> None:
    """Each event encodes to exactly the expected wire bytes."""
    assert event.encode() == expected


def test_bytes_of_event_is_its_encoding() -> None:
    """``bytes(event)`` is the same as ``event.encode()``."""
    event = Event({"a": 1}, event="e", id="1", retry=2, comment="c")
    assert bytes(event) == event.encode()


def test_event_is_immutable() -> None:
    """Assigning to a field of an event raises ``FrozenInstanceError``."""
    event = Event("x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.data = "y"  # type: ignore[misc]


def test_events_with_equal_fields_are_equal_and_hash_alike() -> None:
    """Events are values: equal fields make equal, equally hashed events."""
    assert Event("x", id="1") == Event("x", id="1")
    assert hash(Event("x", id="1")) == hash(Event("x", id="1"))
    assert Event("x", id="1") != Event("x", id="2")


def test_fields_other_than_data_are_keyword_only() -> None:
    """Only ``data`` can be passed by position."""
    with pytest.raises(TypeError):
        Event("x", "e")  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        ({"event": 1}, TypeError, "'event'"),
        ({"event": b"e"}, TypeError, "'event'"),
        ({"event": "a\nb"}, ValueError, "'event'"),
        ({"event": "a\rb"}, ValueError, "'event'"),
        ({"event": "a\r\n"}, ValueError, "'event'"),
        ({"id": 1}, TypeError, "'id'"),
        ({"id": "a\nb"}, ValueError, "'id'"),
        ({"id": "\r"}, ValueError, "'id'"),
        ({"id": "a\0b"}, ValueError, "'id'"),
        ({"comment": 1}, TypeError, "'comment'"),
        ({"comment": b"c"}, TypeError, "'comment'"),
        ({"retry": -1}, ValueError, "'retry'"),
        ({"retry": 1.5}, ValueError, "'retry'"),
        ({"retry": "100"}, ValueError, "'retry'"),
        ({"retry": True}, ValueError, "'retry'"),
        ({"retry": False}, ValueError, "'retry'"),
    ],
)
def test_invalid_field_raises_error_naming_the_field(
    kwargs: dict[str, t.Any], error: type[Exception], field: str
) -> None:
    """A field of the wrong type or with a forbidden character is rejected."""
    with pytest.raises(error, match=field):
        Event("x", **kwargs)


def test_line_break_error_message_shows_the_value() -> None:
    """The error for a bad id says what is wrong and repeats the value."""
    with pytest.raises(ValueError) as info:
        Event(id="a\nb")
    assert str(info.value) == (
        "The 'id' field cannot contain a line break or NUL (got 'a\\nb')."
    )


def test_nul_is_allowed_in_event_and_comment() -> None:
    """Only ``id`` forbids NUL; clients accept it in other fields."""
    event = Event("\0", event="a\0", comment="\0")
    assert event.encode() == b": \0\nevent: a\0\ndata: \0\n\n"


def test_data_that_cannot_be_json_raises_type_error_on_encode() -> None:
    """Data that is not a string and not JSON-able fails when encoded."""
    event = Event(object())
    with pytest.raises(TypeError):
        event.encode()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("keep-alive", b": keep-alive\n"),
        ("", b":\n"),
        (" x", b":  x\n"),
        ("a\nb", b": a\n: b\n"),
        ("a\r\nb\r", b": a\n: b\n:\n"),
    ],
)
def test_encode_comment_writes_comment_lines_without_blank_line(
    text: str, expected: bytes
) -> None:
    """A comment is ``:`` lines with no blank line after them."""
    assert encode_comment(text) == expected


def test_encoded_comment_dispatches_nothing() -> None:
    """A comment followed by an event does not change the event."""
    stream = encode_comment("a\nb") + Event("x").encode()
    assert list(parse(stream)) == [Event("x", event="message")]


@pytest.fixture
def json_lookup() -> cabc.Iterator[cabc.Callable[[JSONDumps | None], None]]:
    """Install a JSON lookup for one test, and restore the default after."""
    previous: list[cabc.Callable[[], JSONDumps | None]] = []

    def install(dumps: JSONDumps | None) -> None:
        previous.append(set_json_dumps_lookup(lambda: dumps))

    try:
        yield install
    finally:
        for lookup in reversed(previous):
            set_json_dumps_lookup(lookup)


def test_json_lookup_provides_the_dumps_function(
    json_lookup: cabc.Callable[[JSONDumps | None], None],
) -> None:
    """Non-string data is encoded with the dumps that the lookup returns."""
    seen: list[t.Any] = []

    def dumps(value: t.Any) -> str:
        seen.append(value)
        return json.dumps(value, sort_keys=True, indent=1)

    json_lookup(dumps)
    assert Event({"b": 1, "a": 2}).encode() == (
        b'data: {\ndata:  "a": 2,\ndata:  "b": 1\ndata: }\n\n'
    )
    assert seen == [{"b": 1, "a": 2}]
    # Strings are sent as they are, without asking the lookup.
    assert Event("s").encode() == b"data: s\n\n"
    assert len(seen) == 1


def test_json_lookup_returning_none_uses_compact_json(
    json_lookup: cabc.Callable[[JSONDumps | None], None],
) -> None:
    """A lookup that returns ``None`` falls back to compact ``json.dumps``."""
    json_lookup(None)
    assert Event({"a": [1, "é"]}).encode() == 'data: {"a":[1,"é"]}\n\n'.encode()


def test_set_json_dumps_lookup_returns_the_previous_lookup() -> None:
    """Setting a lookup hands back the one it replaced, to restore it later."""

    def lookup() -> JSONDumps | None:
        return None

    original = set_json_dumps_lookup(lookup)
    try:
        assert set_json_dumps_lookup(original) is lookup
    finally:
        set_json_dumps_lookup(original)


@pytest.mark.parametrize("module", ["event.py", "parser.py"])
def test_module_imports_neither_flask_nor_gevent(module: str) -> None:
    """The encoder and the parser can be used without Flask or gevent."""
    tree = ast.parse((PACKAGE / module).read_text("utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            imported.add(node.module)
    roots = {name.partition(".")[0] for name in imported}
    assert not roots & {"flask", "werkzeug", "gevent", "greenlet"}


@given(data=texts, event=names.filter(bool), id=ids.filter(bool))
def test_any_text_round_trips_through_encode_and_parse(
    data: str, event: str, id: str
) -> None:
    """Any data text comes back from the parser, with line breaks as LF."""
    parsed = list(parse(Event(data, event=event, id=id).encode()))
    assert parsed == [Event(normalize_lines(data), event=event, id=id)]


@given(data=texts, comment=texts)
def test_data_and_comment_text_cannot_add_a_field(data: str, comment: str) -> None:
    """No data or comment text can change the event's type, id or retry."""
    encoded = Event(data, event="fixed", id="7", comment=comment).encode()
    [parsed] = parse(encoded)
    assert (parsed.event, parsed.id, parsed.retry) == ("fixed", "7", None)
    assert parsed.data == normalize_lines(data)


events = st.builds(
    Event,
    texts,
    event=st.none() | names,
    id=st.none() | ids,
    retry=st.none() | st.integers(min_value=0, max_value=2**63),
    comment=st.none() | texts,
)


@given(st.lists(events))
def test_list_of_events_round_trips_through_encode_and_parse(
    sent: list[Event],
) -> None:
    """A stream of events parses back to the events sent, as a browser sees them."""
    expected = []
    last_id = ""
    for event in sent:
        # An empty event type means "message", and an id carries over to the
        # following events until the next id field, where "" resets it.
        if event.id is not None:
            last_id = event.id
        expected.append(
            Event(
                normalize_lines(event.data),
                event=event.event or "message",
                id=last_id or None,
                retry=event.retry,
            )
        )
    stream = b"".join(event.encode() for event in sent)
    assert list(parse(stream)) == expected
