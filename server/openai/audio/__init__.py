"""OpenAI audio (/v1/audio/transcriptions, /v1/audio/translations): speech to text on audio models."""
