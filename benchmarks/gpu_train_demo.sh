#!/usr/bin/env bash
# Train the demo model on one GPU; the model comes back as $OUT/demo_model.tar.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 benchmarks/demo_model/train.py --corpus .corpus --out /tmp/demo_model --steps 2000 2>&1 | tail -30
tar -cf "$OUT/demo_model.tar" -C /tmp demo_model
