"""What training and scoring both build from a config: the tokenizer, the NeMo GPT config, the
device and Megatron strategy, the log-prob model and the log-prob functions."""
