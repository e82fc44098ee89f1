"""Secret key rate of a simulated QKD link from its channel loss.

Fitted to the key-rate measurements of OPENQKD use case 33 (Madrid, HWDU
devices; D8.7 table "link losses and key rates"), kept row by row in
tests/kme/uc33_key_rates.csv: a cubic in channel loss (dB) for log10(rate in
b/s), unweighted least squares (numpy.polyfit) over the 35 distinct
(loss, rate) pairs of the 36 rows that gave key (Quevedo-Distrito reads
13.3 dB / 4.3e3 b/s on both channels and counts once). tests/kme/
test_rate_model.py refits it from that file.

Error: rms residual 0.19 decades; every measurement lies within 0.55 decades
(a factor 3.5) of the curve. The worst are Quiron-Quevedo (19.0 dB, 73 b/s
measured), Norte-Quevedo on 193.8 THz (5.2 dB, 3.2e3 b/s, where 193.7 THz gave
9.0e3) and Norte-Quintin (22.8 dB, 36 b/s), each off by a factor 3.1 to 3.4.
It is monotone decreasing on [0, 23] dB. Above 23 dB (the highest loss that
still gave key was 22.8 dB; the links the table marks "too high" gave none)
the link produces no key.

    loss dB   0      5      10     15     20    22
    b/s       14056  10263  6501   1859   125   24
"""

from __future__ import annotations

COEFFS = (-3.78148861e-04, 4.43749691e-03, -4.00506716e-02, 4.14786621e00)
RMS_ERROR_DECADES = 0.19   # of log10(rate), over the measurements
MAX_ERROR_DECADES = 0.55   # no measurement is further from the curve
MAX_LOSS_DB = 23.0


def rate_from_loss(loss_db: float) -> float:
    """Secret key rate in bits per second for a channel loss in dB."""
    if loss_db < 0:
        raise ValueError("loss must be >= 0 dB")
    if loss_db > MAX_LOSS_DB:
        return 0.0
    a, b, c, d = COEFFS
    x = loss_db
    return float(10 ** (((a * x + b) * x + c) * x + d))
