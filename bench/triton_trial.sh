#!/usr/bin/env bash
# A newer Triton on the GPU machine, beside its own (one device call): does the machine's torch run with it, and do
# the persistent kernel's warp-specialized builds compute right and fast there? `compat.warp_specialize_checked`
# lists the Tritons whose specialized builds were found right on a GPU; none is, so far, and qfp8's block-scaled
# persistent kernel needs them to pass cuBLASLt (issue #19).
#   bash bench/triton_trial.sh .tw/triton-3.9.0.tar.xz      (on the GPU machine, from the repository root)
# The tarball holds `triton/` and its dist-info, stripped to what an NVIDIA Hopper run needs (a whole wheel is over
# the 64 MiB a call may carry): libtriton.so through `strip --strip-unneeded` (500 -> 192 MB), without the AMD
# backend, CUPTI, proton, the instrumentation library, ptxas-blackwell and nvdisasm; `tar -cJ`: 51 MB for 3.9.0.
# Results and logs go to $OUT.
# TRIAL_STEPS picks the steps (default "import inductor compile configs bench"); TRIAL_RECIPES the bench's recipes.
set -uo pipefail
TARBALL="$1"; SITE=/tmp/triton-trial
OUT="${OUT:-bench/results/triton_trial}"; mkdir -p "$OUT"
if [ ! -d "$SITE/triton" ]; then mkdir -p "$SITE" && python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$TARBALL" "$SITE" || exit 1; fi
# What the cut left dangling (run 155): the dist-info's entry point to the AMD backend (import fails without it),
# and ptxas-blackwell, whose version 3.9's NVIDIA backend reads for every arch (the bundled ptxas serves sm_90).
sed -i '/amd/d' "$SITE"/triton-*.dist-info/entry_points.txt 2>/dev/null
BIN="$SITE/triton/backends/nvidia/bin"; [ -e "$BIN/ptxas-blackwell" ] || ln -s ptxas "$BIN/ptxas-blackwell"
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 MPLBACKEND=Agg TORCHINDUCTOR_COMPILE_THREADS="${TORCHINDUCTOR_COMPILE_THREADS:-2}"
export SUROGATE_CACHE_DIR=/tmp/surogate-trial-cache TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-trial-cache  # not 3.6's
STEPS="${TRIAL_STEPS:-import inductor compile configs bench}"
step() { [[ " $STEPS " == *" $1 "* ]]; }

if step import; then echo "== import"
    timeout 60 python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, triton.__file__)" \
        2>&1 | tee "$OUT/trial_import.log"; fi
if step inductor; then echo "== Inductor's own kernels (torch.compile of a matmul and pointwise ops)"
    timeout 120 python3 - <<'EOF' 2>&1 | tail -n 20 | tee "$OUT/trial_inductor.log"
import torch
x = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)
w = torch.randn(1024, 768, device="cuda", dtype=torch.bfloat16)
f = lambda x, w: torch.nn.functional.silu(x @ w) * x[:, :768].float().softmax(-1)  # noqa: E731
eager, compiled = f(x, w), torch.compile(f)(x, w)
print("inductor max abs diff", (eager - compiled).abs().max().item())
EOF
fi
if step compile; then echo "== surogate.compile of a tiny Qwen3 vs eager PEFT (every recipe)"
    timeout 180 python3 -m pytest tests/test_compile_gpu.py -m gpu -q -n 7 -p no:cacheprovider -p no:logging --tb=line \
        2>&1 | tail -n 15 | tee "$OUT/trial_compile.log"; fi
if step configs; then echo "== every persistent config, warp-specialized ones offered"
    timeout 240 python3 -c "
import sys, pytest
from surogate.kernels import configs
configs.PERSISTENT_WARP_SPECIALIZE = True
sys.exit(pytest.main(['tests/gpu/test_persistent_gpu.py', '-m', 'gpu', '-q', '-s', '-p', 'no:cacheprovider',
                      '-k', 'every_config', '--tb=line']))" 2>&1 | tee "$OUT/trial_configs.log" | grep -v "^$" | tail -n 60; fi
if step bench; then echo "== the persistent kernel vs cuBLAS, warp-specialized configs offered"
    timeout "${TRIAL_BENCH_TIMEOUT:-240}" python3 bench/fused_kernels.py --persistent --warp-specialize --models 8B \
        --m 4096,16384 --recipes "${TRIAL_RECIPES:-qfp8,fp8}" --out "$OUT" 2>&1 | tee "$OUT/trial_bench.log" | tail -n 30; fi
