"""Where a model runs: ONNX Runtime (default; its CUDA provider when onnxruntime-gpu finds a GPU)
or TorchScript (CUDA when available). A backend takes a normalised float32 batch and returns the
graph's output (probabilities: the exported graphs end in a softmax). Made with ``ood=True`` (the
card has an ``ood`` section), it asks the graph for both outputs by name, ``probabilities`` and
``ood_score``, and returns them as one array, the score as the last column
(:func:`service.ood.pack`). Each imports its runtime only when made, so a host without torch
serves ONNX without importing it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from service.card import OOD_OUTPUTS, RegistryError
from service.ood import pack

BACKENDS = ("onnx", "torchscript")


class Backend(Protocol):
    device: str

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


class OnnxBackend:
    def __init__(self, path: Path, device: str, threads: int = 0, ood: bool = False) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        providers: list[Any] = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and "CUDAExecutionProvider" in available and cuda_present():
            # cuDNN's heuristic choice of convolution algorithm: the default exhaustive search
            # benchmarks every convolution again for each new input shape, and adaptive batching
            # makes many (a stall of up to seconds on the first batch of each size)
            providers.insert(0, ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}))
        elif device == "cuda":
            raise RegistryError("IMGCLF_DEVICE=cuda but ONNX Runtime has no usable CUDA provider")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle ONNX Runtime threads spin for a while by default, burning the CPU that parsing and
        # decoding need between batches; let them sleep.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options.log_severity_level = 3  # ORT warns about unused CUDA libraries on CPU hosts
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.ood = ood
        if ood and tuple(o.name for o in self.session.get_outputs()) != OOD_OUTPUTS:
            raise RegistryError(f"{path}: the card has an ood section but the graph's outputs are "
                                f"{[o.name for o in self.session.get_outputs()]}, not {list(OOD_OUTPUTS)}")
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.run_options = run_options(self.device)
        self.keep_arena = ort.RunOptions()  # the arena keeps what the run took

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        options = self.run_options if batch.nbytes > ARENA_KEEP_INPUT_BYTES else self.keep_arena
        if self.ood:
            return pack(*self.session.run(list(OOD_OUTPUTS), {self.input_name: batch}, options))
        return self.session.run(None, {self.input_name: batch}, options)[0]


# A CPU run whose input is larger than this hands ONNX Runtime's arena back after it; a smaller one
# keeps it for the next. Shrinking after every run cost 13 ms a batch of 32 on the shipped
# cifar10 (15 % of the float graph's time, 42 % of the INT8 graph's: the memory comes back as
# fresh pages every run); kept, a batch of 128 CIFAR images (1.6 MB of input) holds 140-160 MB.
# A catsdogs batch of more than 4 photos (442 KB each at 192 px) shrinks: 128 of them take 1.5 GB.
ARENA_KEEP_INPUT_BYTES = 2 << 20


def run_options(device: str) -> Any:
    """ONNX Runtime run options: on the CPU provider, shrink the memory arena after the run, so
    the memory a big batch took goes back to the system (measured on catsdogs, a batch of 128:
    +33 MB retained instead of +346 MB; docs/SERVING.md)."""
    import onnxruntime as ort

    options = ort.RunOptions()
    if device == "cpu":
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


class TorchScriptBackend:
    def __init__(self, path: Path, device: str, threads: int = 0, ood: bool = False) -> None:
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = device
        self.ood = ood
        with warnings.catch_warnings():  # TorchScript is deprecated upstream; ONNX is our default
            warnings.simplefilter("ignore", FutureWarning)
            self.module = torch.jit.load(str(path), map_location=device).eval()
        if device == "cuda":  # half-precision activations and NHWC kernels on the GPU
            self.module = self.module.half().to(memory_format=torch.channels_last)
            scorer = getattr(getattr(self.module, "serving", None), "scorer", None)
            if ood and scorer is not None:  # distances in the thousands: the OOD statistics stay float32
                scorer.float()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device, non_blocking=True)
            if self.device == "cuda":
                x = x.half().contiguous(memory_format=torch.channels_last)
            return self.outputs(self.module(x))

    def outputs(self, out: Any) -> np.ndarray:
        """The module's output as a backend returns it: the probabilities, with the OOD score as a
        last column when the card has one (the scoring tool's CUDA runner uses it too)."""
        if isinstance(out, tuple):  # (probabilities, ood_score): a graph with an OOD score
            if not self.ood:
                return out[0].float().cpu().numpy()
            return pack(out[0].float().cpu().numpy(), out[1].float().cpu().numpy())
        if self.ood:
            raise RegistryError("the card has an ood section but the TorchScript graph returns one output")
        return out.float().cpu().numpy()


def gpu_backend_usable(backend: str) -> bool:
    """Whether ``backend`` (onnx | torchscript) can run on a CUDA GPU here: a GPU the driver sees,
    and for ONNX Runtime its CUDA provider (a CPU-only onnxruntime on a GPU host runs on the CPU)."""
    if not cuda_present():
        return False
    if backend == "onnx":
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers()
    return True


def cuda_present() -> bool:
    """Whether the CUDA driver sees a GPU, asked of the driver itself (``cuInit`` and
    ``cuDeviceGetCount`` through ctypes): milliseconds, where importing torch to ask takes seconds."""
    import ctypes
    import sys

    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        driver = ctypes.CDLL(name)
    except OSError:
        return False
    count = ctypes.c_int(0)
    return driver.cuInit(0) == 0 and driver.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
