"""Inference engines: one interface, many concurrent requests (see base.Engine)."""
