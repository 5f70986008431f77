"""services/capture."""
