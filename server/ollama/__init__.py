"""Ollama's native API (/api/*): Ollama clients pointed at `ollm serve` work unchanged."""
