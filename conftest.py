"""Fixtures shared by the test files: the CUDA marker's helpers. CUDA tests skip cleanly without a GPU."""

from collections.abc import Callable, Iterator

import pytest
import torch


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """fp32 on CUDA means fp32 for the test: TF32 convolutions would round inputs to 10 mantissa bits."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture
def cap_gpu_memory() -> Iterator[Callable[[int], None]]:
    """cap(mib) limits this process's CUDA memory to what it holds now plus mib; lifted after the test."""

    def cap(mib: int) -> None:
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + mib * 2**20) / total)

    yield cap
    if torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(1.0)
