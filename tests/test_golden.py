"""First-step values of dpo.py, reward_model.py and ppo.py against numbers derived here without the scripts.

sft.py's golden losses (tests/test_sft.py) were produced by sft.py itself, so they catch a change but not a loss that
was wrong from the start. Here each script runs one step (one subprocess, the tiny demo model, four examples) and
what it logs for that step is compared with the same quantity computed in a few lines of plain PyTorch on the same
weights and token ids: log-softmax and gather for log-probabilities, the model's last hidden state and the score
head for rewards, a backwards loop for GAE. Nothing of the scripts (loss helpers, collation, padding, pooling) is
imported; the token ids come from the tokenizer's chat template as the data contract in docs/design.md says.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import run_script

# Four training pairs and one held-out pair (--eval-size 1); the global batch of 4 is the whole training set, so the
# first step's means do not depend on the data order.
PAIRS = [
    {"prompt": "What is 3 + 4?", "chosen": "7", "rejected": "The answer is 9, I think.", "margin": 0.5},
    {"prompt": "Reverse the word cat.", "chosen": "tac", "rejected": "cat", "margin": 1.0},
    {"prompt": "Sort: 5 2 8", "chosen": "2 5 8", "rejected": "Sure! Here you go: 8 5 2", "margin": 0.0},
    {"prompt": "Is 12 bigger than 7?", "chosen": "Yes.", "rejected": "No, 7 is bigger.", "margin": 2.0},
    {"prompt": "Count the letters in dog.", "chosen": "3", "rejected": "4"},
]
PROMPTS = [{"prompt": p["prompt"]} for p in PAIRS[:4]]
REL = 1e-4  # CPU fp32: a padded batch in the script, one unpadded sequence here
ONE_STEP = ["--total-steps", "1", "--log-every", "1", "--eval-every", "0", "--save-every", "0", "--eval-size", "1"]


def write_jsonl(rows, path):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def first_log(out) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if "train/loss" in r or "ppo/loss/value_avg" in r)


def approx(x):
    return pytest.approx(x, rel=REL, abs=1e-5)


@pytest.fixture(scope="module")
def models(demo_base, tmp_path_factory):
    """The demo base (policy), a reference = base + fixed noise, and a reward model (a sequence classifier with a
    fixed score head and stored score statistics) that the scripts load as they are."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tmp = tmp_path_factory.mktemp("golden")
    tok = AutoTokenizer.from_pretrained(demo_base)
    g = torch.Generator().manual_seed(11)
    ref = AutoModelForCausalLM.from_pretrained(demo_base, dtype=torch.float32)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    ref.save_pretrained(tmp / "ref")
    tok.save_pretrained(tmp / "ref")
    rm = AutoModelForSequenceClassification.from_pretrained(demo_base, num_labels=1, dtype=torch.float32)
    with torch.no_grad():
        rm.score.weight.copy_(torch.randn(rm.score.weight.shape, generator=g) * 0.5)
    rm.config.pad_token_id = tok.pad_token_id
    rm.config.plainalign_reward_model = True  # reward_model.py keeps this head; ppo.py reads the statistics
    rm.config.score_mean, rm.config.score_std = 0.25, 2.0
    rm.save_pretrained(tmp / "rm")
    tok.save_pretrained(tmp / "rm")
    data = {"pairs": write_jsonl(PAIRS, tmp / "pairs.jsonl"), "prompts": write_jsonl(PROMPTS, tmp / "prompts.jsonl")}
    return {"base": demo_base, "ref": tmp / "ref", "rm": tmp / "rm", "tokenizer": tok} | data


def ids(tok, messages, generation_prompt=False) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tok(text, add_special_tokens=False)["input_ids"]


def prompt_and_reply(tok, prompt: str, reply: str) -> tuple[list[int], list[int]]:
    """(prompt ids ending in the assistant header, the reply's ids after them: content, end-of-turn, newline)."""
    user = [{"role": "user", "content": prompt}]
    p = ids(tok, user, generation_prompt=True)
    full = ids(tok, user + [{"role": "assistant", "content": reply}])
    assert full[: len(p)] == p
    return p, full[len(p) :]


@torch.no_grad()
def reply_logprob(model, prompt: list[int], reply: list[int]) -> float:
    """sum_t log softmax(logits at position P-1+t)[reply_t] for one unpadded sequence."""
    logits = model(torch.tensor([prompt + reply])).logits[0].double()  # (P+T, V)
    logp = logits[len(prompt) - 1 : -1].log_softmax(-1)  # (T, V): position P-1+t predicts reply token t
    return logp.gather(-1, torch.tensor(reply)[:, None]).sum().item()


@torch.no_grad()
def head_outputs(rm, seq: list[int]) -> torch.Tensor:
    """The score head at every position of one unpadded sequence (L,): last hidden state @ w^T."""
    hidden = rm.model(torch.tensor([seq])).last_hidden_state[0]  # (L, H)
    return (hidden.double() @ rm.score.weight.double().T)[:, 0]


def test_dpo_first_step(models, tmp_path):
    """DPO with an NLL term (the defaults: sigmoid loss, beta 0.3, --sft-loss-weight 1), against a reference that is
    not the policy, so the log-ratios are not 0 at step 1:
        loss = mean_i [-log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r))) - pi_c / |y_c|]."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dpo"
    run_script("dpo.py", "--model-path", str(models["base"]), "--ref-model-path", str(models["ref"]),
               "--data", str(models["pairs"]), "--output-dir", str(out), "--local-micro-batch-size", "4",
               "--demo-eval-prompts", "0", *ONE_STEP)  # fmt: skip
    got = first_log(out)

    beta, tok = 0.3, models["tokenizer"]
    policy = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(models["ref"], dtype=torch.float32).eval()
    rows = []
    for pair in PAIRS[:4]:
        p, chosen = prompt_and_reply(tok, pair["prompt"], pair["chosen"])
        _, rejected = prompt_and_reply(tok, pair["prompt"], pair["rejected"])
        pc, pr = reply_logprob(policy, p, chosen), reply_logprob(policy, p, rejected)
        rc, rr = reply_logprob(ref, p, chosen), reply_logprob(ref, p, rejected)
        reward_c, reward_r = beta * (pc - rc), beta * (pr - rr)
        dpo = math.log1p(math.exp(-(reward_c - reward_r)))  # -log sigmoid(beta Delta)
        rows.append({"loss": dpo - pc / len(chosen), "rc": reward_c, "rr": reward_r, "pc": pc, "pr": pr,
                     "nll": -pc / len(chosen)})  # fmt: skip
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    assert abs(mean["rc"] - mean["rr"]) > 0.01  # the reference differs: the DPO term is not log 2 for every pair
    assert got["train/loss"] == approx(mean["loss"])
    assert got["rewards/chosen"] == approx(mean["rc"])
    assert got["rewards/rejected"] == approx(mean["rr"])
    assert got["rewards/margins"] == approx(mean["rc"] - mean["rr"])
    assert got["rewards/accuracies"] == sum(r["rc"] > r["rr"] for r in rows) / len(rows)
    assert got["logps/chosen"] == approx(mean["pc"])
    assert got["logps/rejected"] == approx(mean["pr"])
    assert got["train/sft_nll"] == approx(mean["nll"])


def test_reward_model_first_step(models, tmp_path):
    """Bradley-Terry with margins: loss = mean_i -log sigmoid(r_c - r_r - m), r = the score head on the last hidden
    state of the last token of prompt + reply through its end-of-turn token."""
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "rm"
    run_script("reward_model.py", "--model-path", str(models["rm"]), "--data", str(models["pairs"]),
               "--output-dir", str(out), "--local-micro-batch-size", "4", *ONE_STEP)  # fmt: skip
    got = first_log(out)

    tok = models["tokenizer"]
    rm = AutoModelForSequenceClassification.from_pretrained(models["rm"], dtype=torch.float32).eval()
    rows = []
    for pair in PAIRS[:4]:
        p, chosen = prompt_and_reply(tok, pair["prompt"], pair["chosen"])
        _, rejected = prompt_and_reply(tok, pair["prompt"], pair["rejected"])
        end = tok.eos_token_id
        r_c = head_outputs(rm, p + chosen[: chosen.index(end) + 1])[-1].item()
        r_r = head_outputs(rm, p + rejected[: rejected.index(end) + 1])[-1].item()
        rows.append({"loss": -F.logsigmoid(torch.tensor(r_c - r_r - pair["margin"])).item(), "rc": r_c, "rr": r_r})
    n = len(rows)
    assert got["train/loss"] == approx(sum(r["loss"] for r in rows) / n)
    assert got["train/margin"] == approx(sum(r["rc"] - r["rr"] for r in rows) / n)
    assert got["train/reward_mean"] == approx(sum(r["rc"] + r["rr"] for r in rows) / (2 * n))
    assert got["train/accuracy"] == sum(r["rc"] > r["rr"] for r in rows) / n


def test_ppo_first_update(models, tmp_path):
    """One PPO update (1 epoch, 1 minibatch) at temperature 1e-5, so the sampled replies are the greedy ones and
    can be generated here by argmax. The reference is the policy, so the KL is 0 and each reply's reward is its
    normalised score ((raw - 0.25) / 2, minus 1 without an end-of-turn) at its last token; the value model starts
    as the reward model. Before any update new == old values and log-probs, so
        value loss  = 0.5 mean_tokens (V - R)^2 = 0.5 mean_tokens A^2,  A from GAE(gamma 1, lambda 0.95)
        policy loss = -mean_tokens whiten(A) = 0."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    out = tmp_path / "ppo"
    run_script("ppo.py", "--model-path", str(models["base"]), "--reward-model-path", str(models["rm"]),
               "--data", str(models["prompts"]), "--output-dir", str(out), "--local-rollout-batch-size", "4",
               "--total-episodes", "4", "--num-minibatches", "1", "--ppo-epochs", "1", "--response-length", "5",
               "--temperature", "1e-5", "--demo-eval-prompts", "0", "--save-every", "0", "--sample-every", "0")  # fmt: skip
    got = first_log(out)

    tok = models["tokenizer"]
    end, lam = tok.eos_token_id, 0.95
    policy = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32).eval()
    rm = AutoModelForSequenceClassification.from_pretrained(models["rm"], dtype=torch.float32).eval()
    scores, raw_scores, sq_adv, tokens, with_eos = [], [], 0.0, 0, 0
    for row in PROMPTS:
        prompt = ids(tok, [{"role": "user", "content": row["prompt"]}], generation_prompt=True)
        reply = []
        with torch.no_grad():
            for _ in range(5):
                logits = policy(torch.tensor([prompt + reply])).logits[0, -1]
                logits[tok.pad_token_id] = float("-inf")  # padding is never sampled
                top2 = logits.topk(2).values
                assert top2[0] - top2[1] > 1e-3, "a near tie: the sample at temperature 1e-5 may not be the argmax"
                reply.append(int(logits.argmax()))
                if reply[-1] == end:
                    break
        heads = head_outputs(rm, prompt + reply)  # (P+T,)
        raw = heads[-1].item()
        score = (raw - 0.25) / 2.0 - (0.0 if reply[-1] == end else 1.0)
        values = heads[len(prompt) - 1 : -1].tolist()  # V_t: the state before reply token t
        advantage, t_len = 0.0, len(reply)
        for t in reversed(range(t_len)):
            next_value = values[t + 1] if t + 1 < t_len else 0.0
            delta = (score if t == t_len - 1 else 0.0) + next_value - values[t]
            advantage = delta + lam * advantage
            sq_adv += advantage**2
        raw_scores.append(raw)
        scores.append(score)
        tokens += t_len
        with_eos += reply[-1] == end
    n = len(PROMPTS)
    assert got["objective/raw_scores"] == approx(sum(raw_scores) / n)
    assert got["objective/scores"] == approx(sum(scores) / n)
    assert got["objective/rlhf_reward"] == approx(sum(scores) / n)
    assert got["objective/kl"] == 0.0 and got["objective/non_score_reward"] == 0.0
    assert got["ppo/val/response_length"] == tokens / n and got["ppo/val/num_eos_tokens"] == with_eos
    assert got["ppo/loss/value_avg"] == approx(0.5 * sq_adv / tokens)
    assert abs(got["ppo/loss/policy_avg"]) < 1e-5
