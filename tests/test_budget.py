import math

import numpy as np
import pytest
import torch

from adaptive_vit import budget
from adaptive_vit.budget import (
    budget_curve,
    evaluate_thresholds,
    exit_assignment,
    msdnet_schedules,
    msdnet_thresholds,
    solve_accuracy,
    solve_budget,
)


def make_data(seed: int, n: int, k: int, ties: bool = False):
    """Random confidences, correctness that rises with confidence and depth, cumulative GFLOPs."""
    g = torch.Generator().manual_seed(seed)
    confidences = torch.rand(n, k, generator=g)
    skill = torch.linspace(0.3, 0.8, k)
    correct = torch.rand(n, k, generator=g) < 0.5 * skill + 0.5 * confidences
    if ties:
        confidences = (confidences * 10).round() / 10
    exit_gflops = (torch.rand(k, generator=g) + 0.5).cumsum(0).tolist()
    return confidences, correct, exit_gflops


def brute_force(confidences, correct, exit_gflops):
    """Right answers and mean GFLOPs of every setting of observed confidences (or inf) per exit."""
    n, k = confidences.shape
    grids = [torch.cat([confidences[:, e].unique(), torch.tensor([math.inf])]) for e in range(k - 1)]
    settings = torch.cartesian_prod(*grids).reshape(-1, k - 1)  # (C, K-1)
    exits = torch.full((len(settings), n), k - 1)
    for e in reversed(range(k - 1)):  # the earliest passing exit wins
        exits = torch.where(confidences[None, :, e] >= settings[:, None, e], e, exits)
    n_right = correct[torch.arange(n), exits].sum(1)  # (C,)
    cost = torch.tensor(exit_gflops, dtype=torch.float64)[exits].mean(1)  # (C,)
    return n_right, cost


def budgets_for(exit_gflops):
    lo, hi = exit_gflops[0], exit_gflops[-1]
    return [lo, lo + 0.1 * (hi - lo), lo + 0.35 * (hi - lo), lo + 0.6 * (hi - lo), lo + 0.85 * (hi - lo), hi]


def test_evaluate_thresholds_hand_computed():
    confidences = torch.tensor([[0.9, 0.95, 1.0], [0.5, 0.8, 1.0], [0.3, 0.6, 1.0], [0.7, 0.2, 1.0]])
    correct = torch.tensor([[1, 0, 0], [1, 0, 1], [0, 0, 1], [0, 1, 1]], dtype=torch.bool)
    # exits: 0 (0.9 >= 0.7), 1 (0.8 >= 0.75), 2, 0 (0.7 >= 0.7: ties exit)
    assert exit_assignment(confidences, [0.7, 0.75]).tolist() == [0, 1, 2, 0]
    result = evaluate_thresholds(confidences, correct, [1.0, 2.0, 4.0], [0.7, 0.75])
    assert result.accuracy == 0.5  # right, wrong, right, wrong
    assert result.gflops == pytest.approx((1 + 2 + 4 + 1) / 4)
    assert result.exit_fractions == [0.5, 0.25, 0.25]
    assert result.thresholds == pytest.approx([0.7, 0.75])
    assert result.to_dict() == {
        "thresholds": result.thresholds,
        "accuracy": 0.5,
        "gflops": result.gflops,
        "exit_fractions": [0.5, 0.25, 0.25],
    }


def test_threshold_zero_and_above_one():
    confidences, correct, exit_gflops = make_data(0, 50, 3)
    confidences[0, 0] = 1.0  # a saturated softmax still does not exit at a threshold above 1
    everyone_first = evaluate_thresholds(confidences, correct, exit_gflops, [0.0, 0.0])
    assert everyone_first.exit_fractions == [1.0, 0.0, 0.0]
    assert everyone_first.accuracy == correct[:, 0].sum().item() / 50
    assert everyone_first.gflops == pytest.approx(exit_gflops[0])
    everyone_last = evaluate_thresholds(confidences, correct, exit_gflops, [1.5, math.inf])
    assert everyone_last.exit_fractions == [0.0, 0.0, 1.0]
    assert everyone_last.accuracy == correct[:, 2].sum().item() / 50
    assert everyone_last.gflops == pytest.approx(exit_gflops[2])


@pytest.mark.parametrize(
    "seed, n, k, ties",
    [(0, 120, 2, False), (1, 200, 2, True), (2, 80, 3, False), (3, 150, 3, True), (4, 60, 3, False), (5, 40, 4, False)],
)
def test_solve_budget_matches_brute_force(seed, n, k, ties):
    confidences, correct, exit_gflops = make_data(seed, n, k, ties)
    n_right, cost = brute_force(confidences, correct, exit_gflops)
    for budget_gflops in budgets_for(exit_gflops):
        result = solve_budget(confidences, correct, exit_gflops, budget_gflops)
        feasible = cost <= budget_gflops * (1 + 1e-9)
        best = n_right[feasible].max()
        assert result.accuracy == best.item() / n
        assert result.gflops <= budget_gflops * (1 + 1e-9)
        assert result.gflops == pytest.approx(cost[feasible & (n_right == best)].min().item(), rel=1e-12)
        assert result.to_dict() == evaluate_thresholds(confidences, correct, exit_gflops, result.thresholds).to_dict()


@pytest.mark.parametrize("seed, n, k, ties", [(10, 120, 2, False), (11, 100, 3, True), (12, 70, 3, False)])
def test_solve_accuracy_matches_brute_force(seed, n, k, ties):
    confidences, correct, exit_gflops = make_data(seed, n, k, ties)
    n_right, cost = brute_force(confidences, correct, exit_gflops)
    reachable = n_right.max().item()
    for target in [0.0, 0.3, 0.5 * (reachable / n + 0.3), (reachable - 1) / n, reachable / n]:
        result = solve_accuracy(confidences, correct, exit_gflops, target)
        reaching = n_right >= math.ceil(target * n - 1e-9)
        cheapest = cost[reaching].min()
        assert result.accuracy >= target
        assert result.gflops == pytest.approx(cheapest.item(), rel=1e-12)
        assert result.accuracy == n_right[reaching & (cost <= cheapest * (1 + 1e-12))].max().item() / n


def test_solve_accuracy_ties_go_to_higher_accuracy():
    confidences, correct, _ = make_data(13, 90, 3)
    free = [1.0, 1.0, 1.0]  # every setting costs the same, so the most accurate must be returned
    best = brute_force(confidences, correct, free)[0].max().item()
    assert solve_accuracy(confidences, correct, free, 0.0).accuracy == best / 90


def test_quantile_grid_keeps_budget_and_bound(monkeypatch):
    confidences, correct, exit_gflops = make_data(20, 200, 3)
    n_right, cost = brute_force(confidences, correct, exit_gflops)
    monkeypatch.setattr(budget, "_MAX_PREFIX_CANDIDATES", 12)  # 11 quantiles of exit 0 + inf
    bound = math.ceil((200 - 1) / (12 - 2))  # images, see the module docstring
    gaps = 0
    for budget_gflops in budgets_for(exit_gflops):
        result = solve_budget(confidences, correct, exit_gflops, budget_gflops)
        best = n_right[cost <= budget_gflops * (1 + 1e-9)].max().item()
        assert result.gflops <= budget_gflops * (1 + 1e-9)
        assert best - bound <= result.accuracy * 200 <= best
        gaps += result.accuracy * 200 < best
    assert gaps > 0  # the grid is really coarser than exact here


def test_single_exit():
    confidences, correct, exit_gflops = make_data(30, 50, 1)
    result = solve_budget(confidences, correct, exit_gflops, exit_gflops[0])
    assert result.thresholds == [] and result.exit_fractions == [1.0]
    assert result.accuracy == correct.sum().item() / 50
    assert solve_accuracy(confidences, correct, exit_gflops, 0.0).thresholds == []
    with pytest.raises(ValueError, match="best reachable accuracy"):
        solve_accuracy(confidences, correct, exit_gflops, result.accuracy + 0.01)


def test_budget_below_cheapest_exit_raises():
    confidences, correct, _ = make_data(31, 50, 3)
    with pytest.raises(ValueError, match=r"budget_gflops=0.5 is below the cheapest possible cost, 1 GFLOPs"):
        solve_budget(confidences, correct, [1.0, 2.0, 3.0], 0.5)
    with pytest.raises(ValueError, match="below the cheapest MSDNet schedule"):
        msdnet_thresholds(confidences, correct, [1.0, 2.0, 3.0], 1.0)


def test_unreachable_accuracy_raises():
    confidences, correct, exit_gflops = make_data(32, 80, 3)
    best = brute_force(confidences, correct, exit_gflops)[0].max().item() / 80
    with pytest.raises(ValueError, match=rf"unreachable: the best reachable accuracy .* is {best:g}"):
        solve_accuracy(confidences, correct, exit_gflops, best + 1 / 160)


def test_budget_curve_monotone():
    confidences, correct, exit_gflops = make_data(40, 150, 3)
    curve = budget_curve(confidences, correct, exit_gflops, num=12)
    assert len(curve) == 12
    assert curve[0].exit_fractions[0] == 1.0  # at exit 0's cost everyone answers there
    assert curve[-1].accuracy == solve_budget(confidences, correct, exit_gflops, math.inf).accuracy
    budgets = torch.linspace(exit_gflops[0], exit_gflops[-1], 12, dtype=torch.float64).tolist()
    for previous, current, budget_gflops in zip(curve, curve[1:], budgets[1:]):
        assert current.accuracy >= previous.accuracy
        assert current.gflops <= budget_gflops * (1 + 1e-9)
    assert [r.gflops for r in budget_curve(confidences, correct, exit_gflops, budgets=[3.0, 2.0])] == [
        solve_budget(confidences, correct, exit_gflops, b).gflops for b in [3.0, 2.0]
    ]


def test_msdnet_schedules_follow_geometric_proportions():
    confidences, correct, exit_gflops = make_data(50, 101, 3)  # distinct confidences
    schedules = msdnet_schedules(confidences)
    assert len(schedules) == 59 and all(len(t) == 2 for t in schedules)
    for p, thresholds in zip(range(1, 60), schedules):
        weights = [(p / 20) ** e for e in (1, 2, 3)]
        counts = [math.floor(101 * w / sum(weights)) for w in weights[:2]]
        fractions = evaluate_thresholds(confidences, correct, exit_gflops, thresholds).exit_fractions
        assert fractions[:2] == [c / 101 for c in counts]


@pytest.mark.parametrize("seed, k", [(60, 2), (61, 3), (62, 3)])
def test_msdnet_never_beats_solver(seed, k):
    confidences, correct, exit_gflops = make_data(seed, 120, k)
    for budget_gflops in budgets_for(exit_gflops)[2:]:
        baseline = msdnet_thresholds(confidences, correct, exit_gflops, budget_gflops)
        solved = solve_budget(confidences, correct, exit_gflops, budget_gflops)
        assert baseline.gflops <= budget_gflops * (1 + 1e-9)
        assert baseline.accuracy <= solved.accuracy
        if baseline.accuracy == solved.accuracy:
            assert solved.gflops <= baseline.gflops * (1 + 1e-12)


def test_msdnet_strictly_worse_when_exit0_is_confidently_wrong():
    # Exit 0's confident half is wrong and the last exit is always right: the optimum sends everyone
    # to the last exit, but every MSDNet schedule sends >= N / (1 + 59/20) of the most confident out at exit 0.
    confidences = torch.stack([torch.linspace(0.01, 0.99, 100), torch.ones(100)], dim=1)
    correct = torch.stack([confidences[:, 0] < 0.5, torch.ones(100, dtype=torch.bool)], dim=1)
    solved = solve_budget(confidences, correct, [1.0, 2.0], 2.0)
    baseline = msdnet_thresholds(confidences, correct, [1.0, 2.0], 2.0)
    assert solved.accuracy == 1.0 and solved.exit_fractions == [0.0, 1.0]
    assert baseline.accuracy <= 0.75


def test_numpy_input_and_no_mutation():
    confidences, correct, exit_gflops = make_data(70, 60, 3)
    conf_np, correct_np = confidences.numpy().copy(), correct.numpy().copy()
    result = solve_budget(conf_np, correct_np, np.array(exit_gflops), exit_gflops[1])
    assert result == solve_budget(confidences, correct, exit_gflops, exit_gflops[1])
    np.testing.assert_array_equal(conf_np, confidences.numpy())
    np.testing.assert_array_equal(correct_np, correct.numpy())


def test_solve_accuracy_accepts_a_float32_target() -> None:
    """A target computed in float32 (7/21 → 0.33333334) is reachable by 7 correct images."""
    import torch

    from adaptive_vit.budget import solve_accuracy

    correct = torch.zeros(21, 2, dtype=torch.bool)
    correct[:7, 1] = True
    confidences = torch.rand(21, 2, generator=torch.Generator().manual_seed(0))
    target = float(correct[:, 1].float().mean())  # 0.3333333432674408 > 1/3
    result = solve_accuracy(confidences, correct, [1.0, 2.0], target)
    assert result.accuracy == pytest.approx(7 / 21)
