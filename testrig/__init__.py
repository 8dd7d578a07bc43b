"""The test rig: real servers, our services as processes, power cuts, a TCP proxy, CPU readings.

Tests, benchmarks and the fleet simulator all start what they run through it:

* ``servers``: Mosquitto and Redis on free loopback ports (:class:`ServerProcess`).
* ``services``: our own services (bridge, pipeline) as processes, ready on /healthz.
* ``powercut``: a FUSE filesystem that loses unsynced writes, as a power cut does.
* ``proxy``: a TCP proxy for drops, partitions (blackhole) and WAN delay.
* ``procstat``: the one reader of a process's CPU time.
* ``errors``: :class:`RigError` and its subclasses.

Importing this package starts nothing and imports no submodule: the power-cut
mount process imports only ``testrig.powercut``.
"""
