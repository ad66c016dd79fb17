"""Stand-in for unsloth_zoo 2026.10.9 (see ../README.md)."""

__version__ = "2026.10.9+standin"
