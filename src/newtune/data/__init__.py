"""Data: sources, prompt strategies, the tokenization engine and the prepared-data cache."""
