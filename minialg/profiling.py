"""Measuring on a device: wall time (CUDA events on a GPU), peak memory, the matmul rate, which SDPA backend is
fastest for given attention shapes and which one ran, and whether a call makes the host wait."""

import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def sig(x: float) -> float:
    """x to 4 significant digits, for reports (fixed decimals would erase small ratios and rates)."""
    return float(f"{x:.4g}")


SDPA_KERNELS = {  # aten op -> its backend, as SDPBackend names it
    "_scaled_dot_product_cudnn_attention": "cudnn_attention", "_scaled_dot_product_flash_attention": "flash_attention",
    "_scaled_dot_product_efficient_attention": "efficient_attention",
    "_scaled_dot_product_flash_attention_for_cpu": "flash_attention", "_scaled_dot_product_attention_math": "math",
}


def time_ms(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of fn() after `warmup` calls: CUDA events on a GPU, perf_counter elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak GiB allocated on the GPU since the last reset; None on the CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def measure(fn, device: torch.device, warmup: int, repeats: int) -> tuple[float, float | None]:
    """(ms per call, peak GiB allocated on the GPU during the calls; None on the CPU)."""
    reset_peak_memory(device)
    ms = time_ms(fn, device, warmup, repeats)
    return ms, peak_memory_gib(device)


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The matmul rate of this device in `dtype`: a large square matmul (8192 on a GPU, 512 on the CPU)."""
    n = 8192 if device.type == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, warmup=3, repeats=20)
    return 2 * n**3 / ms / 1e9


def sdpa_order(lengths: list[tuple[int, int]], heads: int, head_dim: int, device, dtype, masked: bool = False,
               bias: bool = False) -> tuple:
    """Time every SDPA backend on the model's attention shapes (batch 1); returns (the backends that run them
    all, fastest first; {backend: ms for all shapes}). One that refuses a shape, or runs out of memory (the
    math kernel at video lengths), is left out. `masked`: the model passes a boolean key mask (HunyuanVideo),
    which some kernels refuse; with `bias`, a float one added to the logits instead (LTX-Video's text mask)."""
    times = {}
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH):
        try:
            total = 0.0
            for q_len, k_len in lengths:
                q = torch.randn(1, heads, q_len, head_dim, device=device, dtype=dtype)
                k, v = torch.randn(2, 1, heads, k_len, head_dim, device=device, dtype=dtype)
                mask = None if not masked else torch.zeros(1, 1, 1, k_len, dtype=dtype, device=device) if bias else \
                    torch.ones(1, 1, 1, k_len, dtype=torch.bool, device=device)
                with sdpa_kernel(backend), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # an unavailable backend warns why, then raises
                    total += time_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                     device, 1, 3)
            times[backend] = total
        except RuntimeError:  # torch.OutOfMemoryError included
            pass
        finally:
            q = k = v = mask = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    order = sorted(times, key=times.get)
    return order, {backend.name.lower(): sig(ms) for backend, ms in times.items()}


def sdpa_kernels_ran(fn) -> dict[str, int]:
    """Which SDPA kernels one call of fn ran, and how often (from the profiler's record of aten ops)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    counts = {}
    for event in profile.events():
        kernel = SDPA_KERNELS.get(event.name.removeprefix("aten::"))
        if kernel:
            counts[kernel] = counts.get(kernel, 0) + 1
    return counts


def host_sync(fn, device: torch.device) -> str | None:
    """The first host synchronisation fn makes on a GPU (torch's sync debug mode), or None when it makes none."""
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return None
    except RuntimeError as e:
        return str(e).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
