"""pipeline workers and the orders API."""
