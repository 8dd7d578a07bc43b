"""The geo rig: the simulator across two or more regions, and its chaos between regions.

* ``stack``: per region Mosquitto, Redis and the services, and the links between them.
* ``links``: the cross-region links a partition cuts.
* ``chaos``: faults that name regions (region-down, region-partition, failover-storm).
* ``sim``: one geo run: the fleet's load, the chaos schedule, the count monitor.
* ``verify``: the geo verdict: no order lost, duplicated or stuck across regions.
* ``runner``: ``fleet-sim --regions …``: flags, the run, the report.

Its demo, ``make demo-geo``, is :mod:`fleet.demos.two_regions`.

Nothing is imported here: :mod:`fleet.chaos` imports :mod:`fleet.geo.chaos`,
which must not pull in the simulator.
"""
