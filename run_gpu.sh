#!/usr/bin/env bash
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ind_x MPLBACKEND=Agg GIT_COMMIT=ddfa242 TORCHINDUCTOR_COMPILE_THREADS=2
mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/gpu.txt
T0=$(date +%s)
P="-p no:cacheprovider -p no:logging --tb=short -q -rA"
(timeout 200 python3 -m pytest -m gpu tests/gpu/test_producer_gpu.py tests/gpu/test_grad_producer_gpu.py -n 4 $P > $OUT/t_producer.log 2>&1) &
(timeout 200 python3 -m pytest -m gpu tests/gpu/test_persistent_gpu.py -n 4 $P > $OUT/t_persistent.log 2>&1) &
(timeout 200 python3 -m pytest -m gpu tests/test_compile_gpu.py -n 3 $P > $OUT/t_compile.log 2>&1) &
wait
echo "tests done $(( $(date +%s) - T0 )) s"
for f in $OUT/t_*.log; do echo "== $f"; grep -E "passed|failed|FAILED|Error" $f | tail -8; done
timeout 400 python3 bench/tps.py --models 8B --systems surogate:qfp8,surogate:qfp8+gradproducer,surogate:fp8,surogate:fp8+gradproducer,surogate:fp8+combo --timeout 150 --out $OUT/tps1 2>&1 | tail -20
echo "all done $(( $(date +%s) - T0 )) s"
