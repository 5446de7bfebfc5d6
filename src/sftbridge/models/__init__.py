"""Models below training and inference: load a base, tokenizer and LoRA config (``loading``); the built-in
tiny model and sftbridge's cache (``builtin``)."""
