#!/usr/bin/env bash
# Many prompts at once: one JSON object per line in, one JSON line per input out, in order.
# The sequences decode together through the batched engine.
#   RWKV_MODEL=rwkv7-g1-0.4b examples/03_batch.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
rwkv generate --batch "$here/03_batch.jsonl" --batch-size 8 -q
