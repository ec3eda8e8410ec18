#!/usr/bin/env bash
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ind_x MPLBACKEND=Agg GIT_COMMIT=6aef24b TORCHINDUCTOR_COMPILE_THREADS=2
mkdir -p $OUT
T0=$(date +%s)
P="-p no:cacheprovider -p no:logging --tb=short -q -rA"
(timeout 200 python3 -m pytest -m gpu tests/gpu/test_grad_producer_gpu.py -n 2 $P > $OUT/t_producer.log 2>&1) &
(timeout 200 python3 -m pytest -m gpu "tests/gpu/test_persistent_gpu.py::test_larger_ranks_and_a_bias_tuned_and_untuned" -n 3 $P > $OUT/t_persistent.log 2>&1) &
(timeout 200 python3 bench/step_profile.py --models 0.6B --systems surogate:bf16 --out $OUT/prof06 > $OUT/prof06.log 2>&1) &
wait
echo "phase1 $(( $(date +%s) - T0 )) s"
for f in $OUT/t_*.log; do echo "== $f"; grep -E "passed|failed|FAILED|Error" $f | tail -6; done
tail -5 $OUT/prof06.log
for r in 64 128; do
timeout 150 python3 bench/kernels.py --persistent --models 8B --m 4096 --recipes bf16,fp8 --rank $r --skip-validate --out $OUT/kp_r$r > $OUT/kp_r$r.log 2>&1
tail -3 $OUT/kp_r$r.log
done
echo "all done $(( $(date +%s) - T0 )) s"
