"""The demos: ``fleet-sim`` runs with fixed arguments, one module per ``make`` target.

* ``one_region``: ``make demo`` (1,000 devices, a broker and a bridge killed),
  ``make demo-scale`` (10,000 devices over 4 processes) and ``make stack``.
* ``two_regions``: ``make demo-geo`` (a region outage and a partition).

Each is ``python -m fleet.demos.<name>``; extra flags go to ``fleet-sim``.
"""
