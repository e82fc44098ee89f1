"""The simulated link's key rate against the OPENQKD use case 33 measurements."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from kme.rate_model import (
    COEFFS,
    MAX_ERROR_DECADES,
    MAX_LOSS_DB,
    RMS_ERROR_DECADES,
    rate_from_loss,
)

DATA = Path(__file__).with_name("uc33_key_rates.csv")


def table() -> list[dict[str, str]]:
    with DATA.open(newline="") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def measured() -> list[tuple[float, float]]:
    """(loss dB, key rate b/s) of every row that gave key."""
    return [(float(r["channel_loss_dB"]), float(r["key_rate_bps"])) for r in table()
            if r["key_rate_bps"]]

# kme/rate_model.py docstring table (loss dB, b/s), and single measurements of the same data set.
DOCSTRING_TABLE: list[tuple[float, float]] = [
    (0, 14056), (5, 10263), (10, 6501), (15, 1859), (20, 125), (22, 24)]
MEASUREMENTS: list[tuple[float, float]] = [(10.2, 8400), (13.3, 4300), (19.8, 90)]


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


def test_data_file_is_the_whole_uc33_table() -> None:
    rows = table()
    assert len(rows) == 41
    no_key = [r for r in rows if not r["key_rate_bps"]]
    assert len(no_key) == 5 and all(not r["channel_loss_dB"] for r in no_key)  # "too high"
    assert len(measured()) == 36
    assert ("Norte", "Distrito", 10.2, 8400.0) in [
        (r["sender"], r["receiver"], float(r["channel_loss_dB"]), float(r["key_rate_bps"]))
        for r in rows if r["key_rate_bps"]]


def test_refit_from_the_data_gives_the_module_coefficients() -> None:
    points = sorted(set(measured()))  # the docstring's 35 distinct pairs
    assert len(points) == 35
    loss = np.array([x for x, _ in points])
    log_rate = np.log10([r for _, r in points])
    fitted = np.polyfit(loss, log_rate, 3)
    np.testing.assert_allclose(fitted, COEFFS, rtol=1e-6)
    rms = float(np.sqrt(np.mean((log_rate - np.polyval(fitted, loss)) ** 2)))
    assert round(rms, 2) == RMS_ERROR_DECADES


@pytest.mark.parametrize("loss, rate", measured())
def test_every_measurement_is_within_the_documented_error(loss: float, rate: float) -> None:
    off = abs(math.log10(rate_from_loss(loss)) - math.log10(rate))
    assert off <= MAX_ERROR_DECADES, (loss, rate, rate_from_loss(loss))


def test_documented_error_is_tight() -> None:
    worst = max(abs(math.log10(rate_from_loss(x)) - math.log10(r)) for x, r in measured())
    assert worst > MAX_ERROR_DECADES - 0.05  # the bound says how bad the fit gets, no looser
