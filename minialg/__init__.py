"""minialg: a small, diffusers-free image-to-video sampler with Adaptive Low-pass Guidance.

    import minialg
    pipe = minialg.load("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", device="cuda", dtype="bfloat16")
    frames = pipe("city.png", "A car chase through narrow city streets at night.", alg={...})
"""

from .alg import ALGConfig
from .checkpoint import CheckpointError
from .pipeline import Pipeline
from .registry import check, load
from .comparison import compare  # noqa: E402  (baseline vs ALG; minialg.motion measures a video)

__all__ = ["ALGConfig", "CheckpointError", "Pipeline", "check", "compare", "load"]
