#!/usr/bin/env bash
# The whole pipeline on the built-in demo task (behind `make demo`): SFT -> reward model -> PPO, GRPO (demo grader;
# reward model), rejection sampling, distillation, DPO, SPIN (and its control: SFT continued on SPIN's gold
# answers), SteerLM, then one table grading every model the same way (examples/results.py). Every stage uses its defaults, which point at the demo task and at the previous stage's output; seeds are fixed.
# Run from the repository root with the project's Python on PATH (`make demo` does both).
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false
mkdir -p out
timings=out/timings.json
[ -f "$timings" ] || echo '{}' > "$timings"

stage() {  # stage NAME COMMAND...: run one stage, record its wall time in out/timings.json
  local name=$1; shift
  echo "=== $name: $* ==="
  local start=$SECONDS
  "$@"
  python - "$timings" "$name" $((SECONDS - start)) <<'PY'
import json, sys
path, name, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])
timings = json.load(open(path))
timings[name] = seconds
json.dump(timings, open(path, "w"), indent=2)
PY
}

stage sft python sft.py
stage reward_model python reward_model.py
stage ppo python ppo.py --eval-every 32
stage grpo python grpo.py --eval-every 32
# a learned reward needs a KL term (without one GRPO collapsed onto reward-model hacks: bench/results/grpo_experiments.md)
stage grpo_rm python grpo.py --reward-model-path out/reward_model --kl-coef 0.15 --kl-in reward --kl-estimator k1 --output-dir out/grpo_rm
stage rejection_sampling python rejection_sampling.py
# knowledge distillation into a 2-layer student (the demo base's first 2 of 4 layers), teacher = the GRPO policy
stage sft_student python sft.py --model-path demo:2 --output-dir out/sft_student
stage distill python distill.py
stage distill_offline python distill.py --mode offline --max-rows 9600 --output-dir out/distill_offline
stage dpo python dpo.py
stage spin python spin.py
# SPIN's control: SFT continued on the same 8192 gold answers, as many passes (2), the same learning rate and batch
stage spin_control python sft.py --model-path out/sft --max-rows 8192 --num-epochs 2 --learning-rate 1e-4 \
  --local-micro-batch-size 64 --gradient-accumulation-steps 2 --warmup-steps 2 --output-dir out/spin_control
stage steerlm python steerlm.py
python examples/results.py
