"""bf16 mixed precision on CPU (`--mixed-precision bf16`): the path that runs on GPUs, checked where there is none.

Tolerance. bf16 keeps 8 significand bits (7 stored + the implicit one), so one rounding moves a value by at most
u = 2**-8 of itself. Autocast rounds the inputs of every matmul (weights and activations) to bf16 and accumulates
in fp32; log-probs and losses are then taken in fp32 (`kernels.selective_logprob`, the scripts' `.float()`). A
first-step loss is a mean over many tokens, whose independent rounding errors mostly cancel; what remains is at
most a few roundings of the result: the value loss squares rounded values (2u), plus one rounding of the logits and
one of slack. So RTOL = 4u = 2**-6 (1.6%)
relative. bf16 not applied (autocast off, or FSDP2 without its MixedPrecisionPolicy) gives results *equal* to fp32,
or within fp32 reduction-order noise for 2 processes (5e-8 measured): the difference must exceed MIN_REL = 2**-20.
Both failures were checked by disabling each path. An extra rounding of a result (e.g. a loss summed in bf16) stays
within RTOL by design; a precision bug that costs more than a few roundings does not.
Measured (this file, demo model, relative differences): SFT loss 3.2e-5 and grad norm 5.4e-4; SFT on 2 processes
(FSDP2 policy) 1.6e-5 and 3.6e-5; DPO loss and log-probs 5e-5; PPO value loss 2.6e-3.
"""

from __future__ import annotations

import json

import pytest
import torch

from common import demo_task
from common.dist import Dist, autocast, init_distributed
from conftest import run_script

U = 2.0**-8  # bf16 unit roundoff
RTOL = 4 * U
MIN_REL = 2.0**-20  # below this, bf16 was not applied
CPU = torch.device("cpu")
FP32 = Dist(rank=0, world_size=1, local_rank=0, device=CPU, mixed_precision=False)
BF16 = Dist(rank=0, world_size=1, local_rank=0, device=CPU, mixed_precision=True)


def assert_bf16_close(bf16: float, fp32: float, what: str) -> None:
    rel = abs(bf16 - fp32) / max(abs(fp32), 1e-6)
    assert MIN_REL < rel <= RTOL, f"{what}: bf16 {bf16!r} vs fp32 {fp32!r}, relative difference {rel:.3g}"


def first_logged(out) -> dict:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


def test_flag_resolves_and_autocast_follows_it(demo_base):
    """auto = off on CPU (bf16 on CUDA), bf16 = on even on CPU, off = fp32; the logits under autocast are bf16."""
    from common.models import load_causal_lm

    assert [init_distributed(p).bf16 for p in ("auto", "bf16", "off")] == [False, True, False]
    assert Dist(0, 1, 0, torch.device("cuda")).bf16 and not Dist(0, 1, 0, CPU).bf16  # constructed directly: auto
    with pytest.raises(ValueError, match=r"^--mixed-precision 'fp16': use auto, bf16 or off$"):
        init_distributed("fp16")
    model = load_causal_lm(str(demo_base), CPU)
    ids = torch.tensor([[1, 5, 9, 12]])
    with autocast(BF16):
        assert model(input_ids=ids).logits.dtype == torch.bfloat16
    with autocast(FP32):
        assert model(input_ids=ids).logits.dtype == torch.float32
    assert next(model.parameters()).dtype == torch.float32  # master weights stay fp32


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16data")
    return {
        "sft": str(demo_task.write_jsonl(demo_task.sft_rows(seed=3, n=40), root / "sft.jsonl")),
        "pref": str(demo_task.write_jsonl(demo_task.preference_rows(seed=4, n=40), root / "pref.jsonl")),
    }


ONE_STEP = ["--total-steps", "1", "--log-every", "1", "--eval-every", "0", "--save-every", "0", "--demo-eval-prompts", "0",
            "--eval-size", "8", "--local-micro-batch-size", "16", "--warmup-steps", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def sft_runs(demo_base, files, tmp_path_factory) -> dict:
    """sft.py, one step, one process, with --mixed-precision bf16 and off: the first logged metrics of each."""
    runs = {}
    for precision in ("bf16", "off"):
        out = tmp_path_factory.mktemp(f"sft_{precision}")
        run_script("sft.py", "--model-path", str(demo_base), "--data", files["sft"], "--output-dir", str(out),
                   "--mixed-precision", precision, *ONE_STEP)  # fmt: skip
        runs[precision] = first_logged(out)
    return runs


def test_sft_first_step_loss(sft_runs):
    """The first loss and its gradient norm within RTOL of fp32, and not equal to them."""
    for key in ("train/loss", "train/grad_norm"):
        assert_bf16_close(sft_runs["bf16"][key], sft_runs["off"][key], f"sft {key}")


def test_sft_torchrun_two_processes_bf16(demo_base, files, sft_runs, tmp_path):
    """2 processes (gloo): FSDP2's MixedPrecisionPolicy (bf16 parameters and activations in forward and backward,
    fp32 gradient reduction) instead of autocast; the same global batch of 16 in 2 x 8."""
    run_script("sft.py", "--model-path", str(demo_base), "--data", files["sft"], "--output-dir", str(tmp_path),
               "--mixed-precision", "bf16", *ONE_STEP, "--local-micro-batch-size", "8", nproc=2)  # fmt: skip
    got = first_logged(tmp_path)
    for key in ("train/loss", "train/grad_norm"):
        assert_bf16_close(got[key], sft_runs["off"][key], f"sft, 2 processes, {key}")


def test_dpo_first_step_logps(demo_base, files, tmp_path):
    """dpo.py, one step, bf16 vs off: the loss and the log-probs of the first step within RTOL."""
    runs = {}
    for precision in ("bf16", "off"):
        out = tmp_path / precision
        run_script("dpo.py", "--model-path", str(demo_base), "--data", files["pref"], "--output-dir", str(out),
                   "--mixed-precision", precision, *ONE_STEP)  # fmt: skip
        runs[precision] = first_logged(out)
    for key in ("train/loss", "logps/chosen", "logps/rejected"):
        assert_bf16_close(runs["bf16"][key], runs["off"][key], f"dpo {key}")


def test_ppo_first_minibatch_losses(demo_base, tokenizer):
    """ppo.py's steps 2-5 on one fixed rollout (sampling would let the two precisions draw different tokens): old
    log-probs and values, GAE, whitened advantages, then the first minibatch's policy and value losses, each
    precision through `autocast(dist)` as the script does. Policy loss at ratio 1 is -mean(advantages), which
    depends on the values; the value loss on values and returns."""
    import ppo
    from common.generation import response_logprobs
    from common.models import load_causal_lm, load_sequence_classifier

    policy = load_causal_lm(str(demo_base), CPU)
    value_model = load_sequence_classifier(str(demo_base), CPU, 1, pad_token_id=tokenizer.pad_token_id, init_head=True)
    pad = tokenizer.pad_token_id
    g = torch.Generator().manual_seed(0)
    prompts = [row["prompt"] for row in demo_task.prompt_rows(seed=5, n=8)]
    from common import data

    queries = data.pad([data.render(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True)
                        for p in prompts], pad, side="left")  # fmt: skip
    responses = torch.randint(10, len(tokenizer), (len(prompts), 10), generator=g)  # (B, T)
    mask = torch.ones_like(responses, dtype=torch.float32)
    scores = torch.randn(len(prompts), generator=g)

    def first_losses(dist):
        with torch.no_grad(), autocast(dist):
            old_logprobs = response_logprobs(policy, queries, responses, pad, 0.7).float()
            old_values = ppo.per_token_scores(value_model, queries, responses, pad)[0]
        token_rewards = torch.zeros_like(mask)
        token_rewards[:, -1] += scores
        advantages, returns = ppo.compute_gae(token_rewards, old_values, mask, 1.0, 0.95)
        advantages = ppo.whiten(advantages, mask)
        with autocast(dist):
            new_logprobs = response_logprobs(policy, queries, responses, pad, 0.7)
            new_values, _ = ppo.per_token_scores(value_model, queries, responses, pad)
        pg_loss, _, _ = ppo.ppo_policy_loss(new_logprobs, old_logprobs, advantages, mask, 0.2)
        vf_loss, _ = ppo.ppo_value_loss(new_values, old_values, returns, mask, 0.2)
        return pg_loss.item(), vf_loss.item(), old_values

    pg16, vf16, values16 = first_losses(BF16)
    pg32, vf32, values32 = first_losses(FP32)
    assert values16.dtype == values32.dtype == torch.float32 and not torch.equal(values16, values32)
    assert_bf16_close(vf16, vf32, "ppo value loss")
    # the policy loss is a mean of whitened advantages (~0 by construction): compared against their scale, 1
    assert abs(pg16 - pg32) <= RTOL, (pg16, pg32)
