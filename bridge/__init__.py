"""the cloud bridge."""
