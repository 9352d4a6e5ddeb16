"""Measuring helpers shared by ours and the peers: device memory and the greedy setting every peer uses."""

from __future__ import annotations

import torch

DEVICE = "cuda"  # a CUDA-optimized graph loads only if every compute node runs on CUDA (runtime/session.py)
GREEDY = {"greedy": True, "repetition_penalty": 1.0}  # argmax of the raw logits, as transformers' greedy peers


class PeakMemory:
    """Device-wide peak of used GPU memory above the level at entry, sampled every 2 ms (sees
    onnxruntime's allocations as well as torch's). Not used around timed runs: the sampling thread
    competes for the interpreter."""

    def __enter__(self) -> "PeakMemory":
        import threading

        gc_collect()  # sessions dropped before this point release their device memory now, not inside
        free, self.total = torch.cuda.mem_get_info()
        self.base, self.peak, self._stop = self.total - free, 0, threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, self.total - torch.cuda.mem_get_info()[0] - self.base)
                self._stop.wait(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def gib(self) -> float:
        return self.peak / 2**30


def gc_collect() -> None:
    """Release the device memory of sessions and tensors dropped so far."""
    import gc

    gc.collect()
    torch.cuda.empty_cache()


def device_used_gib() -> float:
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30
