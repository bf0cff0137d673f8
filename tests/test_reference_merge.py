"""The numpy references themselves, checked on cases small enough to compute by hand (and on PEFT).

If a reference were wrong, every parity test built on it would be meaningless, so each formula of
`reference_merge` is pinned here to values worked out on paper in the comments.
"""

from __future__ import annotations

import numpy as np
import pytest

import reference_merge as ref

ZERO4 = np.zeros(4)
D1 = np.array([1.0, -2.0, 3.0, 0.5])
D2 = np.array([-3.0, 1.0, 2.0, -0.5])


def test_keep_count_is_floor_like_int() -> None:
    assert ref.keep_count(0.8, 5) == 4
    assert ref.keep_count(0.29, 100) == 28  # 0.29 * 100 = 28.999999999999996 in float64, as in mergekit/PEFT
    assert ref.keep_count(0.5, 1) == 0
    assert ref.keep_count(1.0, 7) == 7


def test_topk_mask_breaks_ties_by_lowest_index() -> None:
    x = np.array([1.0, -2.0, 2.0, 2.0, 0.5])
    assert ref.topk_mask(x, 2).tolist() == [False, True, True, False, False]
    assert ref.threshold_ties(x, 2).tolist() == [False, True, True, True, False]
    assert not ref.threshold_ties(x, 4).any()  # the cut falls between 1.0 and 0.5
    assert not ref.threshold_ties(x, 0).any() and not ref.threshold_ties(x, 5).any()


def test_trim() -> None:
    # k = int(0.5 * 4) = 2: keep 3 and -2 of D1; -3 and 2 of D2
    assert ref.trim(D1, 0.5).tolist() == [0.0, -2.0, 3.0, 0.0]
    assert ref.trim(D2, 0.5).tolist() == [-3.0, 0.0, 2.0, 0.0]
    assert ref.trim(D1, 0.2).tolist() == [0.0, 0.0, 0.0, 0.0]  # k = 0
    assert ref.trim(D1, 1.0).tolist() == D1.tolist()


def test_mergekit_unweighted() -> None:
    # trimmed: t1 = [0,-2,3,0], t2 = [-3,0,2,0]; sum = [-3,-2,5,0] -> gamma = [-,-,+,+]
    # agree1 = [F,T,T,F], agree2 = [T,F,T,F]; numerator [-3,-2,5,0]; divisor [1,1,2,0->1]
    out = ref.mergekit_ties(ZERO4, [D1, D2], 0.5)
    assert out.tolist() == [-3.0, -2.0, 2.5, 0.0]


def test_mergekit_weighted_divides_by_agreeing_weights_and_scales() -> None:
    # weights [2,1]: t1 = [0,-4,6,0], t2 = [-3,0,2,0]; numerator [-3,-4,8,0], divisor [1,2,3,1]
    out = ref.mergekit_ties(np.ones(4), [D1, D2], 0.5, weights=[2.0, 1.0], lambda_=0.5)
    np.testing.assert_allclose(out, 1.0 + 0.5 * np.array([-3.0, -2.0, 8.0 / 3.0, 0.0]), rtol=0, atol=1e-15)


def test_peft_weights_after_the_sign_and_divides_by_count() -> None:
    # gamma from unweighted [-3,-2,5,0]; numerator sum w*t*agree = [-3,-4,6+2,0]; count [1,1,2,1]
    out = ref.peft_ties(ZERO4, [D1, D2], 0.5, weights=[2.0, 1.0])
    assert out.tolist() == [-3.0, -4.0, 4.0, 0.0]


def test_weighting_can_flip_the_elected_sign_in_mergekit_but_not_peft() -> None:
    d1, d2 = np.array([1.0]), np.array([-1.5])
    # mergekit: weighted sum 2 - 1.5 > 0 -> +, only model 1 agrees: 2 / 2 = 1
    assert ref.mergekit_ties(np.zeros(1), [d1, d2], 1.0, weights=[2.0, 1.0]).tolist() == [1.0]
    # peft: unweighted sum 1 - 1.5 < 0 -> -, only model 2 agrees: 1 * -1.5 / 1
    assert ref.peft_ties(np.zeros(1), [d1, d2], 1.0, weights=[2.0, 1.0]).tolist() == [-1.5]


def test_zero_sign_sum_elects_plus_in_mergekit_and_peft() -> None:
    d1, d2 = np.array([0.25]), np.array([-0.25])
    assert ref.mergekit_ties(np.ones(1), [d1, d2], 1.0).tolist() == [1.25]
    assert ref.peft_ties(np.ones(1), [d1, d2], 1.0).tolist() == [1.25]


def test_all_zero_deltas_leave_the_base() -> None:
    base = np.array([0.5, -1.0])
    z = np.zeros(2)
    assert ref.mergekit_ties(base, [z, z], 0.8).tolist() == base.tolist()
    assert ref.peft_ties(base, [z, z], 0.8).tolist() == base.tolist()
    assert ref.paper_ties({"a": base}, [{"a": z}, {"a": z}], 0.8)["a"].tolist() == base.tolist()


def test_paper_trim_keeps_kthvalue_ties_like_the_authors_code() -> None:
    x = np.array([5.0, -1.0, 0.5, 3.0, -2.0])
    # n = 5, density 0.4: k = 2, threshold = 3rd smallest |x| = 2 -> keeps 5, 3, -2 (k + 1 entries)
    assert ref.paper_trim_mask(x, 0.4).tolist() == [True, False, False, True, True]
    # k = 0: threshold = the largest magnitude, which survives
    assert ref.paper_trim_mask(x, 0.1).tolist() == [True, False, False, False, False]
    assert ref.paper_trim_mask(x, 1.0).all()


def test_paper_global_trim_majority_sign_by_hand() -> None:
    base = {"A": np.zeros(3), "B": np.zeros(2)}  # flat order [A0, A1, A2, B0, B1]
    d1 = {"A": np.array([5.0, -1.0, 0.5]), "B": np.array([3.0, -2.0])}
    d2 = {"A": np.array([-5.0, 4.0, 0.25]), "B": np.array([1.0, -0.5])}
    # density 0.4: t1 = [5, 0, 0, 3, -2] (threshold 2), t2 = [-5, 4, 0, 1, 0] (threshold 1)
    # sum [0, 4, 0, 4, -2]: signs [0, +, 0, +, -], majority sign(+1) = + -> gamma [+, +, +, +, -]
    # A0: only 5 agrees; A1: only 4; A2: nothing -> 0; B0: (3 + 1) / 2; B1: -2
    out = ref.paper_ties(base, [d1, d2], 0.4, order=["A", "B"])
    assert out["A"].tolist() == [5.0, 4.0, 0.0] and out["B"].tolist() == [2.0, -2.0]
    # k = 0: each model keeps only its largest entry, t1 = [5, 0...], t2 = [-5, 0...]; every sum is 0,
    # the majority is sign(0) = 0, and the authors' where(gamma > 0, t > 0, t < 0) keeps -5
    out = ref.paper_ties(base, [d1, d2], 0.1, order=["A", "B"])
    assert out["A"].tolist() == [-5.0, 0.0, 0.0] and out["B"].tolist() == [0.0, 0.0]


def test_paper_exact_rule_and_negative_majority() -> None:
    base = {"A": np.zeros(2), "B": np.zeros(1)}
    # flat order [A0, A1, B0], N = 3, k = int(2/3 * 3) = 2 kept exactly
    d1 = {"A": np.array([4.0, -1.0]), "B": np.array([2.0])}   # keep 4 and 2
    d2 = {"A": np.array([-4.0, -2.0]), "B": np.array([3.0])}  # keep -4 and 3
    # sum [0, 0, 5] -> signs [0, 0, +]; majority +, so gamma = [+, +, +]; agree: t > 0
    out = ref.paper_ties(base, [d1, d2], 2 / 3, trim_rule="exact")
    assert out["A"].tolist() == [4.0, 0.0] and out["B"].tolist() == [2.5]
    # negative majority: B deltas negative -> gamma [-, -, -], agree: t < 0; lambda 2
    d1["B"], d2["B"] = -d1["B"], -d2["B"]
    out = ref.paper_ties(base, [d1, d2], 2 / 3, lambda_=2.0, trim_rule="exact")
    assert out["A"].tolist() == [-8.0, 0.0] and out["B"].tolist() == [-5.0]
    # weights multiply the kept entries; the count is of nonzero weighted entries
    out = ref.paper_ties(base, [d1, d2], 2 / 3, weights=[0.5, 1.0], trim_rule="exact")
    assert out["A"].tolist() == [-4.0, 0.0] and out["B"].tolist() == [-2.0]
    # per-tensor trimming (mergekit) gives something else on the same input: B has k = 0
    assert ref.mergekit_ties(base["B"], [d1["B"], d2["B"]], 2 / 3).tolist() == [0.0]


def test_paper_threshold_ties_are_global() -> None:
    d = [{"A": np.array([1.0, 3.0]), "B": np.array([1.0])}]
    ties = ref.paper_threshold_ties(d, 2 / 3, ["A", "B"])  # k = 2: 3, then 1.0 twice -> tie
    assert ties[0]["A"].tolist() == [True, False] and ties[0]["B"].tolist() == [True]


@pytest.mark.peft
@pytest.mark.train
def test_peft_reference_equals_peft_itself() -> None:
    torch = pytest.importorskip("torch")
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    rng = np.random.default_rng(0)
    base = rng.standard_normal((7, 13))
    deltas = [rng.standard_normal((7, 13)) for _ in range(3)]
    weights = [1.0, 0.5, 2.0]
    task_tensors = [torch.from_numpy(d) for d in deltas]
    expected = base + merge_utils.ties(task_tensors, torch.tensor(weights, dtype=torch.float64), density=0.6).numpy()
    np.testing.assert_allclose(ref.peft_ties(base, deltas, 0.6, weights), expected, rtol=0, atol=1e-12)
