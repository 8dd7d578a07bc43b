"""Outbox schema, versioned with ``PRAGMA user_version``.

Migration N (1-based) takes a database at version N-1 to version N. Append
new migrations at the end; never edit one that has shipped, because devices
in the field upgrade their queue in place.
"""

from __future__ import annotations

from typing import Final

MIGRATIONS: Final[tuple[str, ...]] = (
    # 1: the outbox table, a counter for `seq`, and partial indexes that keep
    # the publisher's "oldest unreceipted first" scan proportional to the backlog.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO meta (key, value) VALUES ('next_seq', 0), ('last_open_ms', 0);
    CREATE TABLE orders (
        seq INTEGER PRIMARY KEY,
        order_id TEXT NOT NULL UNIQUE,
        payload BLOB NOT NULL,
        size INTEGER NOT NULL,
        state TEXT NOT NULL,
        status TEXT,
        reason TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_retry_ms INTEGER NOT NULL DEFAULT 0,
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL,
        settled_ms INTEGER
    );
    CREATE INDEX orders_pending ON orders (seq) WHERE settled_ms IS NULL;
    CREATE INDEX orders_settled ON orders (settled_ms) WHERE settled_ms IS NOT NULL;
    """,
    # 2: held orders, status recovery and the agent clock (edge_agent/_clock.py).
    # `next_retry_ms` and the new `*_clock_ms` columns are in agent-clock ms;
    # the store starts the clock at the wall time, so existing rows stay comparable:
    # an old sent row counts as first sent when it was created (conservative).
    """
    INSERT INTO meta (key, value) VALUES ('clock_ms', 0), ('clock_wall_ms', 0);
    ALTER TABLE orders ADD COLUMN first_sent_clock_ms INTEGER;
    ALTER TABLE orders ADD COLUMN status_query_ms INTEGER;
    ALTER TABLE orders ADD COLUMN status_queries INTEGER NOT NULL DEFAULT 0;
    UPDATE orders SET first_sent_clock_ms = created_ms WHERE attempts > 0;
    UPDATE orders SET next_retry_ms = 0 WHERE settled_ms IS NULL;
    CREATE INDEX orders_status_query ON orders (status_query_ms)
        WHERE status_query_ms IS NOT NULL;
    """,
    # 3: geo mode and tracing. `regions` is the order's `attempts` (GEO.md) as
    # comma-separated region names, committed before the first PUBLISH to a new
    # region; the column `attempts` already counts sends. `traceparent` is the
    # order's W3C trace context, set at intake.
    """
    ALTER TABLE orders ADD COLUMN regions TEXT NOT NULL DEFAULT '';
    ALTER TABLE orders ADD COLUMN traceparent TEXT;
    """,
)

SCHEMA_VERSION: Final = len(MIGRATIONS)
