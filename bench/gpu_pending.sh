#!/usr/bin/env bash
# What bench/NOTES.md's "Not yet run on a GPU" lists ask (sessions 36, 37), as device calls:
#   bash bench/gpu_pending.sh 1     the GPU tests of real data, offload and the loss; the main job; bench/head_rows.py
#   bash bench/gpu_pending.sh 2     8,000 chat rows (forked tokenizing, the cache) on a Qwen3-0.6B-shaped model, the
#                                   head on labelled rows and on every row; padded buckets; StableLM, graphs on / off
#   bash bench/gpu_pending.sh all   1 and the chat pair of 2 in one call (TESTS=..., TESTS_S and CHAT_S bound them)
#   bash bench/gpu_pending.sh 3     GPT-Neo's capture test alone (its traceback), the main job (transformers 5.17:
#                                   the chunked head again), a retrieval-shaped chat set (bench/rag_chat.py, ~19%
#                                   labelled) on the Qwen3-0.6B shape, the head on labelled rows and on every row
# Logs go to $OUT (the device tool brings them back).
set -uo pipefail
OUT="${OUT:-bench/results/gpu_pending}"; mkdir -p "$OUT"
export PYTHONPATH=$PWD TORCHINDUCTOR_COMPILE_THREADS=2 PYTHONUNBUFFERED=1
export GIT_COMMIT="${GIT_COMMIT:-$(python3 -c "from surogate.training.info import git_commit; print(git_commit())")}"
t0=$(date +%s)
if [ "${1:-1}" = 1 ] || [ "${1:-1}" = all ]; then
GPU_TESTS="${TESTS:-tests/gpu/test_real_data_gpu.py tests/gpu/test_offload_gpu.py tests/gpu/test_loss_gpu.py}" GPU_CHECK_JOBS=0 GPU_TESTS_TIMEOUT=${TESTS_S:-280} bash bench/gpu_check.sh
echo "== tests took $(( $(date +%s) - t0 )) s"
echo "== main job"; timeout 100 python3 -m surogate train --output-dir /tmp/so 2>&1 | tee $OUT/main_job.log | grep -E "head|tokens/s|rror" | tail -n 4
echo "== head rows"; timeout 100 python3 bench/head_rows.py --out $OUT 2>&1 | tail -n 9
fi
if [ "${1:-1}" = 3 ]; then
echo "== GPT-Neo capture"; timeout 150 python3 -m pytest tests/gpu/test_real_data_gpu.py -k gpt_neo -m gpu -q \
  -p no:cacheprovider --tb=long 2>&1 | tee $OUT/gpt_neo.log | grep -E "^E  |Error|passed|failed" | head -n 30
echo "== main job"; timeout 100 python3 -m surogate train --output-dir /tmp/so 2>&1 | tee $OUT/main_job.log \
  | grep -E "head|tokens/s|rror" | tail -n 3; cp /tmp/so/compile_report.txt $OUT/ 2>/dev/null
fi
if [ "${1:-1}" != 1 ]; then
python3 - <<'PY'
import json, sys
import transformers as T
sys.path.insert(0, "bench")
from microbench import varied_chat_rows
from surogate.training.tokenizer import load_tokenizer
with open("/tmp/chat8k.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in varied_chat_rows(8000))
tok = load_tokenizer(None)
for name, cfg in {"q06": T.Qwen3Config(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
                  "slm": T.StableLmConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                                          num_key_value_heads=16, vocab_size=len(tok), max_position_embeddings=4096)}.items():
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(f"/tmp/{name}"); tok.save_pretrained(f"/tmp/{name}")
PY
fi
if [ "${1:-1}" = 3 ]; then
python3 bench/rag_chat.py /tmp/rag.jsonl 8000
RAG="examples/configs/chat-messages.yaml --set dataset.path=/tmp/rag.jsonl --set model=/tmp/q06 --set sequence_len=2048 --set per_device_train_batch_size=4 --set max_steps=30 --set sample_packing=true --set dataset.max_eval_samples=16 --set logging_steps=10"
for head in labelled every; do
  echo "== retrieval-shaped chat, 0.6B shape, head on $head rows"; s=$(date +%s)
  timeout ${CHAT_S:-100} python3 -c "import sys; import surogate.training.steps as s; s.bound_head_rows = (lambda *a: None) if '$head' == 'every' else s.bound_head_rows; from surogate.training.cli import main; sys.exit(main(sys.argv[1:]))" \
    train $RAG --output-dir /tmp/rag-$head 2>&1 | tee $OUT/rag_$head.log | grep -Ei "lm head|done|rror" | head -n 4
  cp /tmp/rag-$head/compile_report.txt $OUT/rag_${head}_compile_report.txt 2>/dev/null; echo "== took $(( $(date +%s) - s )) s"
done
fi
if [ "${1:-1}" = 2 ] || [ "${1:-1}" = all ]; then
CHAT="examples/configs/chat-messages.yaml --set dataset.path=/tmp/chat8k.jsonl --set model=/tmp/q06 --set sequence_len=2048 --set per_device_train_batch_size=4 --set max_steps=30 --set sample_packing=true --set dataset.max_eval_samples=16 --set logging_steps=10"
echo "== chat 8k rows, 0.6B shape, head on labelled rows"; s=$(date +%s)
timeout ${CHAT_S:-150} python3 -m surogate train $CHAT --output-dir /tmp/c8a 2>&1 | tee $OUT/chat8k_rows.log | grep -Ei "token|cache|head|rror|warn" | head -n 12
echo "== took $(( $(date +%s) - s )) s; the same, head on every row"; s=$(date +%s)
timeout ${CHAT_S:-150} python3 -c "import sys; import surogate.training.steps as s; s.bound_head_rows = lambda *a: None; from surogate.training.cli import main; sys.exit(main(sys.argv[1:]))" train $CHAT --output-dir /tmp/c8b 2>&1 | tee $OUT/chat8k_every.log | grep -Ei "tokens/s|cache|rror" | head -n 6
echo "== took $(( $(date +%s) - s )) s"
[ "${1:-1}" = all ] && { echo "== total $(( $(date +%s) - t0 )) s"; exit 0; }
echo "== padded, grouped, 150 steps"
timeout 120 python3 -m surogate train --set sample_packing=false --set group_by_length=true --set max_steps=150 \
  --output-dir /tmp/pb 2>&1 | tee $OUT/padded.log | grep -Ei "cuda_graphs|bucket|tokens/s|padding|rror" | head -n 20
for g in auto false; do
  echo "== StableLM 8 x 512, padded, cuda_graphs=$g"
  timeout 100 python3 -m surogate train --set model=/tmp/slm --set sample_packing=false --set sequence_len=512 \
    --set per_device_train_batch_size=8 --set max_steps=60 --set cuda_graphs=$g --output-dir /tmp/slm-out-$g 2>&1 \
    | tee $OUT/stablelm_$g.log | grep -Ei "cuda_graphs|graph|tokens/s|rror|warn" | head -n 8
done
fi
echo "== total $(( $(date +%s) - t0 )) s"
