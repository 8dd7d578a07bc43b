"""Service conventions shared by the agent, the bridge and the pipeline.

Settings (flags > ``ORDERS_*`` > TOML), JSON logging, connection URLs, the
clock, retry pacing, background loops that fail loudly (``tasks``), and the
cloud side's MQTT 5 client (``mqtt``: imports the ``mqtt5`` codec, which only
the cloud extras install; the edge agent never imports it). The wire contract
itself lives in ``schemas``.
"""
