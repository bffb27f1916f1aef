"""The pruning walk: calibration sets, per-layer ratios, layer slicing, resumable state and the
block-by-block pipeline (:mod:`slimllm.pruning.pipeline`)."""
