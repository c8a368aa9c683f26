"""One GRPO update (rollout + rewards + policy epochs) of grpo.py against TRL's GRPOTrainer at identical settings.

Not a test: prints a markdown table. The twin of bench/ppo_step.py (same method, same helpers): both trainers run in
fresh child processes with the same thread settings, on the same weights, the same --batch-size prompts (every update
uses all of them, so the padded prompt length is the same on both sides), --num-generations completions per prompt,
response length, policy epochs, minibatches, temperature, KL coefficient, learning rate, and the same verifiable reward
function (`digit_fraction` below: both sides import it from this file):

    pip install --no-deps --target out/bench/trl-1.16.0 trl==1.16.0   # TRL for this benchmark only (see --trl-path)
    python bench/grpo_step.py                              # demo Llama (0.8M), 16 prompts x 8, 1 warm-up + 3 timed
    python bench/grpo_step.py --threads 1 --repeats 5      # CPU: one OpenMP thread per child, median of 5 runs a side
    python bench/grpo_step.py --size 0.5b --device cuda    # random-initialised Qwen2.5-0.5B-shaped Llama
    python bench/grpo_step.py --only trl                   # one side alone

TRL: GRPOTrainer is in every TRL release, but bench/requirements.txt pins trl==1.12.0 for bench/ppo_step.py (its
PPOTrainer is gone from 1.13). This benchmark compares against the current release, installed by itself into a
directory (--trl-path, default out/bench/trl-1.16.0) that this script puts first on sys.path and on the children's
PYTHONPATH; its dependencies are already satisfied by the project's pins, so `--no-deps` changes nothing else. Without
that directory the venv's trl is used, whatever its version (the header prints the version the children imported).

Models: ppo_step.build_models, in the same directory as bench/ppo_step.py (--model-dir, default
out/bench/ppo_step/<size>); GRPO uses the policy only (no reward model: the reward is a function).
  demo  the built-in tiny Llama (common.models.ensure_demo_base).
  0.5b  a random-initialised Llama with Qwen2.5-0.5B's shape (494M parameters) and the demo tokenizer.
Response length: the shared tokenizer's EOS is a token added for the benchmark, one id past the demo model's
vocabulary. TRL uses the model as saved, so it can never sample that id (with 0.5b: probability ~1/V per token); ours
grows the embeddings to the tokenizer's size as every script does (common.models.grow_embeddings: the new row is the
mean of the others), so it can, and some rows stop early (mean response length 30.6 of 32 in the demo runs). The work
is the same on both sides: a batch decodes until every row has stopped (32 steps here: some rows never stop) and both
train on the padded 32 columns, the tokens after an EOS masked out of the loss. TRL stops at the tokenizer's EOS and
the model's generation_config EOS, both that token.

Settings on both sides (defaults): 16 prompts x G=8 = 128 completions per update, response length 32, temperature 1.0,
top-p 1 / top-k off, 1 policy epoch over 1 minibatch (one optimizer step per update), clip 0.2, group-normalised
advantages (r - mean_group) / (std_group + eps), token-mean loss over the batch (TRL: loss_type="dapo", which with one
process and no accumulation is the sum over tokens / number of tokens), beta = --kl-coef 0.0 (then neither side loads a
reference model; > 0: both load one and add k3 x beta to the loss), learning rate 1e-6 constant, no gradient clipping,
seed 1, fp32 on CPU (bf16 autocast over fp32 weights on CUDA). With --num-minibatches M, TRL gets
per_device_train_batch_size = B*G/M and steps_per_generation = M (M optimizer steps per rollout, like ours), and
--ppo-epochs E becomes TRL's num_iterations = E.

What each column is (timed updates only: the first update is a warm-up, model loading is never timed):
  episodes/s       episode = one completion (prompt + sampled response, scored and trained on): timed updates x B x G
                   / wall time from the end of the warm-up update to the end of the last one. Ours: the "time" stamps
                   of metrics.jsonl (written at the end of every update); TRL: a TrainerCallback's on_step_end at the
                   last optimizer step of each update. Each side's bookkeeping in between is included.
  rollout tokens/s B x G x response length / rollout time.
  s / update       wall time per timed update; rollout / score / train: mean per-phase time per update.
    ours           grpo.py's own timers from metrics.jsonl: perf/time_rollout (common.generation.generate, its KV-cache
                   sampling loop, plus padding the batch), perf/time_score (decoding the completions, the reward
                   function, combining rewards, reference log-probs if beta > 0, old log-probs only if M > 1 or E > 1:
                   with one pass over one minibatch they are the current ones, detached), perf/time_train (the policy
                   epochs: log-prob + entropy forward, loss, backward, fused AdamW step); the advantages and the
                   logging fall between the timers and count only in episodes/s.
    TRL            no phase timers of its own that cover an update; the TRL child wraps three GRPOTrainer methods
                   (their code runs unchanged): rollout = end of the previous update to the end of `_generate` (the
                   dataloader's batch, chat-template tokenisation, `model.generate`, decoding, length metrics); score
                   = from there to the first `compute_loss` of the update (padding, reference log-probs if beta > 0,
                   old log-probs only if M > 1 or E > 1 -- TRL skips them when they equal the current ones --,
                   `_calculate_rewards` with the reward function, group advantages, metric bookkeeping, shuffling and
                   splitting of the batch); train = from there to on_step_end of the update's last optimizer step
                   (fused-LM-head log-prob + entropy forward, loss and its metrics, backward, AdamW step). On CUDA
                   every stamp synchronises.
  CPU s / update   the child's process CPU time (time.process_time, all threads) over the same timed updates: on a
                   shared machine it moves far less than wall time, so compare it with the wall-time ratio.
  peak memory      CPU: peak resident set size of the child (ru_maxrss from wait4; interpreter, imports and model
                   loading included). CUDA: torch.cuda.max_memory_allocated() in the child at exit.
Ours runs `python grpo.py <flags>` in-process under `python bench/grpo_step.py --child ours` (runpy), which only adds
the memory and CPU-time read-outs and turns grpo.py's final checkpoint write (after the timed updates) into a no-op;
TRL runs with save_strategy="no", logging_strategy="no", report_to=[] and no tqdm.
Differences that are the trainers' own and stay: decoding the completions counts as rollout in TRL and as scoring in
ours; ours samples with its own KV-cache loop and per-sample counter-based randomness, TRL with `model.generate`;
TRL's log-probs come from its fused LM head (the head applied to the completion positions in tiles), ours from the
LM head on the response positions and kernels.selective_logprob, with the pad token left out of the softmax as in
sampling; AdamW betas (ours 0.9/0.95, TRL 0.9/0.999; no effect on time); TRL's per-step metric bookkeeping
(.item() calls, completion and reward logs) runs even with logging off.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ppo_step import (  # noqa: E402  (needs ROOT on sys.path)
    build_models,
    child_env,
    cuda_peak,
    derived_memory,
    load_average,
    machine,
    mean,
    sync,
    tokenized_prompts,
    versions,
    write_prompts,
)

TRL_VERSION = "1.16.0"
TEMPERATURE = 1.0
CLIP = 0.2
SEED = 1
REWARD_FN = "bench.grpo_step:digit_fraction"  # --reward-fn of ours; TRL gets the same function object


def digit_fraction(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """The benchmark's verifiable reward: the fraction of a completion's characters that are digits (0 if empty).

    Cheap (microseconds for a batch) and with a spread inside every group of samples from a random model, so the
    group-normalised advantages are not all zero; both sides call exactly this function.
    """
    return [sum(ch.isdigit() for ch in text) / len(text) if text else 0.0 for text in completions]


def digit_fraction_trl(prompts, completions, **kwargs) -> list[float]:
    """`digit_fraction` behind TRL's calling convention: conversational datasets give each completion as a list of
    messages ([{"role": "assistant", "content": text}]) and extra keyword arguments (trainer_state, log_metric, ...)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return digit_fraction(prompts, texts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=("demo", "0.5b"), default="demo", help="model: demo (0.8M) or a random 0.5B")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per update (x --num-generations completions)")
    p.add_argument("--num-generations", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--response-length", type=int, default=32, help="tokens per response (fixed: no early EOS)")
    p.add_argument("--ppo-epochs", type=int, default=1, help="policy epochs per update (TRL: num_iterations)")
    p.add_argument("--num-minibatches", type=int, default=1, help="optimizer steps per epoch")
    p.add_argument("--kl-coef", type=float, default=0.0, help="beta; > 0 makes both sides load a reference model")
    p.add_argument("--learning-rate", type=float, default=1e-6)
    p.add_argument("--updates", type=int, default=3, help="timed updates, after one warm-up update")
    p.add_argument("--repeats", type=int, default=1, help="run each side this many times (alternating); median kept")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of the children (default: inherited)")
    p.add_argument("--only", choices=("ours", "trl"), default=None, help="run one side only")
    p.add_argument("--trl-path", default=None, help=f"directory holding trl (default out/bench/trl-{TRL_VERSION})")
    p.add_argument("--model-dir", default=None, help="models, shared with ppo_step (default out/bench/ppo_step/<size>)")
    p.add_argument("--work-dir", default=None, help="prompts and logs (default out/bench/grpo_step/<size>)")
    p.add_argument(
        "--output", default=None, help="markdown file (default bench/results/grpo_step_<device>[_<size>].md)"
    )
    p.add_argument(
        "--model-time",
        action="store_true",
        help="also time, on both sides, the policy's decoder stack (transformers' modeling code, the same on both "
        "sides) with and without autograd, and backward: where the update's time goes (adds hooks and, on CUDA, syncs)",
    )
    p.add_argument("--no-save", action="store_true", help="print only, write no results file")
    p.add_argument("--note", default="", help="a line added to the header (e.g. about the machine)")
    p.add_argument("--child", choices=("ours", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.num_generations < 2:
        p.error("--num-generations must be at least 2 (group-normalised advantages)")
    if args.batch_size * args.num_generations % args.num_minibatches:
        p.error(f"{args.batch_size} x {args.num_generations} completions do not split into {args.num_minibatches}")
    args.model_dir = Path(args.model_dir or ROOT / "out" / "bench" / "ppo_step" / args.size)
    args.work_dir = Path(args.work_dir or ROOT / "out" / "bench" / "grpo_step" / args.size)
    args.trl_path = Path(args.trl_path or ROOT / "out" / "bench" / f"trl-{TRL_VERSION}")
    return args


# ------------------------------------------------------------------------------------------------------- children


class ModelClock:
    """With --model-time: wall time per update inside the policy's decoder stack (`model.get_decoder()`: the
    transformer layers of transformers' modeling code, which both trainers run; not the LM head, the log-probs or the
    sampling, which are each side's own), split into calls without autograd (generation) and with it (the training
    forward), and inside `Tensor.backward` (the decoder's and the head's backward)."""

    def __init__(self, device: str):
        self.device, self.totals, self._start = device, {"decode_nograd": 0.0, "decode_grad": 0.0, "backward": 0.0}, 0.0
        self.attached = False

    def attach(self, model) -> None:
        """Hook `model`'s decoder and `Tensor.backward` (once: later calls do nothing)."""
        import torch

        if self.attached:
            return
        self.attached = True

        def pre(module, args, kwargs):
            sync(self.device)
            self._start = time.perf_counter()

        def post(module, args, kwargs, output):
            sync(self.device)
            key = "decode_grad" if torch.is_grad_enabled() else "decode_nograd"
            self.totals[key] += time.perf_counter() - self._start

        decoder = model.get_decoder()
        decoder.register_forward_pre_hook(pre, with_kwargs=True)
        decoder.register_forward_hook(post, with_kwargs=True)
        original_backward = torch.Tensor.backward

        def backward(tensor, *a, **k):
            sync(self.device)
            t0 = time.perf_counter()
            original_backward(tensor, *a, **k)
            sync(self.device)
            self.totals["backward"] += time.perf_counter() - t0

        torch.Tensor.backward = backward

    def take(self) -> dict:
        out = dict(self.totals)
        self.totals = dict.fromkeys(self.totals, 0.0)
        return out


def child_ours(spec: dict) -> None:
    """Run grpo.py's __main__ in this process (runpy) with spec["argv"]; at exit write threads, peak CUDA memory and
    the process CPU time at the end of every update (grpo.py calls tracker.log once per update)."""
    import atexit
    import runpy

    import torch

    from common import checkpoint, tracking

    cpu_stamps, model_times = [], []
    original_log = tracking.Tracker.log
    clock = ModelClock(spec["device"]) if spec["model_time"] else None

    def log(self, metrics, step, echo=True):
        if "perf/time_train" in metrics:
            cpu_stamps.append(time.process_time())
            if clock:
                model_times.append(clock.take())
        original_log(self, metrics, step, echo)

    tracking.Tracker.log = log
    if clock:  # the first model grpo.py loads is the policy (a reference, with --kl-coef > 0, comes after it)
        from common import models

        original_load = models.load_causal_lm

        def load_causal_lm(*a, **k):
            model = original_load(*a, **k)
            clock.attach(model)
            return model

        models.load_causal_lm = load_causal_lm

    def report():
        result = {"threads": torch.get_num_threads(), "cuda_peak": cuda_peak(spec["device"]), "cpu_stamps": cpu_stamps,
                  "model_times": model_times}  # fmt: skip
        Path(spec["result"]).write_text(json.dumps(result))

    atexit.register(report)
    # The final save comes after the timed updates; it is skipped so that it adds no peak memory (TRL saves nothing).
    checkpoint.save_trainer_state = lambda *a, **k: None
    checkpoint.export_pretrained = lambda *a, **k: None
    sys.argv = ["grpo.py", *spec["argv"]]
    runpy.run_path(str(ROOT / "grpo.py"), run_name="__main__")


def child_trl(spec: dict) -> None:
    """TRL's GRPOTrainer at grpo.py's settings; writes per-update phase times, threads and peak CUDA memory."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from common import data

    device, B, G = spec["device"], spec["batch_size"], spec["num_generations"]
    M, E = spec["num_minibatches"], spec["ppo_epochs"]
    tokenizer = AutoTokenizer.from_pretrained(spec["policy"], padding_side="left")
    # The prompts as messages (ours' parser), so that TRL applies the same chat template with a generation prompt.
    rows = data.parse_rows(data.load_rows(spec["prompts"]), data.parse_prompt, spec["prompts"]).records
    dataset = Dataset.from_dict({"prompt": [r["prompt"] for r in rows]})
    expected_prompt_ids = sorted(
        tuple(ids) for ids in tokenized_prompts(tokenizer, Path(spec["prompts"])) for _ in range(G)
    )

    config = GRPOConfig(
        output_dir=str(Path(spec["work_dir"]) / "trl_out"),
        seed=SEED,
        report_to=[],
        use_cpu=device == "cpu",
        bf16=device == "cuda",  # mixed precision like ours (autocast bf16 over fp32 weights) on CUDA; fp32 on CPU
        gradient_checkpointing=False,  # TRL's default is True; ours has none
        per_device_train_batch_size=B * G // M,
        gradient_accumulation_steps=1,
        steps_per_generation=M,  # generation batch = B x G completions, M optimizer steps on it per epoch
        num_iterations=E,
        num_generations=G,
        max_completion_length=spec["response_length"],
        temperature=TEMPERATURE,
        top_p=1.0,
        top_k=0,
        beta=spec["kl_coef"],
        epsilon=CLIP,
        loss_type="dapo",  # token mean over the batch (one process, no accumulation), like ours' token_mean
        scale_rewards="group",
        mask_truncated_completions=False,
        learning_rate=spec["learning_rate"],
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,  # no clipping (Trainer's default is 1.0); ours runs with --max-grad-norm 0
        max_steps=(1 + spec["updates"]) * M * E,
        use_vllm=False,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        log_completions=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    # Phase stamps (see the module docstring); TRL's code runs unchanged between them.
    updates, current = [], {}
    clock = ModelClock(device) if spec["model_time"] else None
    original_generate = GRPOTrainer._generate
    original_rewards = GRPOTrainer._calculate_rewards
    original_compute_loss = GRPOTrainer.compute_loss

    def timed_generate(self, prompts):
        out = original_generate(self, prompts)
        sync(device)
        current["rollout_end"] = time.perf_counter()
        prompt_ids, completion_ids = out[0], out[1]
        current["response_len"] = mean(len(ids) for ids in completion_ids)  # cut after EOS, if any
        if not updates and sorted(tuple(ids) for ids in prompt_ids) != expected_prompt_ids:
            raise RuntimeError("TRL tokenised the prompts differently from ours (common.data.tokenize_prompt)")
        return out

    def timed_rewards(self, *a, **k):
        t0 = time.perf_counter()
        rewards = original_rewards(self, *a, **k)
        current["reward_fn"] = time.perf_counter() - t0
        current["reward_mean"] = rewards.nanmean().item()
        return rewards

    def timed_compute_loss(self, *a, **k):
        if "train_start" not in current:
            sync(device)
            current["train_start"] = time.perf_counter()
        return original_compute_loss(self, *a, **k)

    GRPOTrainer._generate = timed_generate
    GRPOTrainer._calculate_rewards = timed_rewards
    GRPOTrainer.compute_loss = timed_compute_loss

    class Stamps(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            sync(device)
            current["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % (M * E):  # an optimizer step inside an update
                return
            sync(device)
            end = time.perf_counter()
            updates.append(
                {
                    **({"model_time": clock.take()} if clock else {}),
                    "end": end,
                    "cpu": time.process_time(),
                    "rollout": current["rollout_end"] - current["start"],
                    "score": current["train_start"] - current["rollout_end"],
                    "train": end - current["train_start"],
                    "reward_fn": current["reward_fn"],
                    "reward_mean": current["reward_mean"],
                    "response_len": current["response_len"],
                }
            )
            current.clear()
            current["start"] = end

    policy = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32, attn_implementation="sdpa")
    if clock:
        clock.attach(policy)
    trainer = GRPOTrainer(
        model=policy,  # with beta > 0 TRL loads the reference from the same directory (config._name_or_path)
        reward_funcs=[digit_fraction_trl],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Stamps()],
    )
    trainer.train()
    trl_dir = Path(trl.__file__).resolve().parent.parent
    result = {
        "updates": updates,
        "threads": torch.get_num_threads(),
        "cuda_peak": cuda_peak(device),
        "trl_version": trl.__version__,
        "trl_path": str(trl_dir.relative_to(ROOT) if trl_dir.is_relative_to(ROOT) else trl_dir),
        "ref_model": trainer.ref_model is not None,
    }
    Path(spec["result"]).write_text(json.dumps(result))


# -------------------------------------------------------------------------------------------------------- parent


def run_child(kind: str, spec: dict, env: dict, log_path: Path) -> dict:
    """Run one child to completion; returns its result JSON plus peak RSS (ru_maxrss of exactly this child)."""
    spec_path = Path(spec["result"]).with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--spec", str(spec_path)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise RuntimeError(f"{kind} child failed (exit {code}); log {log_path}:\n{tail}")
    result = json.loads(Path(spec["result"]).read_text())
    result["peak_rss"] = usage.ru_maxrss * 1024  # KiB on Linux
    return result


def ours_argv(args, policy_dir: Path, prompts: Path, out_dir: Path) -> list[str]:
    return [
        "--model-path", str(policy_dir),
        "--data", str(prompts),
        "--output-dir", str(out_dir),
        "--reward-fn", REWARD_FN,
        "--num-generations", str(args.num_generations),
        "--local-rollout-batch-size", str(args.batch_size),
        "--num-minibatches", str(args.num_minibatches),
        "--gradient-accumulation-steps", "1",
        "--ppo-epochs", str(args.ppo_epochs),
        "--response-length", str(args.response_length),
        "--total-episodes", str(args.batch_size * (1 + args.updates)),
        "--temperature", str(TEMPERATURE),
        "--top-k", "0",
        "--top-p", "1.0",
        "--kl-coef", str(args.kl_coef),
        "--kl-estimator", "k3",
        "--kl-in", "loss",
        "--clip-low", str(CLIP),
        "--clip-high", str(CLIP),
        "--scale-rewards", "group",
        "--learning-rate", str(args.learning_rate),
        "--lr-schedule", "constant",
        "--weight-decay", "0",
        "--max-grad-norm", "0",
        "--seed", str(SEED),
        "--demo-eval-prompts", "0",
        "--sample-every", "0",
        "--save-every", "0",
        "--advantage", "grpo",
        "--loss-agg", "token_mean",
    ]  # fmt: skip


def ours_command(args, policy_dir: Path, prompts: Path) -> str:
    rel = [p.relative_to(ROOT) if p.is_relative_to(ROOT) else p for p in (policy_dir, prompts)]
    return "python grpo.py " + " ".join(ours_argv(args, *rel, Path("<run dir>/ours_out")))


def summarize_ours(result: dict, out_dir: Path, args) -> dict:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "perf/time_train" in r]
    if len(rows) != 1 + args.updates:
        raise RuntimeError(f"ours: expected {1 + args.updates} update rows in metrics.jsonl, found {len(rows)}")
    timed = rows[1:]
    return {
        "wall": rows[-1]["time"] - rows[0]["time"],
        "cpu": result["cpu_stamps"][-1] - result["cpu_stamps"][0],
        "rollout": mean(r["perf/time_rollout"] for r in timed),
        "score": mean(r["perf/time_score"] for r in timed),
        "train": mean(r["perf/time_train"] for r in timed),
        "response_len": mean(r["grpo/response_length"] for r in timed),
        "reward_mean": mean(r["reward/mean"] for r in timed),
        "logged_rollout_tok_s": mean(r["perf/rollout_tokens_per_sec"] for r in timed),
        **model_time(result["model_times"][1:]),
        **result,
    }


def summarize_trl(result: dict, args) -> dict:
    ups = result["updates"]
    if len(ups) != 1 + args.updates:
        raise RuntimeError(f"trl: expected {1 + args.updates} updates, recorded {len(ups)}")
    timed = ups[1:]
    return {
        "wall": ups[-1]["end"] - ups[0]["end"],
        "cpu": ups[-1]["cpu"] - ups[0]["cpu"],
        "rollout": mean(u["rollout"] for u in timed),
        "score": mean(u["score"] for u in timed),
        "train": mean(u["train"] for u in timed),
        "response_len": mean(u["response_len"] for u in timed),
        "reward_mean": mean(u["reward_mean"] for u in timed),
        "reward_fn": mean(u["reward_fn"] for u in timed),
        **model_time([u["model_time"] for u in timed if "model_time" in u]),
        **result,
    }


def model_time(per_update: list[dict]) -> dict:
    """Mean --model-time seconds per timed update ({} without the flag)."""
    return {f"model_{k}": mean(u[k] for u in per_update) for k in per_update[0]} if per_update else {}


def derived(s: dict, args) -> dict:
    completions = args.batch_size * args.num_generations
    return {
        "eps": args.updates * completions / s["wall"],
        "rollout_tok_s": completions * args.response_length / s["rollout"],
        "s_per_update": s["wall"] / args.updates,
        "cpu_per_update": s["cpu"] / args.updates,
        "rollout": s["rollout"],
        "score": s["score"],
        "train": s["train"],
        "memory": derived_memory(s, args),
    }


COLUMNS = (
    ("eps", "episodes/s", "{:.1f}"),
    ("rollout_tok_s", "rollout tokens/s", "{:.0f}"),
    ("s_per_update", "s / update", "{:.3f}"),
    ("cpu_per_update", "CPU s / update", "{:.3f}"),
    ("rollout", "rollout s", "{:.3f}"),
    ("score", "reward + scoring s", "{:.3f}"),
    ("train", "train s", "{:.3f}"),
    ("memory", "peak memory MiB", "{:.0f}"),
)


def table(ours: dict | None, trl: dict | None, trl_name: str) -> str:
    lines = ["| | " + " | ".join(c[1] for c in COLUMNS) + " |", "| --- |" + " ---: |" * len(COLUMNS)]
    for name, row in (("ours (grpo.py)", ours), (trl_name, trl)):
        if row is not None:
            lines.append(f"| {name} | " + " | ".join(fmt.format(row[k]) for k, _, fmt in COLUMNS) + " |")
    if ours and trl:
        lines.append("| ratio ours / TRL | " + " | ".join(f"{ours[k] / trl[k]:.2f}x" for k, _, _ in COLUMNS) + " |")
    return "\n".join(lines)


def model_time_table(chosen: dict, trl_name: str) -> str:
    """--model-time: where each side's update goes (the median run's means per timed update, seconds)."""
    lines = [
        "Where an update's time goes (--model-time; seconds per update, the median run's means; the hooks' syncs and "
        "Python calls are included):",
        "",
        "| | s / update | decoder, no autograd (generation) | decoder, with autograd (training forward) | backward "
        "| decoder + backward | everything else |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for side, name in (("ours", "ours (grpo.py)"), ("trl", trl_name)):
        c = chosen.get(side)
        if c is None or "model_backward" not in c:
            continue
        per = c["derived"]["s_per_update"]
        model = c["model_decode_nograd"] + c["model_decode_grad"] + c["model_backward"]
        lines.append(
            f"| {name} | {per:.3f} | {c['model_decode_nograd']:.3f} | {c['model_decode_grad']:.3f} | "
            f"{c['model_backward']:.3f} | {model:.3f} | {per - model:.3f} |"
        )
    return "\n".join(lines)


def header(args, command: str, threads: str, load_start: str, grpo_cmd: str, trl_where: str | None) -> str:
    lines = [
        f"# GRPO step benchmark: ours (grpo.py) vs TRL ({args.size} model, {args.device})",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- command: `{command}`",
        f"- device: {machine(args.device)}; torch threads in the children: {threads}",
        f"- {versions()}" + (f"; the TRL child imported trl {trl_where}" if trl_where else ""),
        f"- code: {code_version()}",
        f"- load average at start (1, 5, 15 min): {load_start}; at the end: {load_average()}",
    ]
    # at the end the 1-minute load includes the benchmark's own child (about one per thread it runs)
    own = args.threads or os.cpu_count() or 1
    if float(load_start.split(",")[0]) > 0.5 or float(load_average().split(",")[0]) > own + 0.5:
        lines.append(
            "- **the machine was shared with other jobs while this ran** (load average above; at the end the "
            "benchmark's own child counts about 1 per thread): timings are noisy, re-run on a quiet machine before "
            "quoting them"
        )
    if args.note:
        lines.append(f"- note: {args.note}")
    precision = "bf16 autocast" if args.device == "cuda" else "fp32, use_cpu=True"
    memory = (
        "torch.cuda.max_memory_allocated() of the child"
        if args.device == "cuda"
        else "peak RSS of the child process (interpreter, imports and models included)"
    )
    completions = args.batch_size * args.num_generations
    lines.append(
        f"- settings: {args.batch_size} prompts x G={args.num_generations} = {completions} completions per update "
        f"(episode = completion), response length {args.response_length} (decoded in full on both sides; ours can "
        f"sample the EOS, so some of its rows end early: see the docstring), temperature "
        f"{TEMPERATURE}, {args.ppo_epochs} policy epoch(s), {args.num_minibatches} minibatch(es), beta "
        f"{args.kl_coef} ({'reference model loaded' if args.kl_coef > 0 else 'no reference model'}), learning rate "
        f"{args.learning_rate}, no gradient clipping, reward `digit_fraction` (bench/grpo_step.py) on both sides; "
        f"{args.updates} timed updates after 1 warm-up; {args.repeats} run(s) per side, alternating (times from each "
        "side's median run by episodes/s, memory its lowest peak)"
    )
    wrapper = "run under `bench/grpo_step.py --child ours`: memory and CPU-time read-outs, final save skipped"
    lines.append(f"- ours: `{grpo_cmd}` ({wrapper})")
    lines.append(
        f"- TRL: GRPOTrainer, per_device_train_batch_size={completions // args.num_minibatches}, "
        f"gradient_accumulation_steps=1, steps_per_generation={args.num_minibatches}, "
        f"num_iterations={args.ppo_epochs}, num_generations={args.num_generations}, "
        f"max_completion_length={args.response_length}, temperature={TEMPERATURE}, top_p=1, top_k=0, "
        f"beta={args.kl_coef}, epsilon={CLIP}, loss_type=dapo, scale_rewards=group, learning_rate={args.learning_rate} "
        f"constant, max_grad_norm=0, {precision}, gradient_checkpointing=False, use_vllm=False, report_to=[], "
        "logging_strategy=no, save_strategy=no, no tqdm"
    )
    lines.append(f"- memory: {memory}")
    return "\n".join(lines)


def code_version() -> str:
    """The commit and whether grpo.py differs from it: grpo.py changes while it is being optimised."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "grpo.py"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown (no git)"
    state = "grpo.py with uncommitted changes" if dirty.stdout.strip() else "grpo.py as committed"
    return f"commit {commit.stdout.strip() or 'unknown'}, {state}"


def save(args, report: str) -> None:
    """Print the report and write bench/results/grpo_step_<device>[_<size>].md (or --output)."""
    print()
    print(report)
    if args.no_save:
        return
    suffix = "" if args.size == "demo" else f"_{args.size.replace('.', '')}"
    path = Path(args.output or ROOT / "bench" / "results" / f"grpo_step_{args.device}{suffix}.md")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report)
    print(f"wrote {path}")


def main() -> None:
    args = parse_args()
    if args.child:  # the TRL child finds --trl-path through PYTHONPATH
        spec = json.loads(Path(args.spec).read_text())
        (child_ours if args.child == "ours" else child_trl)(spec)
        return
    if args.trl_path.is_dir():
        sys.path.insert(0, str(args.trl_path))  # before versions() imports trl

    load_start = load_average()
    command = shlex.join(["python", *sys.argv])
    args.work_dir.mkdir(parents=True, exist_ok=True)
    policy_dir, _ = build_models(args.size, args.model_dir)
    prompts = write_prompts(args.work_dir, args.batch_size)
    env = child_env(args)
    env["HF_HUB_OFFLINE"] = env["HF_HUB_DISABLE_TELEMETRY"] = "1"  # TRL's trainer sends telemetry at init
    if args.trl_path.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(args.trl_path), env.get("PYTHONPATH"))))
    if args.only != "trl" and not (ROOT / "grpo.py").exists():
        sys.exit("grpo.py does not exist yet: run with --only trl")

    sides = [s for s in ("ours", "trl") if args.only in (None, s)]
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(args.repeats):
        for side in sides if r % 2 == 0 else sides[::-1]:  # alternate the order: drift on a shared machine hits both
            run_dir = args.work_dir / f"{side}_{r}"
            run_dir.mkdir(parents=True, exist_ok=True)
            spec = {
                "result": str(run_dir / "result.json"),
                "device": args.device,
                "work_dir": str(run_dir),
                "policy": str(policy_dir),
                "prompts": str(prompts),
                "batch_size": args.batch_size,
                "num_generations": args.num_generations,
                "num_minibatches": args.num_minibatches,
                "ppo_epochs": args.ppo_epochs,
                "response_length": args.response_length,
                "kl_coef": args.kl_coef,
                "learning_rate": args.learning_rate,
                "updates": args.updates,
                "model_time": args.model_time,
                "argv": ours_argv(args, policy_dir, prompts, run_dir / "ours_out"),
            }
            t0 = time.time()
            result = run_child(side, spec, env, run_dir / "child.log")
            summary = (
                summarize_ours(result, run_dir / "ours_out", args) if side == "ours" else summarize_trl(result, args)
            )
            summary["derived"] = derived(summary, args)
            runs[side].append(summary)
            d = summary["derived"]
            print(f"[{side} run {r + 1}/{args.repeats}] {d['eps']:.1f} episodes/s, {d['s_per_update']:.3f} s/update, "
                  f"{d['cpu_per_update']:.3f} CPU s/update, peak {d['memory']:.0f} MiB, "
                  f"response length {summary['response_len']:.1f}, reward {summary['reward_mean']:.3f} "
                  f"({time.time() - t0:.0f} s with loading)", flush=True)  # fmt: skip
            if abs(summary["response_len"] - args.response_length) > 1e-6:
                length = summary["response_len"]
                print(f"  warning: {side} responses averaged {length:.2f} tokens, not {args.response_length}")

    # each side's median run by episodes/s (the best run only shows who got the quiet minute); memory: lowest peak
    chosen = {s: sorted(runs[s], key=lambda x: x["derived"]["eps"])[(len(runs[s]) - 1) // 2] for s in sides}
    threads = ", ".join(f"{s} {chosen[s]['threads']}" for s in sides)
    rows = {s: chosen[s]["derived"] | {"memory": min(x["derived"]["memory"] for x in runs[s])} for s in sides}
    ours, trl = rows.get("ours"), rows.get("trl")
    trl_name = f"TRL {chosen['trl']['trl_version']} GRPOTrainer" if trl else ""
    trl_where = f"{chosen['trl']['trl_version']} from {chosen['trl']['trl_path']}" if trl else None
    grpo_cmd = ours_command(args, policy_dir, prompts)
    text = [header(args, command, threads, load_start, grpo_cmd, trl_where), "", table(ours, trl, trl_name), ""]
    if ours and trl:
        speed, mem = ours["eps"] / trl["eps"], ours["memory"] / trl["memory"]
        met = speed >= 2.0 and mem <= 1.0
        text.append(
            f"Target (ours >= 2x TRL's end-to-end episodes/s at no more peak memory): {'met' if met else 'NOT met'} "
            f"({speed:.2f}x episodes/s, {mem:.2f}x peak memory; median runs)."
        )
    if ours and trl and args.repeats > 1:
        # runs r of the two sides ran back to back (ABBA order), so their ratio sees nearly the same machine state
        pair = sorted(o["derived"]["eps"] / t["derived"]["eps"] for o, t in zip(runs["ours"], runs["trl"]))
        eps = {s: [x["derived"]["eps"] for x in runs[s]] for s in sides}
        text.append(
            f"- episodes/s ratio of back-to-back run pairs: median {pair[(len(pair) - 1) // 2]:.2f}x, range "
            f"{pair[0]:.2f}x-{pair[-1]:.2f}x; best run vs best run {max(eps['ours']) / max(eps['trl']):.2f}x, "
            f"worst vs worst {min(eps['ours']) / min(eps['trl']):.2f}x"
        )
    for s in sides:
        eps = [x["derived"]["eps"] for x in runs[s]]
        cpu = ", ".join(f"{x['derived']['cpu_per_update']:.3f}" for x in runs[s])
        mem = ", ".join(f"{x['derived']['memory']:.0f}" for x in runs[s])
        text.append(
            f"- all {s} runs in order: episodes/s {', '.join(f'{e:.1f}' for e in eps)} (range {min(eps):.1f}-"
            f"{max(eps):.1f}); CPU s/update {cpu}; peak memory MiB {mem}"
        )
    if args.model_time:
        text += ["", model_time_table(chosen, trl_name)]
    if "ours" in chosen:
        c = chosen["ours"]
        text.append(
            f"- ours' own perf/rollout_tokens_per_sec (mean over timed updates): {c['logged_rollout_tok_s']:.0f}; "
            f"reward/mean {c['reward_mean']:.3f}"
        )
    if "trl" in chosen:
        c = chosen["trl"]
        text.append(
            f"- TRL: `_calculate_rewards` (the reward function and its bookkeeping) {c['reward_fn'] * 1e3:.1f} ms of "
            f"the scoring time per update; mean reward {c['reward_mean']:.3f}"
        )
    save(args, "\n".join(text) + "\n")


if __name__ == "__main__":
    main()
