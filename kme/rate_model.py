"""Secret key rate of a simulated QKD link from its channel loss.

Fitted to the 35 key-rate measurements of OPENQKD use case 33 (Madrid, HWDU
devices; D8.7 table "link losses and key rates"): a cubic in channel loss
(dB) for log10(rate in b/s), least squares, rms residual 0.19 decades.
It is monotone decreasing on [0, 23] dB. Above 23 dB (the highest loss that
still gave key was 22.8 dB; the links the table marks "too high" gave none)
the link produces no key.

    loss dB   0      5      10     15     20    22
    b/s       14056  10263  6501   1859   125   24
"""

from __future__ import annotations

COEFFS = (-3.78148861e-04, 4.43749691e-03, -4.00506716e-02, 4.14786621e00)
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
