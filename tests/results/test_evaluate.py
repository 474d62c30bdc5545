import numpy as np

from trtwsi.results.evaluate import precision_recall


def test_perfect_and_shifted_matches():
    gt = np.array([[0, 0, 10, 10, 0], [100, 100, 140, 140, 1], [200, 0, 220, 20, 0]], float)
    det = gt[:, :4].copy()
    s = precision_recall(det, np.ones(3), gt[:, 4], gt, ["a", "b"])
    assert [(c.tp, c.fp, c.fn) for c in s] == [(2, 0, 0), (1, 0, 0)]
    # a box shifted so IoU < 0.5 is both a FP and leaves a FN
    det2 = det.copy()
    det2[0] += 6
    s = precision_recall(det2, np.ones(3), gt[:, 4], gt, ["a", "b"])
    assert (s[0].tp, s[0].fp, s[0].fn) == (1, 1, 1)
    assert s[0].precision == 0.5 and s[0].recall == 0.5


def test_duplicate_counts_as_false_positive_and_class_matters():
    gt = np.array([[0, 0, 10, 10, 0]], float)
    det = np.array([[0, 0, 10, 10], [0.5, 0, 10.5, 10], [0, 0, 10, 10]], float)
    s = precision_recall(det, np.array([0.9, 0.8, 0.95]), np.array([0, 0, 1]), gt, ["a", "b"])
    assert (s[0].tp, s[0].fp, s[0].fn) == (1, 1, 0)
    assert (s[1].tp, s[1].fp, s[1].fn) == (0, 1, 0)


def test_empty_inputs():
    s = precision_recall(np.zeros((0, 4)), np.zeros(0), np.zeros(0), np.zeros((2, 5)), ["a"])
    assert (s[0].tp, s[0].fp, s[0].fn) == (0, 0, 2)
    assert s[0].recall == 0.0 and s[0].precision == 1.0
