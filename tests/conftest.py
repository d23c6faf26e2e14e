import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def model_zoo():
    """Tiny KoGPT-2-shaped model directories and their broken variants (tests/model_factory.py), built once."""
    from model_factory import model_zoo as build

    return build()
