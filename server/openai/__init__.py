"""OpenAI-compatible API families, one folder each (api_router.py, protocol.py, serving.py)."""
