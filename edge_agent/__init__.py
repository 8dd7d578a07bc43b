"""the device agent."""
