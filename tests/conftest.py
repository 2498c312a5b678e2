"""Session-wide set-up and shared fixtures: torchvision importable beside the CPU torch before any test imports
transformers, timm or open_clip (see ``vitkit.utils.make_torchvision_importable``)."""

import pytest
import torch

from vitkit.utils import make_torchvision_importable

make_torchvision_importable()


@pytest.fixture
def one_thread():
    """Tiny ops on two threads of a shared 2-core machine run many times slower than on one: a module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
