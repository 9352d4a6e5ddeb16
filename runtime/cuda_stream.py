"""The CUDA stream onnxruntime computes on, owned here, so a decode loop can wait for one step while
the next one is already queued.

onnxruntime's Python API offers two waits: a synchronous run (wait for everything) or none. Handing
onnxruntime a stream of our own (provider option `user_compute_stream`) and recording events on it
gives the third: wait for this step only. Input writes go through the same stream, so they are
ordered behind the steps already queued and ahead of the next one. The CUDA driver API is reached
through ctypes (libcuda.so.1 comes with the NVIDIA driver), so the runtime needs neither torch nor a
CUDA toolkit for this.
"""

from __future__ import annotations

import ctypes

import numpy as np
import onnxruntime as ort

_NON_BLOCKING = 1  # CU_STREAM_NON_BLOCKING: no implicit ordering against the legacy default stream
_DISABLE_TIMING = 2  # CU_EVENT_DISABLE_TIMING: the cheapest event to record and wait on
_HOST, _DEVICE = 1, 2  # CUmemorytype


class _Copy2D(ctypes.Structure):
    """cuda.h's CUDA_MEMCPY2D: rows of WidthInBytes from src to dst, each side with its own pitch."""

    _fields_ = [("srcXInBytes", ctypes.c_size_t), ("srcY", ctypes.c_size_t), ("srcMemoryType", ctypes.c_int),
                ("srcHost", ctypes.c_void_p), ("srcDevice", ctypes.c_uint64), ("srcArray", ctypes.c_void_p),
                ("srcPitch", ctypes.c_size_t),
                ("dstXInBytes", ctypes.c_size_t), ("dstY", ctypes.c_size_t), ("dstMemoryType", ctypes.c_int),
                ("dstHost", ctypes.c_void_p), ("dstDevice", ctypes.c_uint64), ("dstArray", ctypes.c_void_p),
                ("dstPitch", ctypes.c_size_t),
                ("WidthInBytes", ctypes.c_size_t), ("Height", ctypes.c_size_t)]


class DeviceStream:
    """A non-blocking stream in the device's primary context (the one onnxruntime's CUDA runtime
    uses), with ordered host-to-device writes and events."""

    def __init__(self, device_id: int = 0):
        self._cuda = ctypes.CDLL("libcuda.so.1")
        self._cuda.cuMemcpyHtoDAsync_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        self._call("cuInit", 0)
        device = ctypes.c_int()
        self._call("cuDeviceGet", ctypes.byref(device), device_id)
        self._context = ctypes.c_void_p()
        self._call("cuDevicePrimaryCtxRetain", ctypes.byref(self._context), device)
        self._stream = ctypes.c_void_p()
        self._call("cuStreamCreate", ctypes.byref(self._stream), _NON_BLOCKING)

    @property
    def handle(self) -> int:
        return self._stream.value

    def write(self, target: ort.OrtValue, data: np.ndarray) -> None:
        """Copy `data` into the device buffer `target` after the work already queued. Returns once the
        host memory has been staged, so `data` may change afterwards."""
        data = np.ascontiguousarray(data)
        self._call("cuMemcpyHtoDAsync_v2", target.data_ptr(), data.ctypes.data, data.nbytes, self._stream)

    def write_rows(self, target: ort.OrtValue, offset: int, rows: np.ndarray, pitch: int) -> None:
        """Copy each row of the 2-D `rows` (a view whose rows may lie apart, as a slice of columns does)
        into `target`, the first `offset` bytes in and each next one `pitch` bytes further, after the
        work already queued. Returns once the host memory has been staged."""
        assert rows.ndim == 2 and rows.strides[1] == rows.itemsize
        copy = _Copy2D(srcMemoryType=_HOST, srcHost=rows.ctypes.data, srcPitch=rows.strides[0],
                       dstMemoryType=_DEVICE, dstDevice=target.data_ptr() + offset, dstPitch=pitch,
                       WidthInBytes=rows.shape[1] * rows.itemsize, Height=rows.shape[0])
        self._call("cuMemcpy2DAsync_v2", ctypes.byref(copy), self._stream)

    def copy_rows(self, target: ort.OrtValue, pitch: int, source: ort.OrtValue, source_pitch: int, width: int,
                  height: int) -> None:
        """Copy `height` rows of `width` bytes from the device buffer `source` (rows `source_pitch` apart)
        to the start of `target` (rows `pitch` apart), after the work already queued."""
        copy = _Copy2D(srcMemoryType=_DEVICE, srcDevice=source.data_ptr(), srcPitch=source_pitch,
                       dstMemoryType=_DEVICE, dstDevice=target.data_ptr(), dstPitch=pitch,
                       WidthInBytes=width, Height=height)
        self._call("cuMemcpy2DAsync_v2", ctypes.byref(copy), self._stream)

    def record(self) -> ctypes.c_void_p:
        """An event that completes when the work queued so far has run."""
        event = ctypes.c_void_p()
        self._call("cuEventCreate", ctypes.byref(event), _DISABLE_TIMING)
        self._call("cuEventRecord", event, self._stream)
        return event

    def wait(self, event: ctypes.c_void_p) -> None:
        self._call("cuEventSynchronize", event)
        self._call("cuEventDestroy_v2", event)

    def _call(self, name: str, *args) -> None:
        if getattr(self, "_context", None):  # driver calls act on the calling thread's current context
            self._cuda.cuCtxSetCurrent(self._context)
        status = getattr(self._cuda, name)(*args)
        if status != 0:
            raise RuntimeError(f"CUDA driver call {name} failed with error {status}")
