"""Subcommands of ``specforge`` that belong to no single service."""
