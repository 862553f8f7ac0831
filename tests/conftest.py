"""Suite-wide settings."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tests use tiny tensors: intra-op threads only add synchronisation (and stall badly on
    a busy 2-core machine). Subprocesses (DDP, CLI runs) choose their own."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
