"""Scoring on a CUDA GPU: which device ``auto`` means (``backends.cuda_present``: no framework
imported), the TorchScript runner fed from pinned memory, and ``--decode gpu``'s nvJPEG decoder. torch and torchvision are
imported only when one of these classes is made."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from service.backends import cuda_present
from service.pipeline import DecodedBatch, decode_batch
from service.preprocess import ImageError


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cpu`` on a host without a GPU, without importing any framework; the
    registry settles ``auto`` on a GPU host (and ``cuda``/``cpu`` as asked)."""
    return "cpu" if device == "auto" and not cuda_present() else device


class PinnedCudaRunner:
    """TorchScript on CUDA: uint8 batches go to the GPU from pinned memory with non-blocking copies
    and are normalised there (4x fewer bytes over PCIe than float32, no CPU arithmetic).

    The arithmetic is the CPU path's, op for op ((x / 255 - mean) / std in float32, dividing by a
    tensor: PyTorch turns division by a Python scalar into a multiplication by its reciprocal), then
    half precision and channels-last, as the registry's backend does.
    """

    def __init__(self, backend: Any, mean: Sequence[float], std: Sequence[float], batch_size: int,
                 size: Sequence[int]) -> None:
        """``backend``: the entry's :class:`~service.backends.TorchScriptBackend` on CUDA."""
        import torch

        self.torch, self.module, self.outputs = torch, backend.module, backend.outputs
        self.scale = torch.full((1,), 255.0, dtype=torch.float32, device="cuda")
        self.mean = torch.tensor(mean, dtype=torch.float32, device="cuda").view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device="cuda").view(1, 3, 1, 1)
        self.pinned = torch.empty((batch_size, 3, *size), dtype=torch.uint8).pin_memory()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        staging = self.pinned[:len(batch)]
        staging.numpy()[...] = batch
        return self.run_cuda(staging.to("cuda", non_blocking=True))  # .cpu() at the end waits: staging is free

    def run_cuda(self, x: Any) -> np.ndarray:
        """(N, 3, H, W) uint8 CUDA tensor -> (N, classes) float32 probabilities (+ the OOD score column)."""
        torch = self.torch
        with torch.inference_mode():
            x = ((x.float() / self.scale - self.mean) / self.std).half()
            x = x.contiguous(memory_format=torch.channels_last)
            return self.outputs(self.module(x))  # one array, as the backend returns


class GpuJpegDecoder:
    """``--decode gpu``: the plain JPEGs already at the model's size that the workers handed over
    undecoded are decoded by nvJPEG (``torchvision.io.decode_jpeg(..., device="cuda")``), one call
    per batch, and joined on the GPU with the files the workers decoded.

    nvJPEG's pixels are not libjpeg-turbo's (its IDCT and upsampling round differently), so the
    probabilities differ slightly from ``--decode cpu``'s: it is opt-in, never picked on its own.
    """

    def __init__(self, size: Sequence[int], max_pixels: int) -> None:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        self.torch, self.decode_jpeg, self.rgb = torch, decode_jpeg, ImageReadMode.RGB
        self.size, self.max_pixels = tuple(size), max_pixels

    def assemble(self, batch: DecodedBatch) -> tuple[Any, list[int], list[tuple[int, ImageError]]]:
        """A :class:`~service.pipeline.DecodedBatch` with ``jpegs`` -> (uint8 CUDA tensor in file
        order, the files' indices, the errors in index order)."""
        torch = self.torch
        good, errors = list(batch.good), list(batch.errors)
        parts = [torch.from_numpy(batch.pixels).to("cuda")] if good else []
        blobs = [data for _, data in batch.jpegs]
        try:
            decoded = self.decode_jpeg([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs],
                                       mode=self.rgb, device="cuda")
            good += [i for i, _ in batch.jpegs]
            parts.append(torch.stack(decoded))
        except RuntimeError:  # a corrupt file in the batch: the CPU pipeline sorts them out one by one
            fallback = decode_batch(blobs, self.size, self.max_pixels)
            good += [batch.jpegs[k][0] for k in fallback.good]
            errors += [(batch.jpegs[k][0], error) for k, error in fallback.errors]
            if fallback.good:
                parts.append(torch.from_numpy(fallback.pixels).to("cuda"))
        order = sorted(range(len(good)), key=good.__getitem__)
        images = torch.cat(parts)[torch.tensor(order, device="cuda")] if parts else None
        return images, [good[k] for k in order], sorted(errors, key=lambda e: e[0])
