"""The GPU memory sampler keeps each phase's own peak per GPU (fed by a scripted reader here)."""

import time

from mta_ray.bench.gpumem import GIB, GpuMemorySampler, read_used_bytes


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


def test_activity_is_averaged_per_phase_and_gpu():
    rows = {"now": [(1980.0, 600.0, 100.0), (1500.0, 300.0, 50.0)]}
    with GpuMemorySampler(interval=0.01, reader=Scripted(), activity=lambda: rows["now"]) as mem:
        with mem.phase("busy"):
            time.sleep(0.1)
        rows["now"] = [(345.0, 80.0, 0.0), (345.0, 80.0, 0.0)]
        time.sleep(0.05)  # a sample read just before the change is in by now
        with mem.phase("idle"):
            time.sleep(0.1)
    assert mem.activity["busy"] == [{"clocks.sm": 1980.0, "power.draw": 600.0, "utilization.gpu": 100.0},
                                    {"clocks.sm": 1500.0, "power.draw": 300.0, "utilization.gpu": 50.0}]
    assert mem.activity["idle"][1]["utilization.gpu"] == 0.0


def test_nothing_is_polled_while_paused():
    reader = Scripted()
    with GpuMemorySampler(interval=0.01, reader=reader) as mem:
        with mem.paused():
            with mem.phase("timed"):
                reader.used = [9 * GIB, 0]
                time.sleep(0.1)
                reader.used = [1 * GIB, 0]
    assert mem.peaks["timed"] == [1 * GIB, 0]  # only the readings at the phase's two ends
