"""Data: chat messages, tokenisation of prompts and responses, the pairs file, the tasks (datasets)."""
