"""libs/specforge_common."""
