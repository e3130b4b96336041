"""`hf_dsv4.distributed`: a failure on one rank is raised on every rank as the same exception, in one process as is."""

from __future__ import annotations

import pytest
import torch
from dist_launch import run_ranks

from hf_dsv4.distributed import all_gather_object, every_rank_raises, is_distributed, is_main, local_device, on_source
from hf_dsv4.distributed import rank as this_rank


def test_one_process_is_rank_0_of_1_on_the_cpu():
    assert (is_distributed(), this_rank(), is_main()) == (False, 0, True)
    assert str(local_device()) == "cpu"
    assert all_gather_object({"a": 1}) == [{"a": 1}]


@pytest.mark.parametrize(
    ("backend", "cuda"),
    [("nccl", True), ("cuda:nccl,cpu:gloo", True), ("cpu:gloo,cuda:nccl", True), ("cpu:gloo, cuda:nccl", True),
     ("gloo", False), ("cpu:gloo", False), ("NCCL", True)],
)  # fmt: skip
def test_the_device_follows_every_backend_string_accelerate_can_produce(backend, cuda, monkeypatch):
    """accelerate initialises "cuda:nccl,cpu:gloo" under CPU offload or FULL_STATE_DICT: still this rank's GPU, and
    that GPU is cuda:LOCAL_RANK, made current (NCCL's object collectives run on the current device)."""
    import torch.distributed as dist

    from hf_dsv4 import distributed

    current = {"device": 0}
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["device"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: current.update(device=index))
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.drives_cuda(backend) is cuda
    assert local_device() == (torch.device("cuda", 3) if cuda else torch.device("cpu"))
    assert current["device"] == (3 if cuda else 0)
    if cuda:
        monkeypatch.setenv("LOCAL_RANK", "5")
        with pytest.raises(RuntimeError, match=r"rank 3: LOCAL_RANK=5 but this machine shows 4 GPU\(s\)"):
            local_device()


def test_in_one_process_every_rank_raises_lets_the_exception_through_unchanged():
    original = KeyError("tools")
    with pytest.raises(KeyError) as excinfo, every_rank_raises():
        raise original
    assert excinfo.value is original and not getattr(original, "__notes__", None)


def test_in_one_process_on_source_returns_or_raises_exactly_what_fn_does():
    assert on_source(lambda: 42) == 42
    original = FileNotFoundError(2, "No such file or directory", "adapter_model.safetensors")

    def read():
        raise original

    with pytest.raises(FileNotFoundError) as excinfo:
        on_source(read)
    assert excinfo.value is original and not getattr(original, "__notes__", None)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks("errors", tmp_path_factory.mktemp("errors"), timeout=120)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_failure_on_rank_1_is_raised_on_rank_0_with_its_type_message_and_cause(ranks):
    on_0, on_1 = (result["every_rank_raises"] for result in ranks)
    assert on_1 == {"type": "ValueError", "message": "row 3: bad tools", "chain": ["KeyError: 'missing'"], "note": None}
    assert on_0 == {**on_1, "note": "raised on rank 1, re-raised on rank 0 by hf_dsv4; rank 1's traceback:"}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_when_several_ranks_fail_every_rank_raises_the_lowest_ranks_error(ranks):
    on_0, on_1 = (result["lowest_rank_wins"] for result in ranks)
    assert on_0 == {"type": "OSError", "message": "disk full on rank 0", "chain": [], "note": None}
    assert on_1 == {**on_0, "note": "raised on rank 0, re-raised on rank 1 by hf_dsv4; rank 0's traceback:"}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_an_exception_that_cannot_be_unpickled_arrives_as_a_runtime_error_naming_it(ranks):
    on_0, on_1 = (result["unpicklable"] for result in ranks)
    assert on_1["type"] == "NeedsTwoArguments" and on_1["message"] == "torn write at shard 2"
    assert on_0["type"] == "RuntimeError" and on_0["message"] == "NeedsTwoArguments: torn write at shard 2"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_on_source_raises_rank_0s_error_on_every_rank_and_returns_none_elsewhere(ranks):
    on_0, on_1 = (result["on_source"] for result in ranks)
    assert on_0 == {"type": "ValueError", "message": "row 3: bad tools", "chain": ["KeyError: 'missing'"], "note": None}
    assert on_1 == {**on_0, "note": "raised on rank 0, re-raised on rank 1 by hf_dsv4; rank 0's traceback:"}
    assert [r["on_source_result"] for r in ranks] == [{"read": "by rank 0"}, None]
    assert [r["after"] for r in ranks] == ["no hang", "no hang"]
