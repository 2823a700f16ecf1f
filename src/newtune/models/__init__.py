"""Models: tokenizer and model loading, LoRA adapters and merging."""
