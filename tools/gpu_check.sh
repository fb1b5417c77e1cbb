#!/usr/bin/env bash
# The GPU check: what rmjax does on one NVIDIA GPU, in one call of under 8 minutes.
#
#   tools/gpu_check.sh prepare     here, once: the wheel the GPU image lacks (gguf) into .gpu_wheels/
#   tools/gpu_check.sh             on the GPU machine (carry .gpu_wheels); JSON results under $OUT
#                                  (default tools/results/gpu/), a short table printed last
#
# 1. One attention layer (9 query / 3 KV heads, head dim 64, causal, bf16) at 4K and 8K tokens,
#    forward and forward + backward: cudnn vs blockwise vs naive vs torch's SDPA on the same GPU.
# 2. A 1B-class Llama (bf16, random weights, remat full) forward and train step at 4K and 8K
#    tokens, padded (one sequence per row) and packed (four segments per row), per backend: MFU.
# 3. `rmjax score`'s engine vs HF transformers on 2-4K-token pairs, same GPU, same token ids:
#    sequence tokens/s of each and their agreement (tools/bench_gpu_scoring.py).
# The prompt-tree kernel (rmjax/models/tree_attention.py) is a Pallas TPU kernel: on a GPU packed
# prompt trees run blockwise, which steps 2 and 3 time.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = prepare ]; then
    mkdir -p .gpu_wheels
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 -d .gpu_wheels gguf==0.19.0
    ls -la .gpu_wheels
    exit 0
fi

OUT=${OUT:-tools/results/gpu}
mkdir -p "$OUT"
SITE=$(mktemp -d)
if ls .gpu_wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target "$SITE" .gpu_wheels/*.whl
fi
export PYTHONPATH="$PWD:$SITE" XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
{
    date -u +%FT%TZ
    nvidia-smi -L
    python3 -c "import jax, torch, transformers; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, '| transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/environment.txt"

step() {  # step NAME SECONDS COMMAND...: run it bounded, log everything, go on whatever happens
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: exit $? after $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
}

step attention 200 python3 tools/bench_attention.py --gpu --layer-lengths 4096 8192 --repeats 5 \
    --out "$OUT/attention_gpu.json"
step scoring 180 python3 tools/bench_gpu_scoring.py --pairs 16 --lo 2048 --hi 4096 --out "$OUT/scoring_gpu.json"

python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.exists() else {}
att, sc = load("attention_gpu.json"), load("scoring_gpu.json")
for r in att.get("layer", []):
    print(f"layer T={r['seq']}: " + ", ".join(f"{b} fwd {r.get(b + '_fwd_s', float('nan')) * 1e3:.2f} ms / fwd+bwd "
                                            f"{r.get(b + '_fwd_bwd_s', float('nan')) * 1e3:.2f} ms"
                                            for b in ("cudnn", "blockwise", "naive", "torch_sdpa")))
for r in att.get("mfu_1b", []):
    print(f"1B T={r['seq']} {r.get('layout', '')} {r['backend']}: " + (r["error"][:120] if "error" in r else
          f"fwd MFU {r.get('fwd_mfu', float('nan')):.3f}, train MFU {r.get('train_mfu', float('nan')):.3f}"))
if sc:
    print(f"score {sc['pairs']} pairs ({sc['sequence_tokens']} tokens): rmjax {sc['rmjax_sequence_tokens_per_s']:.0f} "
          f"tok/s, HF {sc['hf_sequence_tokens_per_s']:.0f} tok/s, ratio {sc['ratio_over_hf']:.2f}x, "
          f"max rel diff {sc['max_rel_diff_logp_vs_hf']:.2e}")
EOF
cat "$OUT/steps.txt"
