#!/usr/bin/env bash
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ind_x MPLBACKEND=Agg GIT_COMMIT=f600db8 TORCHINDUCTOR_COMPILE_THREADS=4
mkdir -p $OUT
T0=$(date +%s)
for s in fp8 bf16 qfp8 qnf4; do
  el=$(( $(date +%s) - T0 )); if [ $el -gt 250 ]; then echo "skip $s at $el s"; continue; fi
  timeout 115 python3 bench/tps.py --models 8B --systems surogate:$s --timeout 110 --out $OUT/tps --append 2>&1 | grep -E "tok/s|rror|OOM"
done
rm -f $OUT/tps/tps.png
echo "all done $(( $(date +%s) - T0 )) s"
