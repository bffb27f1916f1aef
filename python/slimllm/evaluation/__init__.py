"""Measuring models: perplexity, zero-shot tasks and speed (:mod:`slimllm.evaluation.evaluate`),
local task definitions (:mod:`slimllm.evaluation.tasks`) and the inspection of saved folders
(:mod:`slimllm.evaluation.inspection`)."""
