"""The GPU memory sampler keeps each phase's own peak per GPU (fed by a scripted reader here)."""

import time

from mta_ray.gpumem import GIB, GpuMemorySampler, read_used_bytes
from mta_ray.personalize import chunk_size


class Scripted:
    """A reader returning the values set by the test (as nvidia-smi would, per GPU)."""

    def __init__(self):
        self.used = [0, 0]

    def __call__(self):
        return list(self.used)


def test_phase_peaks_are_per_phase_and_per_gpu():
    reader = Scripted()
    with GpuMemorySampler(interval=0.01, reader=reader) as mem:
        with mem.phase("a"):
            reader.used = [5 * GIB, 1 * GIB]
            time.sleep(0.1)
            reader.used = [2 * GIB, 3 * GIB]
            time.sleep(0.1)
        reader.used = [1 * GIB, 0]
        with mem.phase("b"):
            time.sleep(0.05)
    assert mem.peaks["a"] == [5 * GIB, 3 * GIB]
    assert mem.peaks["b"] == [1 * GIB, 0]  # a's peak does not leak into b


def test_wait_idle_returns_once_memory_is_released_or_times_out():
    reader = Scripted()
    reader.used = [10 * GIB]
    mem = GpuMemorySampler(interval=0.01, reader=reader)
    t0 = time.time()
    assert mem.wait_idle(timeout=0.1) == [10 * GIB]
    assert time.time() - t0 >= 0.1
    reader.used = [GIB // 2]
    assert mem.wait_idle(timeout=5) == [GIB // 2]


def test_no_gpu_reads_as_no_values():
    assert isinstance(read_used_bytes(), list)  # [] here (no nvidia-smi); one value per GPU on a GPU box


def test_chunks_divide_evenly_among_workers():
    for users, slots, workers in [(48, 6, 1), (48, 6, 2), (72, 8, 2), (1000, 16, 3), (5, 16, 2), (1, 4, 4)]:
        assert 1 <= chunk_size(users, slots, workers) <= 2 * slots  # at most two slot-fills per call
    # 72 users, 8 slots: 5 chunks of 15 on one GPU, but 6 of 12 on two (3 each, not 3 and 2)
    assert chunk_size(72, 8, 1) == 15 and chunk_size(72, 8, 2) == 12
    assert chunk_size(1000, 16, 3) == 31  # ceil(1000/32) = 32 chunks, rounded up to 33 = 11 per worker
