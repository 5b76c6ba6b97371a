import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run each test on one intra-op thread.

    Tests run many small ops beside a simulator; on a shared 2-core machine a
    second thread mostly waits for a busy core (the duquant suite ran ~8x slower).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
