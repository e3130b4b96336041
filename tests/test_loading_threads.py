"""The source rank borrows the intra-op threads of the ranks that wait for it, and gives them back."""

from __future__ import annotations

import os

import pytest
import torch

from hf_dsv4.loading.pretrained import threads_of_idle_ranks


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_source_rank_uses_the_threads_of_the_nodes_waiting_ranks_and_restores_them(monkeypatch, one_thread):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with threads_of_idle_ranks():
        assert torch.get_num_threads() == min(2, len(os.sched_getaffinity(0)))
    assert torch.get_num_threads() == 1


def test_threads_are_restored_when_loading_fails(monkeypatch, one_thread):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    with pytest.raises(OSError), threads_of_idle_ranks():
        assert torch.get_num_threads() == len(os.sched_getaffinity(0))  # never more than the cores it may use
        raise OSError("corrupted shard")
    assert torch.get_num_threads() == 1
