"""Command-line entry points: one module per command, each a thin wrapper."""
