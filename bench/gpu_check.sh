#!/usr/bin/env bash
# One device call that checks the whole tree on a GPU: the GPU tests and the README main job (with
# GPU_CHECK_BENCH=1 also the dequant-scratch benchmark subset). Results and logs go to $OUT (the device tool brings them back).
#   bash bench/gpu_check.sh            (on the GPU machine, from the repository root)
# GPU_TESTS="tests/gpu/test_a.py ..." runs those test files only (a call too short for all of them; default: all),
# GPU_TESTS_TIMEOUT their bound in seconds (420), GPU_CHECK_JOBS=0 the tests alone (no main job, no launch check).
set -uo pipefail
OUT="${OUT:-bench/results/gpu_check}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export GIT_COMMIT="${GIT_COMMIT:-$(python3 -c "from surogate.training.info import git_commit; print(git_commit())")}"  # "+modified": the files are not the .git HEAD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers, peft; print(torch.__version__, triton.__version__, transformers.__version__, peft.__version__)" | tee -a "$OUT/gpu.txt"

# The tests spend most of their time compiling (CPU), so pytest-xdist runs them in parallel processes that share
# the one GPU; no test measures time or memory across processes.
WORKERS="${GPU_TEST_WORKERS:-8}"; export TORCHINDUCTOR_COMPILE_THREADS="${TORCHINDUCTOR_COMPILE_THREADS:-2}"
read -r -a TESTS <<< "${GPU_TESTS:-tests/gpu tests/test_compile_gpu.py}"
# -v: each failure is named as it happens, so a run that its bound cuts short still names them (run 156 did not).
echo "== GPU tests ($WORKERS workers): ${TESTS[*]}"; timeout "${GPU_TESTS_TIMEOUT:-420}" python3 -m pytest "${TESTS[@]}" -m gpu -v \
    -n "$WORKERS" -p no:cacheprovider -p no:logging --tb=short --durations=12 2>&1 | tee "$OUT/gpu_tests.log" \
    | grep -E "FAILED|ERROR|^E  |passed|failed" | tail -n 40
TESTS_RC=${PIPESTATUS[0]}  # timeout's 124 when the bound cut the tests short, pytest's status otherwise
[ "$TESTS_RC" = 124 ] && echo "== GPU tests cut short by GPU_TESTS_TIMEOUT=${GPU_TESTS_TIMEOUT:-420} s: \
$(grep -c PASSED "$OUT/gpu_tests.log") passed before it; rerun the files not reached with GPU_TESTS"
if [ "${GPU_CHECK_BENCH:-0}" = 1 ]; then  # the dequant-scratch kernel benchmark, when the call has time for it
    echo "== dequant kernels, 8B shapes"; timeout 120 python3 bench/fused_kernels.py --models 8B \
        --recipes "${BENCH_RECIPES:-qnf4,qfp8-bf16}" --skip-validate --out "$OUT" 2>&1 | tail -n 12
fi
[ "${GPU_CHECK_JOBS:-1}" = 0 ] && exit "$TESTS_RC"
echo "== main job"; timeout 150 python3 -m surogate train --output-dir /tmp/surogate-out 2>&1 | tee "$OUT/main_job.log" | tail -n 8
# Every LoRA linear launch of a short fp8 run (8 x 128 = 1,024 rows: the persistent route) checked against the
# reference, CUDA-graph replays included (bench/launch_check.py; exit 1 names a bad launch).
echo "== launch check (fp8, 1,024 rows)"; timeout 150 python3 bench/launch_check.py --set recipe=fp8 \
    --set per_device_train_batch_size=8 --set max_steps=40 --set output_dir=/tmp/surogate-lc --out "$OUT" 2>&1 \
    | tee "$OUT/launch_check.log" | tail -n 4
exit "$TESTS_RC"
