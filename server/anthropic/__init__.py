"""Anthropic Messages API (/v1/messages): Claude Code and other Anthropic-protocol clients."""
