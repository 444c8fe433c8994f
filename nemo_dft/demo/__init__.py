"""The embedded demo: the tiny Mistral-shaped model and tokenizer built locally, and the copy task."""
