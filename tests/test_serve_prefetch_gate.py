"""serve/prefetch_gate.py: a layer's predicted experts are copied only while its recent
predictions were right often enough; until then (and below the bar) they are scored only."""

import pytest

from serve.prefetch_gate import MIN_PRECISION, PrefetchGate


def test_nothing_is_copied_before_warmup_predictions_are_scored():
    g = PrefetchGate(0.75, window=8, warmup=4)
    assert not g.allow(3) and g.precision(3) is None
    g.record(3, 2, 2)
    assert not g.allow(3) and g.precision(3) is None  # 2 of the 4 scored
    g.record(3, 2, 2)
    assert g.allow(3) and g.precision(3) == 1.0
    assert not g.allow(4)  # layers are scored apart


def test_the_bar_follows_the_recent_window():
    g = PrefetchGate(0.75, window=8, warmup=4)
    for _ in range(4):
        g.record(1, 2, 1)  # 0.5
    assert g.precision(1) == 0.5 and not g.allow(1)
    for _ in range(4):
        g.record(1, 2, 2)  # the window (8 predicted) now holds only these
    assert g.precision(1) == 1.0 and g.allow(1)
    g.record(1, 2, 0)
    assert g.precision(1) == 6 / 8 and g.allow(1)  # at the bar
    g.record(1, 2, 0)
    assert g.precision(1) == 4 / 8 and not g.allow(1)


def test_a_step_naming_more_than_the_window_is_kept_alone():
    g = PrefetchGate(0.75, window=4, warmup=4)
    g.record(0, 2, 0)
    g.record(0, 10, 9)  # a prefill chunk names many experts
    assert g.precision(0) == 0.9


def test_zero_always_copies_and_bad_settings_are_named():
    assert PrefetchGate(0.0).allow(7)
    assert 0 < MIN_PRECISION < 1 and not PrefetchGate().allow(0)
    with pytest.raises(ValueError, match="min_precision must be in"):
        PrefetchGate(1.5)
    with pytest.raises(ValueError, match="warmup"):
        PrefetchGate(0.5, window=4, warmup=8)
    with pytest.raises(ValueError, match="correct <= predicted"):
        PrefetchGate().record(0, 2, 3)
