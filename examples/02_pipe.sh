#!/usr/bin/env bash
# Pipe a file through `rwkv generate`: the argument is the instruction, stdin the material.
# Generated text goes to stdout; the loading line and stats go to stderr.
#   RWKV_MODEL=rwkv7-g1-0.4b examples/02_pipe.sh README.md
set -euo pipefail
file="${1:-README.md}"
head -c 2000 "$file" | rwkv generate "Summarise the following text in two sentences." -n 80 --temp 0.7 --stop $'\n\n'
