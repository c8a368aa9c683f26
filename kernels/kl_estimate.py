"""Per-token estimators of KL(p || q) from the log-probs of tokens sampled from p (plain PyTorch).

J. Schulman, "Approximating KL Divergence" (2020), http://joschu.net/blog/kl-approx.html.
"""

import torch

KINDS = ("k1", "k2", "k3")


def kl_estimate(logp, logq, kind):
    """Estimate KL(p || q) per token, where logp, logq (...) are log p(x), log q(x) at tokens x ~ p.

    With log r = logq - logp (r = q(x) / p(x)) and E[.] over x ~ p:
        k1 = -log r = logp - logq          E[k1] = KL exactly (unbiased); high variance, negative on some samples.
        k2 = (log r)^2 / 2                 biased: an f-divergence that agrees with KL to second order, so
                                           E[k2] = KL + O(|log r|^3) when p and q are close, and the bias grows
                                           as they move apart; never negative and of low variance. With the
                                           samples held fixed, E[d k2 / d theta] = d KL / d theta for p = p_theta.
        k3 = (r - 1) - log r               unbiased (E[r - 1] = sum_x q(x) - 1 = 0, so E[k3] = E[k1]); never
                                           negative (log r <= r - 1), and when p and q are close its variance is
                                           far below k1's, because r - 1 is a control variate that cancels most
                                           of the noise of -log r.
    k3 is computed as expm1(log r) - log r, exact for small log r where r - 1 would lose digits.

    Hand-worked example, p(x) = 1/2 and q(x) = 1/4 (log r = -log 2 = -0.693147):
        k1 = log 2 = 0.693147;  k2 = (log 2)^2 / 2 = 0.240227;  k3 = (1/2 - 1) + log 2 = 0.193147.
    Returns a tensor of the broadcast shape of logp and logq; raises ValueError for another kind.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown KL estimator kind {kind!r}; expected one of {KINDS}")
    log_ratio = logq - logp
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    return torch.expm1(log_ratio) - log_ratio
