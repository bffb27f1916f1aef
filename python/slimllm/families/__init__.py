"""Model families: the adapters that say where each architecture keeps its heads and channels
(:mod:`slimllm.families.adapters`), the remote code of per-layer pruned checkpoints
(:mod:`slimllm.families.modeling_slimllm`) and the Nemotron-NAS config class that vLLM exports
carry (:mod:`slimllm.families.configuration_decilm`)."""
