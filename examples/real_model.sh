#!/usr/bin/env bash
# The PlainAlign pipeline on a real Hugging Face model and real dataset formats, on one node of 8 GPUs.
# Not run in CI (it needs GPUs and downloads). Paths and names are arguments; defaults are examples.
#
#   bash examples/real_model.sh [MODEL] [SFT_DATA] [PREFERENCE_DATA] [PROMPTS] [OUT]
#   bash examples/real_model.sh --dry-run [OUT]      # CPU, no downloads, ~2-4 minutes on 2 cores
#
# MODEL            a causal LM directory or hub id (e.g. Qwen/Qwen2.5-1.5B-Instruct); a base model without a chat
#                  template needs `--chat-template chatml|llama3|plain|FILE` on the SFT line (later stages read
#                  the template and the pad token that sft.py exports)
# SFT_DATA         messages or prompt/completion rows (e.g. a jsonl export of HuggingFaceH4/ultrachat_200k)
# PREFERENCE_DATA  prompt/chosen/rejected rows or Anthropic HH text (e.g. Anthropic/hh-rlhf)
# PROMPTS          {"prompt": ...} rows (or SFT rows, whose prompt part is used)
#
# --dry-run runs the same stages with the same flags, on one process instead of torchrun x 8, on a local
# random-initialised model of Qwen2.5-0.5B's shape (hidden 896, vocabulary 151,936, tied embeddings, its pad == EOS
# tokenizer and ChatML template with a default system prompt) and tiny datasets (SFT messages with a system turn,
# Anthropic-HH text pairs, prompts), all written into OUT/inputs by examples/make_dry_run_inputs.py; each stage's
# flags are followed by overrides (the last value of a flag wins) that shrink it to 2 steps of 2 short rows on the
# CPU, without wandb. tests/test_real_shapes.py runs it and checks every stage's output.
set -euo pipefail
cd "$(dirname "$0")/.."
SFT_DRY=() RM_DRY=() PPO_DRY=() DPO_DRY=()
if [[ "${1:-}" == "--dry-run" ]]; then
  OUT=${2:-out/real_dry_run}
  PY=${PYTHON:-python}
  $PY examples/make_dry_run_inputs.py "$OUT/inputs" --shape qwen
  MODEL=$OUT/inputs/model SFT_DATA=$OUT/inputs/sft.jsonl PREF_DATA=$OUT/inputs/preferences.jsonl
  PROMPTS=$OUT/inputs/prompts.jsonl RUN=$PY
  SIZE=(--gradient-accumulation-steps 1 --warmup-steps 0 --no-track --log-every 1)
  SFT_DRY=("${SIZE[@]}" --max-seq-len 128 --local-micro-batch-size 2 --total-steps 2 --eval-size 4 --save-every 0)
  RM_DRY=("${SIZE[@]}" --max-seq-len 128 --max-prompt-len 64 --local-micro-batch-size 2 --total-steps 2 --eval-size 4)
  PPO_DRY=("${SIZE[@]}" --max-prompt-len 64 --response-length 8 --local-rollout-batch-size 4 --total-episodes 8)
  DPO_DRY=("${SIZE[@]}" --max-seq-len 128 --max-prompt-len 64 --local-micro-batch-size 2 --total-steps 2 --eval-size 4)
else
  MODEL=${1:-Qwen/Qwen2.5-1.5B-Instruct}
  SFT_DATA=${2:-data/sft.jsonl}
  PREF_DATA=${3:-Anthropic/hh-rlhf}
  PROMPTS=${4:-data/prompts.jsonl}
  OUT=${5:-out/real}
  RUN="torchrun --nproc_per_node 8"
fi

# SFT: packed 4k-token rows, 8 ranks x 2 rows x 8 accumulation = 128 rows per step
$RUN sft.py --model-path "$MODEL" --data "$SFT_DATA" --output-dir "$OUT/sft" --max-seq-len 4096 --packing \
  --local-micro-batch-size 2 --gradient-accumulation-steps 8 --learning-rate 2e-5 --warmup-steps 100 \
  --activation-checkpointing --eval-size 1000 --save-every 200 --track "${SFT_DRY[@]}"

# Bradley-Terry reward model with reward centering
$RUN reward_model.py --model-path "$OUT/sft" --data "$PREF_DATA" --output-dir "$OUT/reward_model" \
  --max-seq-len 2048 --max-prompt-len 1536 --local-micro-batch-size 4 --gradient-accumulation-steps 4 \
  --learning-rate 5e-6 --center-rewards-coefficient 0.01 --skip-bad-rows --eval-size 2000 --track "${RM_DRY[@]}"

# PPO: 8 x 64 prompts per update, 2 minibatches x 4 micro-batches, adaptive KL
$RUN ppo.py --model-path "$OUT/sft" --reward-model-path "$OUT/reward_model" --data "$PROMPTS" \
  --output-dir "$OUT/ppo" --max-prompt-len 1024 --response-length 512 --temperature 1.0 \
  --local-rollout-batch-size 64 --num-minibatches 2 --gradient-accumulation-steps 4 --ppo-epochs 2 \
  --learning-rate 1e-6 --value-learning-rate 5e-6 --kl-estimator k3 --adaptive-kl --kl-target 6 \
  --total-episodes 200000 --missing-eos-penalty 1.0 --activation-checkpointing --demo-eval-prompts 0 --track \
  "${PPO_DRY[@]}"

# DPO with precomputed reference log-probs (no reference model held while training)
$RUN dpo.py --model-path "$OUT/sft" --data "$PREF_DATA" --output-dir "$OUT/dpo" --max-seq-len 2048 \
  --max-prompt-len 1536 --local-micro-batch-size 2 --gradient-accumulation-steps 8 --learning-rate 5e-7 \
  --beta 0.1 --precompute-ref-logprobs --activation-checkpointing --skip-bad-rows --demo-eval-prompts 0 --track \
  "${DPO_DRY[@]}"
