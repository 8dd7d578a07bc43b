"""The hostile-input suite: generated requests and payloads at every entry point.

``make test`` runs a short form (``CASES`` per target). ``HOSTILE_SLOW=1``
runs the full form: at least 10,000 generated cases per target, with the
memory check meaningful at that size.
"""

from __future__ import annotations

import os
from typing import Final

SLOW: Final = bool(os.environ.get("HOSTILE_SLOW"))
CASES: Final = 10_000 if SLOW else 150
# RSS may grow while caches and allocator arenas warm up; after the first tenth
# of the run it must stay within this much (a leak of 1 KB per case over
# 10,000 cases would cross it).
RSS_SLACK_BYTES: Final = 24 * 1024 * 1024
