"""Loading and saving models: Hugging Face folders, GGUF files and slimllm-pruned checkpoints
(:mod:`slimllm.io.checkpoint`, block by block: :mod:`slimllm.io.lazy`,
:mod:`slimllm.io.streaming`), and exports for serving engines: GGUF for llama.cpp
(:mod:`slimllm.io.gguf_export`) and folders for vLLM (:mod:`slimllm.io.vllm_export`)."""
