"""Loading and saving models: Hugging Face folders, GGUF files and slimllm-pruned checkpoints
(:mod:`slimllm.io.checkpoint`)."""
