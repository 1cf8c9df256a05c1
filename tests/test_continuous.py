"""The continuous trainer: concurrent calls share one trainer's slots and each gets exactly its own users."""

import threading
import time

import pytest
import torch

from mta_ray.engine.continuous import ContinuousTrainer
from mta_ray.engine.trainer import MultiSlotTrainer
from mta_ray.stages.personalize import chunk_size, queued_users
from tests.test_trainer import CFG, FACTOR_ATOL, _jobs, _train_alone_with_peft
from tests.tiny import tiny_llama


@pytest.fixture(scope="module")
def references():
    return {job.user_id: _train_alone_with_peft(job, CFG) for job in _jobs()}


def _in_threads(calls):
    """Run each ``call()`` in its own thread (as a threaded Ray actor runs concurrent calls)."""
    out, errors = [None] * len(calls), [None] * len(calls)

    def target(i):
        try:
            out[i] = calls[i]()
        except BaseException as exc:  # noqa: BLE001
            errors[i] = exc

    threads = [threading.Thread(target=target, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    return threads, out, errors


def _wait_queued(runner, n, timeout=30.0):
    deadline = time.time() + timeout
    while len(runner._queue) < n:
        assert time.time() < deadline, "jobs were not queued"
        time.sleep(0.01)


def test_calls_queued_together_share_one_run_and_train_like_peft_alone(references):
    """Two calls (users 0+1, then user 2) queued while the GPU is busy: one trainer run of 2 slots takes
    both, refilling a slot from the second call; each call gets its own users, trained as PEFT trains them."""
    model = tiny_llama()
    runner = ContinuousTrainer()
    jobs = _jobs()

    def build():
        return MultiSlotTrainer(model, CFG, slots=2, merged_rank=8)

    with runner.gpu_lock:  # the GPU is busy: both calls queue up behind it
        threads, out, errors = _in_threads([lambda: runner.train("k", jobs[:2], build),
                                            lambda: runner.train("k", jobs[2:], build)])
        _wait_queued(runner, 3)
    for t in threads:
        t.join(timeout=120)
    assert errors == [None, None]
    assert sorted(r.user_id for r in out[0]) == ["user0", "user1"] and [r.user_id for r in out[1]] == ["user2"]
    assert runner.runs == 1 and runner.busy_seconds > 0
    for result in out[0] + out[1]:
        want_lora, want_losses = references[result.user_id]
        assert result.status == "ok" and result.step_losses == pytest.approx(want_losses, rel=1e-4, abs=1e-5)
        for name, pair in want_lora.items():
            assert torch.allclose(result.lora[name].B, pair.B, atol=FACTOR_ATOL), name


def test_a_different_key_waits_for_its_own_run():
    model = tiny_llama()
    runner = ContinuousTrainer()
    jobs = _jobs()
    built = []

    def build_for(key):
        def build():
            built.append(key)
            return MultiSlotTrainer(model, CFG, slots=2, merged_rank=8)
        return build

    with runner.gpu_lock:
        threads, out, errors = _in_threads([lambda: runner.train("a", jobs[:1], build_for("a")),
                                            lambda: runner.train("b", jobs[1:2], build_for("b")),
                                            lambda: runner.train("a", jobs[2:], build_for("a"))])
        _wait_queued(runner, 3)
    for t in threads:
        t.join(timeout=120)
    assert errors == [None, None, None]
    assert [[r.user_id for r in o] for o in out] == [["user0"], ["user1"], ["user2"]]
    assert built == ["a", "b"] and runner.runs == 2  # both "a" calls went through the first run


def test_a_failing_run_fails_its_calls_only_and_the_runner_goes_on():
    model = tiny_llama()
    runner = ContinuousTrainer()
    jobs = _jobs()

    def broken():
        raise RuntimeError("CUDA out of memory (simulated in build)")

    with pytest.raises(RuntimeError, match="out of memory"):
        runner.train("k", jobs[:2], broken)
    assert not runner._queue  # nothing of the failed call is left behind
    (result,) = runner.train("k", jobs[2:], lambda: MultiSlotTrainer(model, CFG, slots=2, merged_rank=8))
    assert result.user_id == "user2" and result.status == "ok"
    assert runner.train("k", [], broken) == []


def test_chunks_shrink_towards_the_end_and_workers_hold_two_slot_fills():
    slots = 6
    sizes, remaining = [], 72
    while remaining:
        sizes.append(chunk_size(remaining, slots, 2))
        remaining -= sizes[-1]
    assert sizes[0] == slots // 2 and max(sizes) == slots // 2  # at most half a slot-fill per call
    assert sizes == sorted(sizes, reverse=True) and sizes[-3:] == [1, 1, 1]  # small calls at the end
    assert chunk_size(5, 16, 2) == 2 and chunk_size(1, 4, 4) == 1
    assert queued_users(slots) == 12 and queued_users(0) == 2
