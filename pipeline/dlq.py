"""The pipeline's dead-letter queue ``pipeline:dlq``: writing, paging, replaying once, resolving.

Dead letters of accepted orders live in their own stream, ``pipeline:dlq``,
which nothing trims: an entry leaves it only when it is replayed (back into its
shard stream, once) or resolved by an operator. The bridge's intake DLQ
``orders:dlq`` (device garbage, capped at ``--dlq-maxlen``) is listed read-only
(``queue="intake"``); a garbage flood there can never push an accepted order out.

A pipeline DLQ entry carries the contract's fields (``reason``, ``topic``,
``payload``, ``received_at``) plus what an operator needs to re-drive it:
``source`` = ``pipeline``, the source ``stream`` and ``entry_id``, the
``order_id``, ``device_id``, ``seq``, the ``deliveries`` count and the last
``error``. Entries the bridge wrote (undecodable messages) have no source
stream and cannot be replayed. (Older releases wrote pipeline entries into
``orders:dlq``; replay still finds them there.)

Redis Cluster: ``pipeline:dlq`` and its markers (tag ``{pipeline:dlq}``) share
one slot, the source stream lives in another. Dead-lettering is therefore an
idempotent append (one marker per source entry) followed by the XACK; a
replay on a cluster appends to the shard stream first and then, atomically in
the DLQ's slot, records the replay and removes the entry. A worker killed
between the two halves leaves the entry in the DLQ, and replaying it again
may append the order a second time, which the pipeline's per-order
idempotence absorbs (it is processed once). On a single Redis the replay stays
one atomic script.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from schemas.names import DLQ_STREAM, PIPELINE_GROUP, orders_topic, shard_of, stream_key
from servicekit.redis_clients import text

from ._calls import AnyRedis, is_cluster, run_calls
from ._lua import Scripts
from .errors import ReplayError
from .names import (
    PIPELINE_DLQ_STREAM,
    REPLAYED_MARKER_TTL_S,
    legacy_replayed_key,
    letter_key,
    replayed_key,
)
from .records import StreamEntry

SOURCE: Final = "pipeline"
MAX_DELIVERIES_REASON: Final = "max_deliveries"
_REPLAY_FIELDS: Final = ("order_id", "device_id", "seq", "received_at", "payload")
Queue = Literal["pipeline", "intake"]
QUEUES: Final[dict[str, str]] = {"pipeline": PIPELINE_DLQ_STREAM, "intake": DLQ_STREAM}


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A stream entry the pipeline gives up on, and why."""

    entry: StreamEntry
    reason: str
    error: str


async def dead_letter(client: AnyRedis, scripts: Scripts, letters: Sequence[DeadLetter]) -> None:
    """Append each to ``pipeline:dlq`` (once per source entry), then XACK the source entries."""
    if not letters:
        return
    calls = []
    for letter in letters:
        fields = letter.entry.fields
        device_id = text(fields.get("device_id", b""))
        values: dict[str, Any] = {
            "reason": letter.reason,
            "topic": orders_topic(device_id) if device_id else "",
            "payload": fields.get("payload", b""),
            "received_at": fields.get("received_at", b"0"),
            "source": SOURCE,
            "stream": letter.entry.stream,
            "entry_id": letter.entry.entry_id,
            "order_id": fields.get("order_id", b""),
            "device_id": device_id,
            "seq": fields.get("seq", b"0"),
            "deliveries": letter.entry.deliveries,
            "error": letter.error[:1000],
        }
        marker = letter_key(_stream_shard(letter.entry.stream), letter.entry.entry_id)
        args: list[Any] = [REPLAYED_MARKER_TTL_S]
        for name, value in values.items():
            args += [name, value]
        calls.append(([PIPELINE_DLQ_STREAM, marker], args))
    await run_calls(client, scripts, "letter", calls)
    async with client.pipeline(transaction=False) as pipe:
        for letter in letters:
            pipe.xack(letter.entry.stream, PIPELINE_GROUP, letter.entry.entry_id)
        await pipe.execute()


def _stream_shard(stream: str) -> str:
    """``orders:{3}`` → ``3`` (a marker must not carry the stream's own hash tag)."""
    return stream.replace("{", "").replace("}", "").rpartition(":")[2]


def encode_cursor(value: str) -> str:
    """An opaque cursor for a position (a stream id or an index member)."""
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The position inside a cursor; ValueError if it is not one of ours."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        return base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise ValueError("bad cursor") from exc


def describe(entry_id: str, fields: dict[bytes, bytes]) -> dict[str, Any]:
    """A DLQ entry as the API shows it (the payload as hex)."""
    out: dict[str, Any] = {"id": entry_id}
    for key, value in fields.items():
        name = text(key)
        out[name] = value.hex() if name == "payload" else value.decode(errors="replace")
    out["replayable"] = out.get("source") == SOURCE
    return out


async def list_dead_letters(
    client: AnyRedis, cursor: str | None, limit: int, queue: Queue = "pipeline"
) -> tuple[list[dict[str, Any]], bool]:
    """A page of ``queue``'s entries after ``cursor``, oldest first, and whether more follow."""
    start = "-" if cursor is None else f"({decode_cursor(cursor)}"
    rows: Any = await client.xrange(QUEUES[queue], min=start, max="+", count=limit + 1)
    return [describe(text(entry_id), fields) for entry_id, fields in rows[:limit]], len(
        rows
    ) > limit


async def replay(client: AnyRedis, scripts: Scripts, entry_id: str, shards: int) -> str:
    """Put a dead-lettered order back into its shard stream, once; return the new entry id.

    The entry leaves the DLQ in the same atomic step on a single Redis (after
    the append, on a cluster). The shard is recomputed from the device id with
    the deployment's shard count, so a replay lands where the device's orders
    live now.

    Raises:
        ReplayError: ``not_found``, ``not_replayable`` or ``already_replayed``.
    """
    async with client.pipeline(transaction=False) as pipe:
        pipe.get(replayed_key(entry_id))
        pipe.get(legacy_replayed_key(entry_id))
        markers: list[Any] = await pipe.execute()
    before = markers[0] or markers[1]
    if before:
        raise ReplayError("already_replayed", f"{entry_id} was replayed", replayed_as=text(before))
    stream, fields = await _find(client, entry_id)
    if text(fields.get("source", b"")) != SOURCE or not fields.get("device_id"):
        raise ReplayError("not_replayable", f"DLQ entry {entry_id} holds no accepted order")
    target = stream_key(shard_of(text(fields["device_id"]), shards))
    values: list[Any] = []
    for name in _REPLAY_FIELDS:
        values += [name, fields.get(name, b"")]
    values += ["replay_of", entry_id]
    marker = replayed_key(entry_id)
    if is_cluster(client):
        appended: Any = await client.xadd(target, dict(zip(values[::2], values[1::2], strict=True)))
        done, new_id = await scripts.run(
            client, "replayed", [stream, marker], [entry_id, REPLAYED_MARKER_TTL_S, text(appended)]
        )
    else:
        done, new_id = await scripts.run(
            client, "replay", [stream, marker, target], [entry_id, REPLAYED_MARKER_TTL_S, *values]
        )
    if not done:
        raise ReplayError("already_replayed", f"{entry_id} was replayed", replayed_as=text(new_id))
    return text(new_id)


async def resolve(client: AnyRedis, entry_id: str) -> None:
    """An operator settled a dead letter by hand: remove it from ``pipeline:dlq``.

    Raises:
        ReplayError: ``not_found``.
    """
    if not await client.xdel(PIPELINE_DLQ_STREAM, entry_id):
        raise ReplayError("not_found", f"no pipeline DLQ entry {entry_id}")


async def _find(client: AnyRedis, entry_id: str) -> tuple[str, dict[str, bytes]]:
    """The stream holding DLQ entry ``entry_id`` and its fields (pipeline DLQ first)."""
    for stream in (PIPELINE_DLQ_STREAM, DLQ_STREAM):
        rows: Any = await client.xrange(stream, min=entry_id, max=entry_id, count=1)
        if rows:
            return stream, {text(k): v for k, v in rows[0][1].items()}
    raise ReplayError("not_found", f"no DLQ entry {entry_id}")
