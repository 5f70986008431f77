"""services/trainer."""
