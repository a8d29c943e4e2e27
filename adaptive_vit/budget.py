"""Exit thresholds for multi-exit models (DVT, CF-ViT) under a GFLOPs budget.

Inputs, everywhere:
  confidences  (N, K) float: max softmax of exit k for image n.
  correct      (N, K) bool:  whether exit k's argmax is right for image n.
  exit_gflops  K floats:     CUMULATIVE GFLOPs to answer at exit k (non-decreasing).

An image answers at the first exit k < K-1 with confidences[n, k] >= thresholds[k]; the last exit
always answers. `thresholds` has K-1 entries: 0 sends everyone still running out at that exit,
anything above the largest confidence (the solvers use `math.inf`) means nobody exits there.

Any threshold is equivalent to an observed confidence value (or inf), so searching those candidates
is searching all thresholds. The search sweeps the threshold of exit K-2 exactly over all N+1 cut
points of its sorted confidences (vectorised cumulative sums) for every candidate setting of the
earlier exits, and keeps the cheapest candidate for each number of right answers (at most N+1), so
one search serves every budget (`solve_budget`, `budget_curve`) and accuracy target (`solve_accuracy`).

For K <= 3 the earlier exits are exit 0 alone, and its candidates are all its distinct observed
values while there are fewer than `_MAX_PREFIX_CANDIDATES` (2048), so the solvers are exact.
Beyond that (or for K > 3, whose K-2 earlier exits share the cap as a product grid of m values per
exit) the candidates of each earlier exit are m-1 quantiles of its confidences plus inf. Rounding
the optimal thresholds down to that grid only moves images to earlier, cheaper exits, so the budget
still holds, and it moves at most ceil((N-1)/(m-2)) images per exit (barring tied confidences):
the accuracy found is within (K-2) * ceil((N-1)/(m-2)) / N of the optimum (~0.05% for K=3, N=50k).

Budgets are compared with a relative tolerance of `_RTOL`, so a budget equal to a cost is met.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

_RTOL = 1e-9
# Accuracy targets often come from float32 means (7/21 → 0.33333334): compare counts with this
# slack, well under one image for any realistic data set size (0.05 images at N = 50,000).
_ACCURACY_TOL = 1e-6
_MAX_PREFIX_CANDIDATES = 2048  # candidate settings of the exits before K-2 (product over exits)
_MAX_CHUNK_ELEMENTS = 1 << 20  # bounds the (candidates, N+1) tables built at once (~200 MB peak)


@dataclasses.dataclass
class BudgetResult:
    """Thresholds and what they achieve on the data they were evaluated on.

    `exit_fractions[k]` is the fraction of images answering at exit k; `gflops` is the mean
    cumulative GFLOPs per image.
    """

    thresholds: list[float]
    accuracy: float
    gflops: float
    exit_fractions: list[float]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def exit_assignment(confidences: Any, thresholds: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Which exit answers each image: the first k < K-1 with confidence >= thresholds[k], else K-1.

    Args:
        confidences: (N, K) max softmax per exit.
        thresholds: K-1 thresholds.

    Returns:
        LongTensor (N,) of exit indices.
    """
    confidences = _as_confidences(confidences)
    thresholds = _as_thresholds(thresholds, confidences)
    return _first_exit(confidences[:, :-1], thresholds[None])[0]


def evaluate_thresholds(
    confidences: Any, correct: Any, exit_gflops: Sequence[float], thresholds: Sequence[float] | torch.Tensor
) -> BudgetResult:
    """Accuracy, mean GFLOPs and exit fractions of a threshold setting.

    Args:
        confidences: (N, K) max softmax per exit.
        correct: (N, K) whether each exit's prediction is right.
        exit_gflops: K cumulative GFLOPs to answer at each exit.
        thresholds: K-1 thresholds.
    """
    confidences, correct, gflops = _prepare(confidences, correct, exit_gflops)
    n, k = confidences.shape
    thresholds = _as_thresholds(thresholds, confidences)
    exits = _first_exit(confidences[:, :-1], thresholds[None])[0]  # (N,)
    counts = torch.bincount(exits, minlength=k)  # (K,)
    return BudgetResult(
        thresholds=thresholds.tolist(),
        accuracy=correct[torch.arange(n), exits].sum().item() / n,
        gflops=(counts.double() @ gflops).item() / n,
        exit_fractions=(counts.double() / n).tolist(),
    )


def solve_budget(confidences: Any, correct: Any, exit_gflops: Sequence[float], budget_gflops: float) -> BudgetResult:
    """Thresholds of highest accuracy with mean GFLOPs <= budget (ties: fewest GFLOPs).

    Exact for K <= 3 while exit 0 has fewer than 2048 distinct confidences; otherwise within the
    bound of the module docstring.

    Args:
        confidences: (N, K) max softmax per exit.
        correct: (N, K) whether each exit's prediction is right.
        exit_gflops: K cumulative GFLOPs to answer at each exit.
        budget_gflops: mean GFLOPs per image allowed.

    Raises:
        ValueError: if the budget is below exit_gflops[0], the cost of answering everything at once.
    """
    return budget_curve(confidences, correct, exit_gflops, budgets=[budget_gflops])[0]


def solve_accuracy(
    confidences: Any, correct: Any, exit_gflops: Sequence[float], target_accuracy: float
) -> BudgetResult:
    """Thresholds of fewest mean GFLOPs with accuracy >= target (ties: highest accuracy).

    Args:
        confidences: (N, K) max softmax per exit.
        correct: (N, K) whether each exit's prediction is right.
        exit_gflops: K cumulative GFLOPs to answer at each exit.
        target_accuracy: accuracy to reach, in [0, 1].

    Raises:
        ValueError: if no thresholds reach the target.
    """
    confidences, correct, gflops = _prepare(confidences, correct, exit_gflops)
    n = len(confidences)
    cost, thresholds = _frontier(confidences, correct, gflops)
    min_correct = max(0, math.ceil(target_accuracy * n - _ACCURACY_TOL * n))
    if min_correct > n or cost[min_correct:].isinf().all():
        best = cost.isfinite().nonzero().max().item()
        raise ValueError(
            f"target_accuracy={target_accuracy:g} is unreachable: the best reachable accuracy on these {n} "
            f"images is {best / n:g} (at {cost[best].item():g} GFLOPs); lower the target."
        )
    # Least cost over n_right >= min_correct; flipped so that ties go to the most right answers.
    chosen = n - cost[min_correct:].flip(0).argmin().item()
    return evaluate_thresholds(confidences, correct, gflops, thresholds[chosen])


def budget_curve(
    confidences: Any,
    correct: Any,
    exit_gflops: Sequence[float],
    budgets: Sequence[float] | None = None,
    num: int = 20,
) -> list[BudgetResult]:
    """`solve_budget` at each budget (one search for all); accuracy is non-decreasing in the budget.

    Args:
        confidences: (N, K) max softmax per exit.
        correct: (N, K) whether each exit's prediction is right.
        exit_gflops: K cumulative GFLOPs to answer at each exit.
        budgets: mean GFLOPs budgets; default `num` evenly spaced from exit_gflops[0] to exit_gflops[-1].
        num: number of default budgets.

    Raises:
        ValueError: if a budget is below exit_gflops[0], the cost of answering everything at once.
    """
    confidences, correct, gflops = _prepare(confidences, correct, exit_gflops)
    cheapest = gflops[0].item()
    if budgets is None:
        budgets = torch.linspace(cheapest, gflops[-1].item(), num, dtype=torch.float64).tolist()
    for budget_gflops in budgets:
        if not _within(cheapest, budget_gflops):
            raise ValueError(
                f"budget_gflops={budget_gflops:g} is below the cheapest possible cost, {cheapest:g} GFLOPs "
                "(every image answering at exit 0); raise the budget to at least that."
            )
    cost, thresholds = _frontier(confidences, correct, gflops)
    results = []
    for budget_gflops in budgets:
        # Most right answers within budget; the frontier already holds the least cost per count.
        chosen = (cost.isfinite() & _within(cost, budget_gflops)).nonzero().max().item()
        results.append(evaluate_thresholds(confidences, correct, gflops, thresholds[chosen]))
    return results


def msdnet_schedules(confidences: Any) -> list[list[float]]:
    """The 59 threshold settings of DVT's dynamic evaluation, MSDNet's procedure (the baseline).

    For p = 1..59 (DVT's range; MSDNet's own code stops at 39) and q = p/20, the fraction of images
    meant to exit at exit k is proportional to q^(k+1). As in MSDNet's `dynamic_eval_find_threshold`,
    exit k's threshold is the confidence of the floor(N * fraction_k)-th most confident image among
    those not yet exited (inf when that count is 0 or exceeds the images left; everyone at or above
    it exits, ties included); the last exit takes the rest. DVT's eval mode 2 reads them off
    training-set confidences and applies them to the validation set: pass the split that sets them.

    Args:
        confidences: (N, K) max softmax per exit.

    Returns:
        59 lists of K-1 thresholds.
    """
    confidences = _as_confidences(confidences)
    n, k = confidences.shape
    schedules = []
    for p in range(1, 60):
        weights = [(p / 20) ** (e + 1) for e in range(k)]
        thresholds = []
        exited = torch.zeros(n, dtype=torch.bool, device=confidences.device)
        for e in range(k - 1):
            count = math.floor(n * weights[e] / sum(weights))
            left = confidences[~exited, e].sort(descending=True).values
            threshold = left[count - 1].item() if 1 <= count <= len(left) else math.inf
            exited |= confidences[:, e] >= threshold
            thresholds.append(threshold)
        schedules.append(thresholds)
    return schedules


def msdnet_thresholds(
    confidences: Any, correct: Any, exit_gflops: Sequence[float], budget_gflops: float
) -> BudgetResult:
    """The most accurate of the `msdnet_schedules` within the budget (ties: fewest GFLOPs).

    Args:
        confidences: (N, K) max softmax per exit.
        correct: (N, K) whether each exit's prediction is right.
        exit_gflops: K cumulative GFLOPs to answer at each exit.
        budget_gflops: mean GFLOPs per image allowed.

    Raises:
        ValueError: if every schedule costs more than the budget.
    """
    results = [evaluate_thresholds(confidences, correct, exit_gflops, t) for t in msdnet_schedules(confidences)]
    within = [r for r in results if _within(r.gflops, budget_gflops)]
    if not within:
        cheapest = min(r.gflops for r in results)
        raise ValueError(
            f"budget_gflops={budget_gflops:g} is below the cheapest MSDNet schedule, {cheapest:g} GFLOPs; "
            "raise the budget to at least that."
        )
    return max(within, key=lambda r: (r.accuracy, -r.gflops))


# ----------------------------------------------------------------------------- internals


def _as_confidences(confidences: Any) -> torch.Tensor:
    confidences = torch.as_tensor(confidences)
    if not confidences.is_floating_point():
        confidences = confidences.float()
    if confidences.ndim != 2 or confidences.shape[0] == 0 or confidences.shape[1] == 0:
        raise ValueError(f"confidences must be (N, K) with N, K >= 1, got shape {tuple(confidences.shape)}")
    return confidences


def _as_thresholds(thresholds: Sequence[float] | torch.Tensor, confidences: torch.Tensor) -> torch.Tensor:
    # Same dtype as the confidences, as when comparing a tensor with Python floats at inference.
    thresholds = torch.as_tensor(thresholds, dtype=confidences.dtype, device=confidences.device).reshape(-1)
    if len(thresholds) != confidences.shape[1] - 1:
        raise ValueError(f"expected {confidences.shape[1] - 1} thresholds (K-1), got {len(thresholds)}")
    return thresholds


def _prepare(
    confidences: Any, correct: Any, exit_gflops: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    confidences = _as_confidences(confidences)
    correct = torch.as_tensor(correct, device=confidences.device).bool()
    gflops = torch.as_tensor(exit_gflops, dtype=torch.float64, device=confidences.device).reshape(-1)
    if correct.shape != confidences.shape:
        raise ValueError(f"correct has shape {tuple(correct.shape)}, confidences {tuple(confidences.shape)}")
    if len(gflops) != confidences.shape[1]:
        raise ValueError(f"expected {confidences.shape[1]} exit_gflops (one per exit), got {len(gflops)}")
    if (gflops.diff() < 0).any():
        raise ValueError(f"exit_gflops must be cumulative (non-decreasing), got {gflops.tolist()}")
    return confidences, correct, gflops


def _within(gflops: float | torch.Tensor, budget_gflops: float) -> bool | torch.Tensor:
    return gflops <= budget_gflops + _RTOL * abs(budget_gflops)


def _first_exit(confidences: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """(N, P) confidences, (C, P) thresholds -> (C, N) first exit passed, P if none."""
    passes = confidences[None] >= thresholds[:, None]  # (C, N, P)
    passes = torch.cat([passes, passes.new_ones(passes.shape[:2] + (1,))], dim=2)  # (C, N, P+1)
    return passes.byte().argmax(dim=2)  # first maximum


def _prefix_candidates(confidences: torch.Tensor) -> torch.Tensor:
    """(N, P) confidences of the exits before K-2 -> (C, P) candidate threshold settings."""
    n, p = confidences.shape
    if p == 0:
        return confidences.new_empty(1, 0)
    per_exit = max(3, math.floor(_MAX_PREFIX_CANDIDATES ** (1 / p) + 1e-9))
    inf = confidences.new_full((1,), math.inf)
    grids = []
    for e in range(p):
        values = confidences[:, e].unique()  # sorted
        if len(values) + 1 > per_exit:
            ordered = confidences[:, e].sort().values
            positions = torch.linspace(0, n - 1, per_exit - 1).round().long()
            values = ordered[positions].unique()
        grids.append(torch.cat([values, inf]))
    return torch.cartesian_prod(*grids).reshape(-1, p)


def _count_before_cuts(mask: torch.Tensor, cuts: torch.Tensor) -> torch.Tensor:
    """(c, N) bool, (J,) cut positions -> (c, J) number of True among the first `cut` columns."""
    counts = torch.cat([mask.new_zeros(len(mask), 1, dtype=torch.long), mask.cumsum(dim=1)], dim=1)
    return counts[:, cuts]  # (c, N+1) -> (c, J)


def _frontier(
    confidences: torch.Tensor, correct: torch.Tensor, gflops: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least mean GFLOPs over the candidate thresholds for each number of right answers.

    Returns:
        cost (N+1,) float64, inf where no candidate has exactly that many right answers, and
        thresholds (N+1, K-1) of a cheapest candidate with that many.
    """
    n, k = confidences.shape
    cost = gflops.new_full((n + 1,), math.inf)
    thresholds = confidences.new_full((n + 1, k - 1), math.nan)
    if k == 1:
        cost[correct.sum()] = gflops[0]
        return cost, thresholds
    swept, final = k - 2, k - 1  # exit whose threshold is swept exactly, and the last exit
    order = confidences[:, swept].argsort(descending=True, stable=True)
    sorted_conf = confidences[order, swept]  # (N,) descending
    # Cut j: the j most confident images still running answer at exit `swept`. Cuts splitting tied
    # confidences are no threshold's; the others are every threshold's.
    cut_valid = torch.ones(n + 1, dtype=torch.bool, device=confidences.device)
    cut_valid[1:n] = sorted_conf[:-1] > sorted_conf[1:]
    cuts = cut_valid.nonzero()[:, 0]  # (J,)
    cut_thresholds = torch.cat([sorted_conf.new_full((1,), math.inf), sorted_conf])[cuts]  # (J,)
    right_swept, right_final = correct[order, swept], correct[order, final]  # (N,)
    correct_prefix = torch.cat([correct[:, :swept], correct.new_zeros(n, 1)], dim=1)  # (N, K-1)

    candidates = _prefix_candidates(confidences[:, :swept])  # (C, K-2)
    for prefix in candidates.split(max(1, _MAX_CHUNK_ELEMENTS // ((n + 1) * max(1, swept)))):
        exits = _first_exit(confidences[:, :swept], prefix)  # (c, N), `swept` = still running
        prefix_counts = (exits[:, :, None] == torch.arange(swept, device=exits.device)).sum(dim=1)  # (c, K-2)
        prefix_cost = prefix_counts.double() @ gflops[:swept]  # (c,)
        prefix_right = correct_prefix[torch.arange(n), exits].sum(dim=1)  # (c,)
        running = (exits == swept)[:, order]  # (c, N) in swept order

        n_swept = _count_before_cuts(running, cuts)  # (c, J)
        n_final = running.sum(dim=1, keepdim=True) - n_swept
        right_final_left = (running & right_final).sum(dim=1, keepdim=True) - _count_before_cuts(
            running & right_final, cuts
        )
        n_right = prefix_right[:, None] + _count_before_cuts(running & right_swept, cuts) + right_final_left
        n_right = n_right.flatten()  # (c*J,)
        chunk_cost = ((prefix_cost[:, None] + n_swept * gflops[swept] + n_final * gflops[final]) / n).flatten()

        least = cost.new_full((n + 1,), math.inf).scatter_reduce(0, n_right, chunk_cost, "amin")
        better = least < cost
        if better.any():
            at_least = chunk_cost == least[n_right]
            first = n_right.new_full((n + 1,), len(n_right)).scatter_reduce(
                0, n_right[at_least], at_least.nonzero()[:, 0], "amin"
            )[better]
            rows, cols = first // len(cuts), first % len(cuts)
            cost[better] = least[better]
            thresholds[better] = torch.cat([prefix[rows], cut_thresholds[cols, None]], dim=1)
    return cost, thresholds
