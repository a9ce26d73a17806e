"""Training steps on the CPU: one thread for a small step, every thread for a large one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from training import threads as T


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_step_flops_counts_the_forward_matrix_products() -> None:
    layer = nn.Linear(784, 512)
    x = torch.zeros(128, 784)
    assert T.step_flops(lambda: layer(x)) == 2 * 128 * 784 * 512


def test_small_step_runs_on_one_thread_and_restores_the_count(two_threads: object) -> None:
    layer = nn.Linear(30, 16)
    x = torch.zeros(128, 30)
    with T.step_threads(lambda: layer(x), torch.device("cpu")) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_large_step_keeps_every_thread(
    two_threads: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = nn.Linear(30, 16)
    x = torch.zeros(128, 30)
    monkeypatch.setattr(T, "SMALL_STEP_FLOPS", 1_000)  # this step's 122,880 FLOPs count as large
    with T.step_threads(lambda: layer(x), torch.device("cpu")) as n:
        assert n == 2 and torch.get_num_threads() == 2


def test_an_error_in_the_loop_still_restores_the_count(two_threads: object) -> None:
    layer = nn.Linear(30, 16)
    with (
        pytest.raises(RuntimeError),
        T.step_threads(lambda: layer(torch.zeros(4, 30)), torch.device("cpu")),
    ):
        raise RuntimeError("diverged")
    assert torch.get_num_threads() == 2


def test_other_devices_are_left_alone(two_threads: object) -> None:
    def never() -> None:
        raise AssertionError("counted FLOPs for a GPU step")

    with T.step_threads(never, torch.device("meta")) as n:
        assert n == 2
