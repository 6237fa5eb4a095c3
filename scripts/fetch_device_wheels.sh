#!/usr/bin/env bash
# Download, on a machine with pip access, the wheels that a lent GPU machine (the workplace's `device` tool:
# Python 3.12, its own CUDA torch, nothing fetchable there) lacks to import imagerl and run
# scripts/gpu_checks.sh: our pinned transformers and diffusers (it has transformers 5.17 and no diffusers),
# omegaconf, jsonnet, importlib_metadata (+ lazy-importer, which diffusers needs). Everything else the checks
# import (accelerate, peft, safetensors, tokenizers, pillow, numpy, rich, matplotlib, httpx, pytest) is in that
# image, as listed in the tool library's device/KINDS.md. About 27 MB; .whl/ is git-ignored and travels with
# `carry: [".whl"]`.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  transformers==5.23.0 diffusers==0.42.1 omegaconf==2.4.0 jsonnet==0.22.0 importlib_metadata==10.2.0 lazy-importer
ls -l .whl
