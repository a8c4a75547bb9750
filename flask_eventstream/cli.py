"""``flask eventstream ...``: publish and inspect from the command line."""

from __future__ import annotations

import json
import typing as t

import click
from flask import current_app
from flask.cli import AppGroup

from .brokers.base import BrokerError
from .brokers.base import check_channel
from .doctor import diagnose
from .event import Event
from .stream import DEFAULT_KEEPALIVE_SECONDS
from .stream import seconds

if t.TYPE_CHECKING:
    from .brokers.redis import RedisBroker
    from .settings import EventStreamState

eventstream = AppGroup("eventstream", help="Publish events and inspect streams.")


def _shared_state(command: str) -> EventStreamState:
    state: EventStreamState | None = current_app.extensions.get("eventstream")
    if state is None:
        raise click.ClickException(
            "This app has not registered the EventStream blueprint."
        )
    if not state.broker.shared:
        raise click.ClickException(
            f"'{command}' talks to the running servers through the broker, but"
            " the in-memory broker lives inside each server process. Give the"
            " app and its servers a Redis broker: set the config key"
            " EVENTSTREAM_BROKER_URL=redis://host:port/db or, for an app that"
            " calls app.config.from_prefixed_env(), the environment variable"
            " FLASK_EVENTSTREAM_BROKER_URL=redis://host:port/db."
        )
    return state


def _compact_json(text: str) -> str:
    """Return the JSON ``text`` in its compact encoding, or raise a usage error."""
    try:
        # Python reads NaN, Infinity and 1e999 as floats that JSON cannot
        # express; refuse them rather than send data that JSON.parse rejects.
        return json.dumps(
            json.loads(text),
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        )
    except ValueError as e:
        message = f"with '--json' it must be JSON ({e})."
        raise click.BadParameter(message, param_hint="'DATA'") from None


@eventstream.command("publish")
@click.argument("channel")
@click.argument("data")
@click.option(
    "--event", "event_type", metavar="NAME", help="The event type (event: field)."
)
@click.option(
    "--id",
    "event_id",
    metavar="ID",
    help="The id (id: field), 1-200 characters without CR, LF or NUL;"
    " by default the broker assigns one.",
)
@click.option(
    "--retry",
    type=click.IntRange(min=0),
    metavar="MS",
    help="The client's reconnection delay in milliseconds (retry: field).",
)
@click.option("--json", "as_json", is_flag=True, help="DATA is JSON; send it compact.")
def publish_command(
    channel: str,
    data: str,
    event_type: str | None,
    event_id: str | None,
    retry: int | None,
    as_json: bool,
) -> None:
    """Publish DATA on CHANNEL; every subscriber of every server gets it."""
    state = _shared_state("publish")
    if as_json:
        data = _compact_json(data)
    try:
        check_channel(channel)
        new_id = state.broker.publish(
            channel, Event(data, event=event_type, id=event_id, retry=retry)
        )
    except (ValueError, BrokerError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(new_id)


@eventstream.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats_command(as_json: bool) -> None:
    """Show each live worker's open streams and subscribers per channel."""
    state = _shared_state("stats")
    try:
        workers = t.cast("RedisBroker", state.broker).cluster_stats()
    except BrokerError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(workers, indent=2, sort_keys=True))
        return
    if not workers:
        click.echo("No worker has open streams.")
        return
    channels: dict[str, int] = {}
    for worker in workers:
        click.echo(
            f"{worker['host']} pid {worker['pid']}:"
            f" {worker['subscriptions']} subscriptions"
        )
        for name, count in worker["channels"].items():
            channels[name] = channels.get(name, 0) + count
    click.echo(f"In all: {sum(w['subscriptions'] for w in workers)} subscriptions")
    for name, count in sorted(channels.items()):
        click.echo(f"  {name}: {count}")


@eventstream.command("doctor")
@click.argument("url")
@click.option(
    "--publish",
    is_flag=True,
    help="Also publish a test event on a channel of its own, through the"
    " app's broker (shared with the servers: Redis), and time its arrival.",
)
@click.option(
    "--keep-alive",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="The endpoint's keep-alive interval, if it sets its own; by default"
    " EVENTSTREAM_KEEPALIVE.",
)
def doctor_command(url: str, publish: bool, keep_alive: float | None) -> None:
    """Probe the event stream at URL as a browser would, and say what to fix.

    Each check prints a line that starts with ok, warn or fail; the exit
    status is 1 if a check failed. Run it on the server's host to have the
    gunicorn worker checked too.
    """
    config = current_app.config
    if keep_alive is None:
        try:
            value = config.get("EVENTSTREAM_KEEPALIVE", DEFAULT_KEEPALIVE_SECONDS)
            keep_alive = seconds("EVENTSTREAM_KEEPALIVE", value)
        except ValueError as e:
            raise click.ClickException(str(e)) from None
    send = None
    if publish:
        broker = _shared_state("doctor --publish").broker

        def send(channel: str, data: str) -> None:
            broker.publish(channel, Event(data, event="eventstream.doctor"))

    try:
        checks = diagnose(
            url,
            keep_alive=keep_alive,
            publish=send,
            max_connections=config.get("EVENTSTREAM_MAX_CONNECTIONS"),
        )
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'URL'") from None
    failed = False
    for check in checks:
        click.echo(str(check))
        failed = failed or check.verdict == "fail"
    if failed:
        raise SystemExit(1)
