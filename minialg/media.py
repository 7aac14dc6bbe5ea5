"""Image in, video out: decode an image (PyAV), resize it exactly as Pillow does, write a video (H.264 mp4 or
mkv, VP9 webm, or GIF, by the extension) or a PNG."""

import math
import os
import uuid
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

# ---------------------------------------------------------------------------------------------------------
# Loading

def load_image(image: "str | os.PathLike | np.ndarray | torch.Tensor") -> torch.Tensor:
    """A path (PNG, JPEG, WebP, ...) or an HWC uint8 array/tensor -> (H, W, 3) uint8 RGB tensor.
    Alpha is dropped and gray is repeated to three channels, as Pillow's convert("RGB") does. A file's EXIF
    orientation is applied (a phone photo comes upright), as diffusers' load_image does."""
    if isinstance(image, (str, os.PathLike)):
        return orient(_decode(Path(image)), exif_orientation(Path(image)))
    x = torch.as_tensor(np.asarray(image)) if not isinstance(image, torch.Tensor) else image
    if x.dtype != torch.uint8:
        raise ValueError(f"image array must be uint8, got {x.dtype}")
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[2] not in (1, 3, 4):
        raise ValueError(f"image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {tuple(x.shape)}")
    return x[..., :3].expand(-1, -1, 3).contiguous() if x.shape[2] == 1 else x[..., :3].contiguous()


def _decode(path: Path) -> torch.Tensor:
    """Decode with FFmpeg; YUV images are converted to RGB here the way libjpeg / libwebp (Pillow's decoders)
    do it, since swscale's chroma upsampling differs from theirs by up to tens of levels."""
    if not path.is_file():
        raise ValueError(f"cannot load image {path}: no such file")
    try:
        with av.open(str(path)) as container:
            codec = container.streams.video[0].codec_context.name
            frame = next(container.decode(video=0))
    except (av.error.FFmpegError, IndexError, StopIteration) as e:
        raise ValueError(f"cannot load image {path}: not a decodable image ({e})") from None
    layout = frame.format.name.replace("yuvj", "yuv")
    if codec == "mjpeg" and layout in ("yuv444p", "yuv422p", "yuv420p"):  # colour JPEG
        y, cb, cr = (_plane(p) for p in frame.planes[:3])
        cb, cr = (_jpeg_upsample(c, rows=layout == "yuv420p", cols=layout != "yuv444p") for c in (cb, cr))
        return _jpeg_to_rgb(y, cb[: y.shape[0], : y.shape[1]], cr[: y.shape[0], : y.shape[1]])
    if codec == "webp" and layout in ("yuv420p", "yuva420p"):  # lossy WebP (VP8)
        y, u, v = (_plane(p) for p in frame.planes[:3])
        u, v = (_webp_upsample(c)[: y.shape[0], : y.shape[1]] for c in (u, v))
        return _webp_to_rgb(y, u, v)
    return torch.from_numpy(frame.to_ndarray(format="rgb24"))


def exif_orientation(path: Path) -> int:
    """The EXIF orientation tag (1 to 8; 1 = upright) of a JPEG (APP1), PNG (eXIf) or WebP (EXIF) file, else 1."""
    data = path.read_bytes()
    tiff = None
    if data[:2] == b"\xff\xd8":  # JPEG: segments FF xx, 2-byte big-endian length, until the image data
        i = 2
        while i + 4 <= len(data) and data[i] == 0xFF and data[i + 1] not in (0xD9, 0xDA):
            length = int.from_bytes(data[i + 2:i + 4], "big")
            if data[i + 1] == 0xE1 and data[i + 4:i + 10] == b"Exif\0\0":
                tiff = data[i + 10:i + 2 + length]
                break
            i += 2 + length
    elif data[:8] == b"\x89PNG\r\n\x1a\n":  # PNG: chunks of 4-byte length, 4-byte type, data, CRC
        i = 8
        while i + 8 <= len(data) and tiff is None:
            length = int.from_bytes(data[i:i + 4], "big")
            tiff = data[i + 8:i + 8 + length] if data[i + 4:i + 8] == b"eXIf" else None
            i += 12 + length
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":  # WebP: chunks of fourcc, 4-byte LE size, even padding
        i = 12
        while i + 8 <= len(data) and tiff is None:
            size = int.from_bytes(data[i + 4:i + 8], "little")
            tiff = data[i + 8:i + 8 + size].removeprefix(b"Exif\0\0") if data[i:i + 4] == b"EXIF" else None
            i += 8 + size + size % 2
    if not tiff or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "little" if tiff[:2] == b"II" else "big"  # TIFF: byte order, 42, offset of the first directory
    ifd = int.from_bytes(tiff[4:8], order)
    for k in range(int.from_bytes(tiff[ifd:ifd + 2], order) if ifd + 2 <= len(tiff) else 0):
        entry = tiff[ifd + 2 + 12 * k:ifd + 14 + 12 * k]  # tag, type, count, value (a SHORT: its first 2 bytes)
        if len(entry) == 12 and int.from_bytes(entry[:2], order) == 0x0112:
            value = int.from_bytes(entry[8:10], order)
            return value if 1 <= value <= 8 else 1
    return 1


def orient(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """Turn a decoded (H, W, C) image upright for its EXIF orientation (what Pillow's exif_transpose does)."""
    transforms = {
        1: lambda t: t,
        2: lambda t: t.flip(1),  # mirrored left-right
        3: lambda t: t.flip(0).flip(1),  # upside down
        4: lambda t: t.flip(0),  # mirrored top-bottom
        5: lambda t: t.transpose(0, 1),  # mirrored along the main diagonal
        6: lambda t: t.rot90(-1, (0, 1)),  # stored turned a quarter counter-clockwise: turn it clockwise
        7: lambda t: t.transpose(0, 1).flip(0).flip(1),  # mirrored along the other diagonal
        8: lambda t: t.rot90(1, (0, 1)),  # stored turned a quarter clockwise: turn it counter-clockwise
    }
    return transforms[orientation](x).contiguous()


def _plane(plane: "av.video.plane.VideoPlane") -> torch.Tensor:
    rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
    return torch.from_numpy(rows[:, : plane.width].astype(np.int32))  # (h, w)


def _shifted(c: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """c's neighbours before and after along dim, edges replicated."""
    n = c.shape[dim]
    before = torch.cat([c.narrow(dim, 0, 1), c.narrow(dim, 0, n - 1)], dim)
    after = torch.cat([c.narrow(dim, 1, n - 1), c.narrow(dim, n - 1, 1)], dim)
    return before, after


def _jpeg_upsample(c: torch.Tensor, rows: bool, cols: bool) -> torch.Tensor:
    """libjpeg's "fancy" chroma upsampling: each new sample is 3/4 nearest + 1/4 next nearest, per direction,
    in integers (the vertical sums stay unrounded, x4) with its alternating rounding biases."""
    if not cols:
        return c
    bias, shift = (1, 2), 2
    if rows:  # (h, w) -> (2h, w), scaled by 4
        above, below = _shifted(c, 0)
        c = torch.stack([3 * c + above, 3 * c + below], dim=1).flatten(0, 1)
        bias, shift = (8, 7), 4
    left, right = _shifted(c, 1)
    return torch.stack([(3 * c + left + bias[0]) >> shift, (3 * c + right + bias[1]) >> shift], 2).flatten(1)


def _jpeg_to_rgb(y: torch.Tensor, cb: torch.Tensor, cr: torch.Tensor) -> torch.Tensor:
    """libjpeg's full-range YCbCr -> RGB: 1.402, 0.34414, 0.71414, 1.772 in 16-bit fixed point."""
    cb, cr = cb - 128, cr - 128
    r = y + ((91881 * cr + 32768) >> 16)
    g = y + ((-22554 * cb - 46802 * cr + 32768) >> 16)
    b = y + ((116130 * cb + 32768) >> 16)
    return torch.stack([r, g, b], dim=-1).clamp(0, 255).to(torch.uint8)  # (H, W, 3)


def _webp_upsample(c: torch.Tensor) -> torch.Tensor:
    """libwebp's fancy upsampling of a 4:2:0 plane (h, w) -> (2h, 2w): the same 9-3-3-1 weights as libjpeg,
    rounded in two steps through the two diagonal averages."""
    c = torch.cat([c[:1], c, c[-1:]])  # (h + 2, w): replicate edge rows
    c = torch.cat([c[:, :1], c, c[:, -1:]], dim=1)  # (h + 2, w + 2)
    a, b = c[:-1, :-1], c[:-1, 1:]  # top-left, top-right of each 2x2 window
    l, r = c[1:, :-1], c[1:, 1:]  # bottom-left, bottom-right
    total = a + b + l + r + 8
    diag_br = (total + 2 * (b + l)) >> 3
    diag_ad = (total + 2 * (a + r)) >> 3
    top = torch.stack([(diag_br + a) >> 1, (diag_ad + b) >> 1], dim=2).flatten(1)  # (h + 1, 2w + 2)
    bottom = torch.stack([(diag_ad + l) >> 1, (diag_br + r) >> 1], dim=2).flatten(1)
    return torch.stack([top, bottom], dim=1).flatten(0, 1)[1:-1, 1:-1]  # (2h, 2w)


def _webp_to_rgb(y: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """libwebp's limited-range BT.601 YUV -> RGB: 14-bit fixed-point products, 6 fractional bits kept."""
    luma = (y * 19077) >> 8
    r = luma + ((v * 26149) >> 8) - 14234
    g = luma - ((u * 6419) >> 8) - ((v * 13320) >> 8) + 8708
    b = luma + ((u * 33050) >> 8) - 17685
    return (torch.stack([r, g, b], dim=-1) >> 6).clamp(0, 255).to(torch.uint8)  # (H, W, 3)


# ---------------------------------------------------------------------------------------------------------
# Resizing, bit-exact with Pillow's Image.resize: a separable convolution, one pass per axis, with weights in
# fixed point (22 fractional bits) and the image rounded and clipped to uint8 after each pass.

def _bicubic(x: torch.Tensor) -> torch.Tensor:
    x = x.abs()  # Keys' cubic with a = -0.5
    near = (1.5 * x - 2.5) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5
    return torch.where(x < 1, near, torch.where(x < 2, far, 0.0))


def _bilinear(x: torch.Tensor) -> torch.Tensor:
    x = x.abs()
    return torch.where(x < 1, 1.0 - x, 0.0)


def _sinc(x: torch.Tensor) -> torch.Tensor:
    px = x * math.pi
    return torch.where(x == 0, 1.0, torch.sin(px) / px)


def _lanczos(x: torch.Tensor) -> torch.Tensor:
    return torch.where((x >= -3) & (x < 3), _sinc(x) * _sinc(x / 3), 0.0)


FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0), "lanczos": (_lanczos, 3.0)}  # fn, support
PIL_FILTERS = {1: "lanczos", 2: "bilinear", 3: "bicubic"}  # Pillow's Image.Resampling codes -> names
PRECISION_BITS = 32 - 8 - 2


def resize(image: torch.Tensor, height: int, width: int, filter: str = "bicubic") -> torch.Tensor:
    """(H, W, C) uint8 -> (height, width, C) uint8, equal to Pillow's image.resize((width, height), filter)."""
    if image.dtype != torch.uint8:
        raise ValueError(f"resize expects a uint8 image, got {image.dtype}")
    if filter not in FILTERS:
        raise ValueError(f"unknown resize filter {filter!r}; expected one of {sorted(FILTERS)}")
    in_height, in_width = image.shape[:2]
    x = image
    # Pillow 13 runs the vertical pass first when the height shrinks by over twice as many pixels as the width
    if height < in_height and in_height - height > 2 * (in_width - width):
        x = _resample(x.transpose(0, 1), height, filter).transpose(0, 1)  # (height, W, C)
    if width != in_width:
        x = _resample(x, width, filter)  # (H or height, width, C)
    if x.shape[0] != height:
        x = _resample(x.transpose(0, 1), height, filter).transpose(0, 1)  # (height, width, C)
    return x.contiguous()


def _resample(x: torch.Tensor, out_size: int, filter: str) -> torch.Tensor:
    """Resample dim 1 of (N, L, C) uint8 to out_size."""
    first, weights = _weights(x.shape[1], out_size, filter)  # (out,), (out, taps)
    taps = torch.arange(weights.shape[1])
    index = (first[:, None] + taps).clamp(max=x.shape[1] - 1)  # (out, taps); clamped taps have weight 0
    acc = torch.full((x.shape[0], out_size, x.shape[2]), 1 << (PRECISION_BITS - 1), dtype=torch.int32)
    pixels = x.int()
    for t in range(weights.shape[1]):
        acc += pixels[:, index[:, t]] * weights[:, t, None]  # (N, out, C)
    return (acc >> PRECISION_BITS).clamp(0, 255).to(torch.uint8)


def _weights(in_size: int, out_size: int, filter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """First input index and fixed-point weights of each output sample, computed in float64 in Pillow's
    order of operations (so the rounding to integers matches)."""
    fn, support = FILTERS[filter]
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)  # downscaling widens the filter
    support = support * filter_scale
    num_taps = math.ceil(support) * 2 + 1
    center = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale  # (out,)
    first = (center - support + 0.5).trunc().clamp(min=0).long()
    count = (center + support + 0.5).trunc().clamp(max=in_size).long() - first
    taps = torch.arange(num_taps)
    pos = (first[:, None] + taps).double()  # (out, taps)
    w = fn((pos - center[:, None] + 0.5) * (1.0 / filter_scale))
    w = torch.where(taps < count[:, None], w, 0.0)
    total = torch.zeros(out_size, dtype=torch.float64)
    for t in range(num_taps):  # sequential sum, as Pillow adds them
        total = total + w[:, t]
    w = torch.where(total[:, None] != 0, w / total[:, None], w)
    w = w * (1 << PRECISION_BITS)
    return first, torch.where(w < 0, w - 0.5, w + 0.5).trunc().int()


# ---------------------------------------------------------------------------------------------------------
# Model input and video output

def to_model_input(image: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [-1, 1] (diffusers' VaeImageProcessor, no resize)."""
    x = image.permute(2, 0, 1).float() / 255.0
    return (2.0 * x - 1.0).unsqueeze(0)


# extension -> (container format, encoder, pixel format, encoder options); crf is filled in for H.264
VIDEO_FORMATS = {
    ".mp4": ("mp4", "libx264", "yuv420p", {}),
    ".mkv": ("matroska", "libx264", "yuv420p", {}),
    ".webm": ("webm", "libvpx-vp9", "yuv420p", {"crf": "24", "b": "0", "deadline": "good", "cpu-used": "4",
                                                 "row-mt": "1"}),  # constant quality, about as sharp as crf 18
    ".gif": ("gif", "gif", "pal8", {}),  # one 256-colour palette for the whole clip (median cut)
}


def write_image(image: torch.Tensor, path: "str | os.PathLike") -> None:
    """(H, W, 3) uint8 -> a PNG file (PyAV's encoder: no Pillow), which load_image reads back exactly."""
    with av.open(str(path), mode="w", format="image2") as container:
        stream = container.add_stream("png", rate=1)
        stream.height, stream.width, stream.pix_fmt = image.shape[0], image.shape[1], "rgb24"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(image.contiguous().numpy(), format="rgb24")))
        container.mux(stream.encode(None))


def video_format(path: "str | os.PathLike") -> tuple[str, str, str, dict]:
    """The container and codec that `path`'s extension asks for; a one-line ValueError for any other."""
    extension = Path(path).suffix.lower()
    if extension not in VIDEO_FORMATS:
        raise ValueError(f"cannot write {Path(path).name}: the extension {extension or '(none)'!r} is not a video "
                         f"format minialg writes; use one of {', '.join(VIDEO_FORMATS)}")
    return VIDEO_FORMATS[extension]


def write_video(frames: torch.Tensor, path: "str | os.PathLike", fps: float, crf: int = 18) -> None:
    """(F, H, W, 3) float32 in [0, 1] -> a video at path in the format its extension names (VIDEO_FORMATS):
    .mp4 / .mkv H.264 (libx264, yuv420p, `crf`), .webm VP9, .gif with one 256-colour palette. Written
    atomically: into a temporary file beside it, renamed at the end; on any error (or an interrupt) the
    temporary file is removed.

    Frames become uint8 as diffusers' export_to_video does it (x * 255, truncated). yuv420p needs even sizes:
    an odd height or width gets its last row or column repeated once (GIF keeps the size)."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (F, H, W, 3), got {tuple(frames.shape)}")
    path = Path(path)
    container_format, codec, pix_fmt, options = video_format(path)
    pixels = (frames.detach().float().cpu().clamp(0, 1) * 255).to(torch.uint8)  # (F, H, W, 3)
    if pix_fmt == "yuv420p":
        if pixels.shape[1] % 2:
            pixels = torch.cat([pixels, pixels[:, -1:]], dim=1)
        if pixels.shape[2] % 2:
            pixels = torch.cat([pixels, pixels[:, :, -1:]], dim=2)
    if codec == "libx264":
        options = dict(options, crf=str(crf))
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with av.open(str(tmp), mode="w", format=container_format) as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.height, stream.width = pixels.shape[1], pixels.shape[2]
            stream.pix_fmt = pix_fmt
            stream.options = options
            for index, frame in enumerate(_frames(pixels, pix_fmt)):
                frame.pts = index
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))  # flush the encoder
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _frames(pixels: torch.Tensor, pix_fmt: str):
    """(F, H, W, 3) uint8 -> PyAV frames: RGB, or palette indices with the clip's palette for pal8.

    The palette is found on a histogram of the clip's colours in cells of 6 bits per channel (at most 64^3),
    each cell standing for its pixels' mean colour; each pixel takes the palette colour nearest that mean."""
    if pix_fmt != "pal8":
        for rgb in pixels.contiguous().numpy():
            yield av.VideoFrame.from_ndarray(rgb, format="rgb24")
        return
    keys = ((pixels >> 2).int() * torch.tensor([4096, 64, 1], dtype=torch.int32)).sum(-1, dtype=torch.int32)
    counts = torch.bincount(keys.flatten(), minlength=1 << 18)  # (64^3,): a histogram of 6-bit RGB cells
    present = counts.nonzero()[:, 0]  # (M,)
    flat = keys.flatten()
    sums = torch.stack([torch.bincount(flat, pixels[..., c].flatten().double(), 1 << 18)[present]
                        for c in range(3)], dim=1)
    centres = (sums / counts[present, None]).float()  # (M, 3): the mean colour in each cell
    palette = _median_cut(centres, counts[present].float())  # (n <= 256, 3)
    lut = torch.zeros(1 << 18, dtype=torch.uint8)
    distance = -2 * centres @ palette.T + (palette * palette).sum(1)  # (M, n): |c - p|^2 - |c|^2
    lut[present] = distance.argmin(dim=1).to(torch.uint8)
    argb = np.zeros((256, 4), np.uint8)  # PyAV's pal8 palette: one (A, R, G, B) row per index
    argb[: len(palette), 0] = 255
    argb[: len(palette), 1:] = palette.round().clamp(0, 255).to(torch.uint8).numpy()
    for key in keys:
        yield av.VideoFrame.from_ndarray((lut[key].numpy(), argb), format="pal8")


def _median_cut(colors: torch.Tensor, weights: torch.Tensor, size: int = 256) -> torch.Tensor:
    """Heckbert's median cut on weighted colours (M, 3): split the box with the largest weighted squared spread
    along its widest channel at that channel's weighted median, until there are `size` boxes (or every box
    holds one colour). Returns each box's weighted mean colour: (n <= size, 3) float."""

    def box(c, w):  # (colours, weights, score, widest channel)
        mean = (w[:, None] * c).sum(0) / w.sum()
        spread = (w[:, None] * (c - mean) ** 2).sum(0)
        return c, w, spread.max().item(), int(spread.argmax())

    boxes = [box(colors, weights)]
    while len(boxes) < size:
        k = max(range(len(boxes)), key=lambda j: boxes[j][2])
        c, w, score, channel = boxes[k]
        if score <= 0:
            break
        order = c[:, channel].argsort()
        c, w = c[order], w[order]
        cumulative = w.cumsum(0)
        cut = int(torch.searchsorted(cumulative, cumulative[-1] / 2).clamp(0, len(c) - 2)) + 1
        boxes[k: k + 1] = [box(c[:cut], w[:cut]), box(c[cut:], w[cut:])]
    return torch.stack([(w[:, None] * c).sum(0) / w.sum() for c, w, _, _ in boxes])
