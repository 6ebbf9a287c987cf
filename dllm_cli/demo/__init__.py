"""The embedded demo model: its tokenizer and checkpoint writers and its training recipe."""
