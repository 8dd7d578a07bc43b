"""Fleet simulator, chaos, verification and the local stack runner."""
