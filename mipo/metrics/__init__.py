"""Metrics of an evaluation: accuracy, the LLM judge, paired statistics, diversity, the table."""
