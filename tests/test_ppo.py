"""ppo.py: GAE, whitening, the clipped losses and the KL controller by hand; EOS handling; padding invariance;
a smoke run and a 2-process torchrun run."""

from __future__ import annotations

import json
import math

import pytest
import torch

import ppo
from conftest import run_script


def naive_gae(rewards, values, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, V past the end = 0."""
    T = len(rewards)
    v = list(values) + [0.0]
    deltas = [rewards[t] + gamma * v[t + 1] - v[t] for t in range(T)]
    return [sum((gamma * lam) ** k * deltas[t + k] for k in range(T - t)) for t in range(T)]


def test_gae_matches_the_definition_with_padding():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    lengths = [6, 4, 1]
    mask = torch.tensor([[1.0] * n + [0.0] * (6 - n) for n in lengths])
    adv, ret = ppo.compute_gae(rewards * mask, values, mask, gamma=0.9, lam=0.8)
    for b, n in enumerate(lengths):
        expected = naive_gae(rewards[b, :n].tolist(), values[b, :n].tolist(), 0.9, 0.8)
        assert adv[b, :n].tolist() == pytest.approx(expected, abs=1e-5)
        assert adv[b, n:].abs().sum() == 0  # nothing past the end
        assert ret[b, :n].tolist() == pytest.approx((adv[b, :n] + values[b, :n]).tolist(), abs=1e-6)


def test_gae_hand_value():
    """r = [0, 1], V = [0.5, 0.25], gamma = lam = 1: delta = [0 + 0.25 - 0.5, 1 - 0.25] = [-0.25, 0.75];
    A = [-0.25 + 0.75, 0.75] = [0.5, 0.75]."""
    adv, ret = ppo.compute_gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.25]]), torch.ones(1, 2), 1.0, 1.0)
    assert adv.tolist() == [[0.5, 0.75]] and ret.tolist() == [[1.0, 1.0]]


def test_masked_whitening():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    w = ppo.whiten(x, mask)
    kept = w[mask.bool()]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert kept.var(unbiased=True).item() == pytest.approx(1.0, abs=1e-4)
    assert w[~mask.bool()].abs().sum() == 0  # the outliers under the mask do not leak in
    ref = (x[mask.bool()] - x[mask.bool()].mean()) / x[mask.bool()].std()
    assert kept.tolist() == pytest.approx(ref.tolist(), abs=1e-4)
    shifted = ppo.whiten(x, mask, shift_mean=False)[mask.bool()]
    assert shifted.mean().item() == pytest.approx(x[mask.bool()].mean().item(), abs=1e-5)


def test_ppo_policy_loss_by_hand():
    """ratio = 1.5 on both tokens, eps = 0.2. A = +1: max(-1.5, -1.2) = -1.2 (clipped). A = -1: max(1.5, 1.2) =
    1.5 (unclipped). Mean loss (−1.2 + 1.5) / 2 = 0.15, clipfrac 1/2, approxkl = 0.5 log(1.5)^2."""
    new = torch.full((1, 2), math.log(1.5))
    loss, clipfrac, approxkl = ppo.ppo_policy_loss(
        new, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), 0.2
    )
    assert loss.item() == pytest.approx(0.15, abs=1e-6)
    assert clipfrac.item() == pytest.approx(0.5)
    assert approxkl.item() == pytest.approx(0.5 * math.log(1.5) ** 2, abs=1e-7)
    masked, _, _ = ppo.ppo_policy_loss(
        new, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.tensor([[1.0, 0.0]]), 0.2
    )
    assert masked.item() == pytest.approx(-1.2, abs=1e-6)  # the masked token does not count


def test_ppo_value_loss_by_hand():
    """V_old = 1, V = 2, R = 3, eps = 0.2: clipped V = 1.2; max((2-3)^2, (1.2-3)^2) = 3.24; loss 0.5 x 3.24."""
    loss, clipfrac = ppo.ppo_value_loss(
        torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.tensor([[3.0]]), torch.ones(1, 1), 0.2
    )
    assert loss.item() == pytest.approx(1.62, abs=1e-6) and clipfrac.item() == 1.0
    loss, clipfrac = ppo.ppo_value_loss(
        torch.tensor([[1.1]]), torch.tensor([[1.0]]), torch.tensor([[3.0]]), torch.ones(1, 1), 0.2
    )
    assert loss.item() == pytest.approx(0.5 * 1.9**2, abs=1e-6) and clipfrac.item() == 0.0


def test_truncate_after_eos_and_missing_eos_penalty():
    eos, pad = 2, 0
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    out, mask = ppo.truncate_after_eos(responses, eos, pad)
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True], [True, False, False, False]]
    scores = ppo.penalize_missing_eos(torch.tensor([1.0, 1.0, 1.0]), out, eos, 0.5)
    assert scores.tolist() == [1.0, 0.5, 1.0]  # only the response that never stopped pays
    assert ppo.penalize_missing_eos(torch.tensor([1.0, 1.0, 1.0]), out, eos, None).tolist() == [1.0, 1.0, 1.0]


def test_adaptive_kl_controller_update():
    """beta = 0.1, target 6, horizon 10000. KL = 12: error = clip(12/6 - 1, +-0.2) = 0.2, n = 64:
    beta x (1 + 0.2 x 64 / 10000) = 0.100128. KL = 5.4: error -0.1 -> x (1 - 0.1 x 64 / 10000)."""
    ctl = ppo.AdaptiveKLController(0.1, 6.0, 10000)
    ctl.update(12.0, 64)
    assert ctl.value == pytest.approx(0.100128, rel=1e-9)
    ctl.update(5.4, 64)
    assert ctl.value == pytest.approx(0.100128 * (1 - 0.1 * 64 / 10000), rel=1e-9)
    fixed = ppo.FixedKLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.value == 0.1


def test_response_logprobs_invariant_to_left_padding(demo_base, tokenizer):
    from common.models import load_causal_lm

    model = load_causal_lm(str(demo_base), torch.device("cpu")).eval()
    pad = tokenizer.pad_token_id
    query = torch.tensor([[1, 4, 40, 41, 42, 5]])
    response = torch.tensor([[50, 51, 52, 2, pad]])
    padded_query = torch.cat([torch.full((1, 3), pad), query], dim=1)
    with torch.no_grad():
        a, ent_a = ppo.response_logprobs(model, query, response, pad, 0.7, with_entropy=True)
        b, ent_b = ppo.response_logprobs(model, padded_query, response, pad, 0.7, with_entropy=True)
    assert a[0, 4] == 0  # padding carries no log-prob
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(ent_a[:, :4], ent_b[:, :4], atol=1e-5)


def test_per_token_values_and_pooled_score(demo_base, tokenizer):
    """values[:, t] = head output at position P-1+t (the state before response token t); the pooled score is
    the head output at the last non-pad token, whatever the padding."""
    from common.models import load_sequence_classifier

    model = load_sequence_classifier(
        str(demo_base), torch.device("cpu"), 1, pad_token_id=tokenizer.pad_token_id, init_head=True
    ).eval()
    pad = tokenizer.pad_token_id
    queries = torch.tensor([[pad, 1, 4, 40, 5], [1, 4, 40, 41, 5]])
    responses = torch.tensor([[50, 2, pad], [50, 51, 2]])
    with torch.no_grad():
        values, pooled = ppo.per_token_scores(model, queries, responses, pad)
        inputs = ppo.sequence_inputs(queries, responses, pad)
        hidden = model.model(**inputs).last_hidden_state
        head = model.score(hidden)[..., 0]  # (B, P+T)
    assert values.shape == (2, 3)
    assert torch.allclose(values, head[:, 4:7], atol=1e-5)
    assert torch.allclose(pooled, torch.stack([head[0, 6], head[1, 7]]), atol=1e-5)


@pytest.fixture(scope="module")
def tiny_stack(demo_base, tmp_path_factory):
    """A (random) policy and a (random-head) reward model, saved as the scripts expect them."""
    from common.models import load_sequence_classifier, load_tokenizer

    root = tmp_path_factory.mktemp("ppo_models")
    rm = load_sequence_classifier(
        str(demo_base), torch.device("cpu"), 1, pad_token_id=load_tokenizer(str(demo_base)).pad_token_id, init_head=True
    )
    rm.save_pretrained(root / "rm")
    load_tokenizer(str(demo_base)).save_pretrained(root / "rm")
    return demo_base, root / "rm"


PPO_SMALL = ["--total-episodes", "32", "--local-rollout-batch-size", "8", "--num-minibatches", "2", "--response-length", "12",
             "--demo-eval-prompts", "8", "--sample-every", "1", "--save-every", "2"]  # fmt: skip


def test_smoke_run(tiny_stack, tmp_path):
    policy, rm = tiny_stack
    out = tmp_path / "ppo"
    proc = run_script(
        "ppo.py", "--model-path", str(policy), "--reward-model-path", str(rm), "--output-dir", str(out), *PPO_SMALL
    )
    assert "KL to the reference" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "objective/kl" in r and "ppo/loss/policy_avg" in r]
    assert len(logged) == 4
    for key in ("objective/entropy", "objective/non_score_reward", "objective/rlhf_reward", "objective/scores",
                "ppo/policy/approxkl_avg", "ppo/policy/clipfrac_avg", "ppo/loss/value_avg", "ppo/val/clipfrac_avg",
                "ppo/val/num_eos_tokens", "ppo/lr", "perf/tokens_per_sec"):  # fmt: skip
        assert all(math.isfinite(r[key]) for r in logged), key
    result = json.loads((out / "eval.json").read_text())
    assert {"eval/score", "eval/accuracy", "objective/kl", "initial/eval/score"} <= set(result)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    AutoModelForCausalLM.from_pretrained(out)
    AutoModelForSequenceClassification.from_pretrained(out / "value_model")


def test_torchrun_two_processes_match_one(tiny_stack, tmp_path):
    """Same global batch (16 prompts, one minibatch): sampling keyed by prompt position, advantages whitened
    and losses averaged over the global batch, so 2 ranks x 8 prompts = 1 rank x 16 prompts."""
    policy, rm = tiny_stack
    args = ["--model-path", str(policy), "--reward-model-path", str(rm), "--total-episodes", "48", "--num-minibatches", "1",
            "--response-length", "10", "--demo-eval-prompts", "0", "--sample-every", "0", "--save-every", "0"]  # fmt: skip
    run_script("ppo.py", *args, "--output-dir", str(tmp_path / "one"), "--local-rollout-batch-size", "16")
    run_script("ppo.py", *args, "--output-dir", str(tmp_path / "two"), "--local-rollout-batch-size", "8", nproc=2)

    def series(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [
            [r[k] for k in ("ppo/loss/policy_avg", "ppo/loss/value_avg", "objective/kl", "objective/scores")]
            for r in rows
            if "ppo/lr" in r
        ]

    one, two = series(tmp_path / "one"), series(tmp_path / "two")
    assert len(one) == len(two) == 3, (one, two)  # 48 episodes / 16 prompts; zip alone would accept an empty log
    for a, b in zip(one, two, strict=True):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5)


def test_torchrun_two_processes(tiny_stack, tmp_path):
    policy, rm = tiny_stack
    out = tmp_path / "ppo2"
    run_script("ppo.py", "--model-path", str(policy), "--reward-model-path", str(rm), "--output-dir", str(out), *PPO_SMALL,
               "--local-rollout-batch-size", "4", nproc=2)  # fmt: skip
    state = json.loads((out / "trainer_state" / "COMPLETE").read_text())
    assert state == {"world_size": 2, "step": 4}  # 32 episodes / (2 ranks x 4 prompts) = 4 updates
    assert json.loads((out / "eval.json").read_text())["objective/kl"] >= 0
