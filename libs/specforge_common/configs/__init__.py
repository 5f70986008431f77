"""Packaged run configs (demo.toml)."""
