#!/usr/bin/env bash
# The semantic guard of issue 19: run from a checkout (its seg/ first on sys.path).
set -e
out=$1
rm -rf "$out"; mkdir -p "$out"
python train.py hydra.run.dir="$out/default" > "$out/default.out" 2>&1
python train.py debug=tiny trainer.precision=fp32 hydra.run.dir="$out/tiny" > "$out/tiny.out" 2>&1
python - "$out" <<'PY'
import hashlib, sys, torch
out = sys.argv[1]
state = torch.load(f"{out}/tiny/checkpoints/last.pt", weights_only=True)
digest = hashlib.sha256()
for key in sorted(state["model"]):
    digest.update(key.encode()); digest.update(state["model"][key].numpy().tobytes())
open(f"{out}/tiny_weights.sha256", "w").write(digest.hexdigest() + "\n")
print(digest.hexdigest())
PY
