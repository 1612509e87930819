"""Vigil: real-time clinical event hub. This package is the composition root (CLI and wiring)."""
