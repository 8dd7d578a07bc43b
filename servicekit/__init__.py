"""Service conventions shared by the agent, the bridge and the pipeline.

Settings (flags > ``ORDERS_*`` > TOML), JSON logging, connection URLs, the
clock, and retry pacing. The wire contract itself lives in ``schemas``.
"""
