"""OpenAI Files API (/v1/files): the Batch API's input and output files."""
