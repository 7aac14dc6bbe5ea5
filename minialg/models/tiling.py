"""Running a VAE on overlapping tiles and cross-fading the seams, as diffusers' tiled VAEs do.

Used by the CogVideoX, HunyuanVideo and LTX-Video VAEs: spatial tiles (rows x columns, each tile blended into the
one above and the one to its left) and, for HunyuanVideo, frame tiles (each blended into the one before).
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


def encode_in_tiles(video: torch.Tensor, encode: Run, ratio: int, tile_size, tile_stride) -> torch.Tensor:
    """Encode on tile_size-pixel tiles every tile_stride pixels (ratio: the spatial compression); the latent tiles
    are blended over (tile - stride) / ratio rows/columns and keep stride / ratio of them (HunyuanVideo, LTX)."""
    tile, stride = [s // ratio for s in tile_size], [s // ratio for s in tile_stride]
    extent = [t - s for t, s in zip(tile, stride)]
    h = run_in_tiles(video, encode, tile_size, tile_stride, extent, stride)
    return h[..., : video.shape[3] // ratio, : video.shape[4] // ratio]


def decode_in_tiles(z: torch.Tensor, decode: Run, ratio: int, tile_size, tile_stride) -> torch.Tensor:
    """Decode on latent tiles of tile_size / ratio every tile_stride / ratio (sizes in pixels); the video tiles are
    blended over tile_size - tile_stride pixels and keep tile_stride of them (HunyuanVideo, LTX)."""
    tile, stride = [s // ratio for s in tile_size], [s // ratio for s in tile_stride]
    extent = [t - s for t, s in zip(tile_size, tile_stride)]
    video = run_in_tiles(z, decode, tile, stride, extent, tile_stride)
    return video[..., : z.shape[3] * ratio, : z.shape[4] * ratio]


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
