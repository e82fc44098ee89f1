"""Raw HTTPS clients of SAE_1 (at KME_A) and SAE_2 (at KME_B), on the `kmes` pair."""

from __future__ import annotations

import pytest

from tests.harness import KmePair
from tests.kme.raw import Raw


@pytest.fixture
def sae_client() -> type[Raw]:
    """The class `sae1` and `sae2` are; a test module overrides this to add its own calls."""
    return Raw


@pytest.fixture
def sae1(kmes: KmePair, sae_client: type[Raw]) -> Raw:
    return sae_client(kmes, "SAE_1")


@pytest.fixture
def sae2(kmes: KmePair, sae_client: type[Raw]) -> Raw:
    return sae_client(kmes, "SAE_2")
