#!/usr/bin/env bash
# Do checkpoints saved here load where users deploy them? transformers 4.57 (what many serving and
# evaluation stacks pin) in its own virtual environment loads a saved checkpoint, tied and untied, LoRA
# merged; the test compares its logits, tokenizer ids and image bounds with transformers 5.x's.
#
#   bash runs/check_transformers4.sh          # VENV4=out/venv-transformers4; about a minute once installed
set -euo pipefail
cd "$(dirname "$0")/.."
VENV4=${VENV4:-out/venv-transformers4}
if [ ! -x "$VENV4/bin/python" ]; then
  python3 -m venv "$VENV4"
  "$VENV4/bin/pip" install --quiet torch==2.13.0  # the CPU build; an unpinned torch would pull CUDA
  "$VENV4/bin/pip" install --quiet 'transformers==4.57.*' safetensors pillow numpy
fi
FGRL_TRANSFORMERS4_PYTHON="$(cd "$VENV4" && pwd)/bin/python" python -m pytest -q tests/test_lora_checkpoint.py -k transformers_4 -rs
