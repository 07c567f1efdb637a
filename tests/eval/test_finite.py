"""The finite check: exact counts of bad rows and NaN/inf values, one sync, batches tallied, picklable error."""

import math
import pickle

import pytest
import torch

from ssl_bench.eval import finite
from ssl_bench.eval.finite import FiniteTally, NonFiniteFeaturesError, check_finite

NAN, INF = math.nan, math.inf


def test_finite_features_pass_and_integers_are_ignored():
    check_finite(torch.randn(7, 3), "clean")
    check_finite(torch.zeros(0, 4), "empty")
    check_finite(torch.tensor(1.5), "a scalar")
    check_finite((torch.randn(5, 2, 3), None, torch.arange(5)), "parts")


def test_message_counts_rows_values_nan_and_inf():
    x = torch.randn(10, 4)
    x[2, 1] = NAN
    x[2, 3] = INF  # same row: one bad row, two bad values
    x[7] = NAN
    x[9, 0] = -INF
    with pytest.raises(NonFiniteFeaturesError) as info:
        check_finite(x, "k-NN bank features")
    err = info.value
    assert (err.what, err.bad_rows, err.rows, err.nan, err.inf, err.values) == ("k-NN bank features", 3, 10, 5, 2, 40)
    assert str(err) == ("k-NN bank features: 3 of 10 rows (samples) hold NaN or inf (5 NaN and 2 inf among 40 "
                        "values); non-finite features are never evaluated, since they would give a meaningless "
                        "number")
    assert isinstance(err, ValueError)


def test_one_nan_value_and_all_nan():
    x = torch.randn(6, 5)
    x[4, 2] = NAN
    with pytest.raises(NonFiniteFeaturesError, match=r"^x: 1 of 6 rows \(samples\) hold NaN or inf \(1 NaN and 0 inf "
                                                     r"among 30 values\)"):
        check_finite(x, "x")
    with pytest.raises(NonFiniteFeaturesError, match=r"6 of 6 rows .*\(30 NaN and 0 inf among 30 values\)"):
        check_finite(torch.full((6, 5), NAN), "x")


def test_parts_share_rows_and_higher_dims_count_per_sample():
    cls = torch.zeros(4, 3, 2)  # (B, blocks, D): one sample is 6 values here plus 2 in the other part
    mean = torch.zeros(4, 2)
    cls[1, 2, 0] = NAN
    mean[1, 1] = INF  # sample 1 again
    mean[3, 0] = NAN
    with pytest.raises(NonFiniteFeaturesError) as info:
        check_finite((cls, mean), "linear-probe train features")
    assert (info.value.bad_rows, info.value.rows, info.value.nan, info.value.inf, info.value.values) == (2, 4, 2, 1, 32)
    with pytest.raises(ValueError, match="different numbers of rows"):
        check_finite((cls, torch.zeros(3, 2)), "mismatch")


def test_fp16_and_blocks_beyond_the_block_size(monkeypatch):
    monkeypatch.setattr(finite, "_BLOCK", 3)
    x = torch.randn(10, 4).half()
    x[[0, 5, 9], 1] = torch.tensor([NAN, INF, NAN]).half()
    with pytest.raises(NonFiniteFeaturesError) as info:
        check_finite(x, "fp16 bank")
    assert (info.value.bad_rows, info.value.nan, info.value.inf) == (3, 2, 1)


def test_tally_over_batches_raises_once_at_check_with_totals():
    tally = FiniteTally("linear-probe val features")
    for i in range(3):
        batch = torch.randn(4, 2)
        if i == 1:
            batch[0, 0], batch[3, 1] = NAN, INF
        tally.add(batch, None)
    tally.add(torch.zeros(0, 2))
    with pytest.raises(NonFiniteFeaturesError, match=r"^linear-probe val features: 2 of 12 rows .*\(1 NaN and 1 inf "
                                                     r"among 24 values\)"):
        tally.check()
    FiniteTally("nothing added").check()  # no batches: nothing to complain about


def test_check_syncs_with_the_host_once(monkeypatch):
    calls = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or real(self))
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("unexpected .item() sync"))
    tally = FiniteTally("x")
    for _ in range(5):
        tally.add(torch.randn(8, 3))
    tally.check()
    assert calls == [1]


def test_error_survives_pickling():
    err = pickle.loads(pickle.dumps(NonFiniteFeaturesError("k-NN test features", 1, 2, 3, 4, 5)))
    assert isinstance(err, NonFiniteFeaturesError) and (err.bad_rows, err.values) == (1, 5)
    assert str(err).startswith("k-NN test features: 1 of 2 rows")
