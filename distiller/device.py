"""Device-neutral compute settings: which device MLX runs on and which dtype to compute in."""

from __future__ import annotations

import mlx.core as mx


def device_name() -> str:
    """'gpu (metal)', 'gpu (cuda)' or 'cpu' for what MLX will run on by default."""
    device = mx.default_device()
    if device.type == mx.DeviceType.gpu:
        if mx.metal.is_available():
            return "gpu (metal)"
        return "gpu (cuda)"
    return "cpu"


def on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


def compute_dtype(model_dtype: mx.Dtype | None = None) -> mx.Dtype:
    """The dtype to run a model in on the current device.

    On CPU, fp16/bf16 and quantized matmuls take MLX's scalar path on x86 and run several
    times slower than float32 through BLAS, so we compute in float32. On Metal and CUDA the
    half-precision kernels are the fast ones, so the model keeps its own dtype.
    """
    if on_cpu():
        return mx.float32
    return model_dtype or mx.float16
