"""Shared fixtures."""

import pytest
from tiny_models import KINDS


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param
