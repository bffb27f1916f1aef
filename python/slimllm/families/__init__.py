"""Model families: the adapters that say where each architecture keeps its heads and channels
(:mod:`slimllm.families.adapters`) and the remote code of per-layer pruned checkpoints
(:mod:`slimllm.families.modeling_slimllm`)."""
