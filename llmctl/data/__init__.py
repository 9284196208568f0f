"""Data: sources (Hub and local files) -> tokenizer -> packed token store -> batches."""
