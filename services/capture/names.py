"""The capture service's names on the bus: who it is in logs and dead letters, and its durable
consumers on the PROMPTS stream, shared by every capture worker of a run."""

from __future__ import annotations

SERVICE = "capture"
DURABLE = "capture"  # sf.<run>.prompts
RECAPTURE_DURABLE = "recapture"  # sf.<run>.prompts.recapture
