"""How many threads a training step on the CPU gets.

A training step of the default models is small: a batch of 128 MNIST images through the MLP
VAE is about 0.3 GFLOP forward, a batch of 256 through the transformation head 0.03, a table's
step less still. Split over OpenMP threads that sleep between parallel regions (the CLI's
``OMP_WAIT_POLICY=PASSIVE``, without which a busy machine trains 5-20x slower), every one of the
step's dozens of operations pays for waking them, and one thread is faster. Measured on 2 cores
(docs/experiments.md, "Tenth session"), ms per step, 1 thread / 2 threads: the MLP VAE on 30
features 3.5 / 7.7-8.3, 784 features 10.6-11.1 / 14.1-15.0, 3,072 features 39-42 / 30-33,
12,288 features 147-156 / 88-97; the conv VAE on 28 x 28 images (0.9 GFLOP) 52 / 40.

So a step below ``SMALL_STEP_FLOPS`` forward runs on one thread and a larger one on all that the
process has (``torch.get_num_threads()``, the CLI's CPU quota). The choice depends on the model
and batch shape only, never on how busy the machine is, so a training run is as reproducible
as before. Scoring, in large batches, keeps every thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode

SMALL_STEP_FLOPS = 5e8  # forward FLOPs of one step; between the 784- and 3,072-feature MLPs


def step_flops(forward: Callable[[], object]) -> int:
    """Forward FLOPs (matrix products and convolutions) of one call of ``forward``."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        forward()
    return int(counter.get_total_flops())


@contextmanager
def step_threads(forward: Callable[[], object], device: torch.device) -> Iterator[int]:
    """Run the block (a training loop whose step's forward pass is ``forward``) on one thread
    when its step is small and on the CPU; yields the thread count the block runs on."""
    before = torch.get_num_threads()
    if device.type != "cpu" or before == 1 or step_flops(forward) >= SMALL_STEP_FLOPS:
        yield before
        return
    torch.set_num_threads(1)
    try:
        yield 1
    finally:
        torch.set_num_threads(before)
