"""The simulated link's key rate against the OPENQKD use case 33 measurements."""

from __future__ import annotations

import pytest

from kme.rate_model import MAX_LOSS_DB, rate_from_loss

# kme/rate_model.py docstring table (loss dB, b/s), and single measurements of the same data set.
DOCSTRING_TABLE = [(0, 14056), (5, 10263), (10, 6501), (15, 1859), (20, 125), (22, 24)]
MEASUREMENTS = [(10.2, 8400), (13.3, 4300), (19.8, 90)]


def test_rate_decreases_strictly_from_0_to_23_db() -> None:
    losses = [i / 10 for i in range(0, 231)]
    rates = [rate_from_loss(x) for x in losses]
    assert all(r > 0 for r in rates)
    for i in range(1, len(losses)):
        assert rates[i] < rates[i - 1], f"rate rises from {losses[i - 1]} to {losses[i]} dB"


@pytest.mark.parametrize("loss", [23.01, 24, 30, 60, 1e6])
def test_no_key_above_23_db(loss: float) -> None:
    assert MAX_LOSS_DB == 23.0
    assert rate_from_loss(loss) == 0.0


@pytest.mark.parametrize("loss, measured", DOCSTRING_TABLE + MEASUREMENTS)
def test_rate_within_a_factor_2_of_measurements(loss: float, measured: float) -> None:
    rate = rate_from_loss(loss)
    assert measured / 2 <= rate <= measured * 2, (loss, measured, rate)


@pytest.mark.parametrize("loss", [-0.001, -1, -100])
def test_negative_loss_is_refused(loss: float) -> None:
    with pytest.raises(ValueError, match="loss"):
        rate_from_loss(loss)


def test_rate_is_a_float_for_int_loss() -> None:
    assert isinstance(rate_from_loss(10), float)
