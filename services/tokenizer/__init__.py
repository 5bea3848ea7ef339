"""Tokenizer service: batch text → INT64 tensors (input_ids, attention_mask, token_type_ids) in
Triton's raw layout, with the Rust `tokenizers` library."""
