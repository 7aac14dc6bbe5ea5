"""fp8 weights kept in fp8: a 14B transformer in about 14 GB of memory instead of 28.

Checkpoints published in fp8 store the Linear weights of the transformer blocks in one byte each
(`float8_e4m3fn` or `float8_e5m2`, safetensors' F8_E4M3 / F8_E5M2). ComfyUI's "scaled fp8" files add one float32
`scale_weight` per such weight (the weight is fp8 * scale) and a `scaled_fp8` marker tensor. The norms, biases,
modulation tables, embeddings and the head stay in bf16 or float32 in those files, and load here in the compute
dtype as usual; only the block Linear weights stay fp8 in memory:

    loading:   the layer becomes an Fp8Linear whose `weight` (and `scale_weight`) keep the file's dtype
    each call: weight = fp8 -> input dtype (times the scale, in float32), for this matmul only; then F.linear

So the full-precision copy of one weight lives for one matmul. Block streaming (minialg.gpu.stream_blocks) packs
and moves the fp8 bytes like any other dtype, and torch.compile per block sees a cast (and a multiply) in front
of each matmul, which it fuses into the weight read.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import gpu

FP8 = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}  # safetensors dtype -> torch


class Fp8Linear(nn.Linear):
    """A Linear whose weight stays fp8; each call up-casts it (times `scale_weight` when there is one) to the
    dtype of its input. The bias is in the compute dtype, as in any Linear."""

    stored = ("weight", "scale_weight")  # parameters loaded in the file's own dtype (minialg.checkpoint.load)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale_weight is None:
            weight = self.weight.to(x.dtype)
        else:
            weight = (self.weight.float() * self.scale_weight.float()).to(x.dtype)
        return F.linear(x, weight, self.bias)


def keep_fp8(model: nn.Module, stored: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Make each block Linear (minialg.gpu.blocks_of) whose weight the files store in fp8 an Fp8Linear with an fp8
    weight slot, and a `scale_weight` slot where the files have one; on the meta device, before loading.
    `stored`: the module's tensor name -> (safetensors dtype, shape) of what the files hold."""
    in_blocks = {id(m) for block in gpu.blocks_of(model) for m in block.modules()}
    for name, module in model.named_modules():
        dtype = stored.get(f"{name}.weight", (None,))[0]
        if type(module) is not nn.Linear or id(module) not in in_blocks or dtype not in FP8:
            continue
        module.__class__ = Fp8Linear
        module.weight = nn.Parameter(torch.empty_like(module.weight, dtype=FP8[dtype]), requires_grad=False)
        scale = stored.get(f"{name}.scale_weight")
        if scale is None:
            module.register_parameter("scale_weight", None)
        else:  # one number, shaped [] or [1] in the files; any other shape is reported by the header check
            shape = scale[1] if torch.Size(scale[1]).numel() == 1 else ()
            module.scale_weight = nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)
