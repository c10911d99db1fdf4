"""Architectures and checkpoint loading (needs torch; the runtime never imports this)."""
