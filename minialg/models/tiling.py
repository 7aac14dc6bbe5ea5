"""Running a VAE on overlapping tiles and cross-fading the seams, as diffusers' tiled VAEs do.

Used by the CogVideoX and HunyuanVideo VAEs: spatial tiles (rows x columns, each tile blended into the one above
and the one to its left) and, for HunyuanVideo, frame tiles (each blended into the one before).
"""

from typing import Callable

import torch

Run = Callable[[torch.Tensor], torch.Tensor]


def blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> None:
    """Cross-fade, in place, b's first `extent` rows (along dim) from the last `extent` rows of a.

    Row y becomes a's row * (extent - y) / extent + b's row * y / extent, with the reference's roundings: each
    weight rounded once to float32 ((extent - y) / extent, not 1 - y / extent), each product rounded to b's dtype.
    """
    extent = min(a.shape[dim], b.shape[dim], extent)
    shape = [1] * b.ndim
    shape[dim] = extent
    rows = torch.arange(extent, device=b.device, dtype=torch.float32).view(shape)
    head = b.narrow(dim, 0, extent)
    tail = a.narrow(dim, a.shape[dim] - extent, extent)
    head.copy_((tail * ((extent - rows) / extent)).to(b.dtype) + (head * (rows / extent)).to(b.dtype))


def run_in_tiles(
    x: torch.Tensor,
    run: Run,
    tile: tuple[int, int],
    stride: tuple[int, int],
    extent: tuple[int, int],
    keep: tuple[int, int],
) -> torch.Tensor:
    """Run on overlapping (tile)-sized tiles every (stride) pixels of x, blend each output tile into the one above
    and the one to its left over (extent) rows/columns, keep the first (keep) rows/columns of each, and join them.
    """
    height, width = x.shape[-2:]
    rows = [
        [run(x[..., i : i + tile[0], j : j + tile[1]]) for j in range(0, width, stride[1])]
        for i in range(0, height, stride[0])
    ]
    for i, row in enumerate(rows):
        for j, out in enumerate(row):
            if i > 0:
                blend(rows[i - 1][j], out, extent[0], dim=3)
            if j > 0:
                blend(row[j - 1], out, extent[1], dim=4)
    return torch.cat([torch.cat([out[..., : keep[0], : keep[1]] for out in row], dim=4) for row in rows], dim=3)


def run_in_frame_tiles(x: torch.Tensor, run: Run, tile: int, stride: int, extent: int, keep: int) -> torch.Tensor:
    """Run a causal video model on overlapping frame tiles of x (B, C, T, ...) and join them along time.

    A tile starts every `stride` frames and holds 1 + `tile` frames; the output of every tile but the first loses
    its first frame (which only repeats the frame before). Each output is blended into the one before over
    `extent` frames; the first keeps 1 + `keep` frames, the others `keep`.
    """
    outs = []
    for start in range(0, x.shape[2], stride):
        out = run(x[:, :, start : start + tile + 1])
        outs.append(out if start == 0 else out[:, :, 1:])
    for before, out in zip(outs, outs[1:]):
        blend(before, out, extent, dim=2)
    return torch.cat([outs[0][:, :, : keep + 1]] + [out[:, :, :keep] for out in outs[1:]], dim=2)
