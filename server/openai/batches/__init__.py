"""OpenAI Batch API (/v1/batches): a JSONL file of requests run on the job queue at low priority."""
