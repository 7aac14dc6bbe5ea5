"""Image loading, Pillow-exact resizing, model input and mp4 writing vs Pillow / diffusers / PyAV."""

import os

import av
import numpy as np
import pytest
import torch
from PIL import Image

from minialg.media import load_image, resize, to_model_input, write_video


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus noise: JPEG/WebP-like content."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / 40.0
    smooth = np.stack([np.sin(3 * x + 1), np.cos(2 * y), np.sin(2 * x + 3 * y)], axis=-1) * 0.35 + 0.5
    return (np.clip(smooth + rng.normal(0, 0.08, smooth.shape), 0, 1) * 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# resize

SIZE_PAIRS = [  # (in_h, in_w, out_h, out_w): up, down, mixed, odd, tiny, and both Pillow pass orders
    (100, 150, 224, 336), (480, 832, 224, 388), (832, 480, 388, 224), (7, 5, 13, 11), (50, 70, 17, 9),
    (300, 200, 33, 401), (200, 300, 401, 33), (90, 60, 50, 50), (60, 90, 50, 50), (1, 1, 3, 2), (5, 1000, 5, 3),
    (123, 77, 1, 1), (64, 64, 64, 64),
]


@pytest.mark.parametrize("filter,code", [("bicubic", 3), ("bilinear", 2), ("lanczos", 1)])
def test_resize_bit_exact_with_pillow(filter, code):
    rng = np.random.default_rng(code)
    for in_h, in_w, out_h, out_w in SIZE_PAIRS:
        image = rng.integers(0, 256, (in_h, in_w, 3), dtype=np.uint8)
        expected = np.asarray(Image.fromarray(image).resize((out_w, out_h), code))
        got = resize(torch.from_numpy(image), out_h, out_w, filter)
        assert got.dtype == torch.uint8 and got.shape == (out_h, out_w, 3)
        mismatches = int((got.numpy() != expected).sum())
        assert mismatches == 0, f"{filter} {in_h}x{in_w} -> {out_h}x{out_w}: {mismatches} pixels differ"


def test_resize_bit_exact_random_sizes():
    rng = np.random.default_rng(42)
    for _ in range(40):
        in_h, in_w, out_h, out_w = (int(v) for v in rng.integers(1, 160, 4))
        image = rng.integers(0, 256, (in_h, in_w, 3), dtype=np.uint8)
        expected = np.asarray(Image.fromarray(image).resize((out_w, out_h), Image.Resampling.BICUBIC))
        got = resize(torch.from_numpy(image), out_h, out_w).numpy()
        assert np.array_equal(got, expected), (in_h, in_w, out_h, out_w)


def test_resize_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        resize(torch.zeros(4, 4, 3), 2, 2)
    with pytest.raises(ValueError, match="filter"):
        resize(torch.zeros(4, 4, 3, dtype=torch.uint8), 2, 2, "nearest")


# ----------------------------------------------------------------------------------------------------------
# load_image

def pillow_rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "LA"])
def test_load_png_exact(tmp_path, mode):
    rng = np.random.default_rng(1)
    rgba = np.concatenate([smooth_image(33, 47), rng.integers(0, 256, (33, 47, 1), dtype=np.uint8)], axis=-1)
    Image.fromarray(rgba if "A" in mode else rgba[..., :3]).convert(mode).save(tmp_path / "a.png")
    got = load_image(tmp_path / "a.png")
    assert got.dtype == torch.uint8 and got.shape == (33, 47, 3)
    assert np.array_equal(got.numpy(), pillow_rgb(tmp_path / "a.png"))


@pytest.mark.parametrize("subsampling", [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0
@pytest.mark.parametrize("size", [(64, 96), (37, 51)])
def test_load_jpeg_close_to_pillow(tmp_path, subsampling, size):
    """Chroma upsampling and colour conversion follow libjpeg exactly; FFmpeg's IDCT rounds differently from
    libjpeg-turbo's, so a few percent of the values are off by 1 to 3 levels."""
    noise = np.random.default_rng(2).integers(0, 256, (*size, 3), np.uint8)
    for seed, image in enumerate([smooth_image(*size), noise]):
        Image.fromarray(image).save(tmp_path / "a.jpg", quality=90, subsampling=subsampling)
        diff = np.abs(load_image(tmp_path / "a.jpg").numpy().astype(int) - pillow_rgb(tmp_path / "a.jpg"))
        print(f"jpeg {size} subsampling {subsampling} image {seed}: max {diff.max()} mean {diff.mean():.3f}")
        assert diff.max() <= 4 and diff.mean() < 0.15


@pytest.mark.parametrize("subsampling", [0, 1, 2])
def test_load_jpeg_exact_where_the_idct_is(tmp_path, subsampling):
    """Flat 16x16 blocks: every IDCT is exact, so what remains (chroma upsampling across block edges, colour
    conversion) must match libjpeg bit for bit."""
    blocks = np.random.default_rng(subsampling).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(blocks.repeat(16, 0).repeat(16, 1)[:75, :105]).save(tmp_path / "b.jpg", quality=100,
                                                                        subsampling=subsampling)
    assert np.array_equal(load_image(tmp_path / "b.jpg").numpy(), pillow_rgb(tmp_path / "b.jpg"))


def test_load_gray_jpeg_close_to_pillow(tmp_path):
    Image.fromarray(smooth_image(40, 60)[..., 0]).save(tmp_path / "g.jpg", quality=90)
    diff = np.abs(load_image(tmp_path / "g.jpg").numpy().astype(int) - pillow_rgb(tmp_path / "g.jpg"))
    print(f"gray jpeg: max {diff.max()} mean {diff.mean():.3f}")
    assert diff.max() <= 2 and diff.mean() < 0.15


@pytest.mark.parametrize("lossless", [False, True])
def test_load_webp_exact(tmp_path, lossless):
    for image in [smooth_image(35, 53), np.random.default_rng(3).integers(0, 256, (36, 54, 3), np.uint8)]:
        Image.fromarray(image).save(tmp_path / "a.webp", quality=90, lossless=lossless)
        assert np.array_equal(load_image(tmp_path / "a.webp").numpy(), pillow_rgb(tmp_path / "a.webp"))


def test_load_arrays():
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (5, 7, 1), dtype=np.uint8)], axis=-1)
    gray = rgb[..., 0]
    assert np.array_equal(load_image(rgb).numpy(), rgb)
    assert np.array_equal(load_image(torch.from_numpy(rgb)).numpy(), rgb)
    assert np.array_equal(load_image(rgba).numpy(), np.asarray(Image.fromarray(rgba).convert("RGB")))
    assert np.array_equal(load_image(gray).numpy(), np.asarray(Image.fromarray(gray).convert("RGB")))
    assert np.array_equal(load_image(gray[..., None]).numpy(), np.asarray(Image.fromarray(gray).convert("RGB")))
    with pytest.raises(ValueError, match="uint8"):
        load_image(rgb.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(H, W"):
        load_image(np.zeros((5, 7, 2), np.uint8))


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file") as missing:
        load_image(tmp_path / "missing.png")
    assert "missing.png" in str(missing.value) and "\n" not in str(missing.value)
    (tmp_path / "text.png").write_text("this is not an image\n" * 20)
    (tmp_path / "empty.jpg").write_bytes(b"")
    Image.fromarray(smooth_image(20, 20)).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:40])
    for name in ["text.png", "empty.jpg", "cut.png"]:
        with pytest.raises(ValueError, match="cannot load image") as bad:
            load_image(tmp_path / name)
        assert name in str(bad.value) and "\n" not in str(bad.value)
    with pytest.raises(ValueError, match="no such file"):
        load_image(tmp_path)  # a folder


# ----------------------------------------------------------------------------------------------------------
# to_model_input

@pytest.mark.parametrize("size", [(32, 48), (480, 832)])
def test_to_model_input_matches_video_processor(size):
    from diffusers.video_processor import VideoProcessor

    image = smooth_image(*size)
    expected = VideoProcessor(vae_scale_factor=8).preprocess(Image.fromarray(image), height=size[0], width=size[1])
    got = to_model_input(torch.from_numpy(image))
    assert got.shape == expected.shape == (1, 3, *size) and got.dtype == torch.float32
    assert torch.equal(got, expected)


# ----------------------------------------------------------------------------------------------------------
# write_video

def read_video(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        info = (stream.codec_context.name, stream.average_rate, stream.width, stream.height, stream.pix_fmt)
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    return info, frames


def test_write_video_round_trip(tmp_path):
    y, x = torch.meshgrid(torch.arange(48) / 40, torch.arange(64) / 40, indexing="ij")
    image = torch.stack([torch.sin(3 * x + 1), torch.cos(2 * y), torch.sin(2 * x + 3 * y)], dim=-1) * 0.35 + 0.5
    frames = image[None] * torch.linspace(0.3, 1, 9)[:, None, None, None]  # (9, 48, 64, 3), fading in
    path = tmp_path / "out.mp4"
    write_video(frames, path, fps=16)
    (codec, rate, width, height, pix_fmt), decoded = read_video(path)
    assert (codec, rate, width, height, pix_fmt) == ("h264", 16, 64, 48, "yuv420p")
    assert decoded.shape == (9, 48, 64, 3)
    expected = (frames * 255).to(torch.uint8).numpy().astype(float)  # export_to_video's conversion
    diff = np.abs(decoded - expected)
    brightness = np.abs(decoded.mean(axis=(1, 2, 3)) - expected.mean(axis=(1, 2, 3)))  # frame order and fade
    print(f"video round trip: mean abs {diff.mean():.2f} levels, max {diff.max()}; frame means off by "
          f"{brightness.max():.2f}")
    assert diff.mean() < 3 and brightness.max() < 1.5  # lossy: yuv420p chroma, H.264 at crf 18
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]  # no temporary file left


def test_write_video_odd_size_pads_to_even(tmp_path):
    frames = torch.rand(3, 33, 47, 3)
    write_video(frames, tmp_path / "odd.mp4", fps=8)
    (codec, rate, width, height, _), decoded = read_video(tmp_path / "odd.mp4")
    assert (codec, rate, width, height) == ("h264", 8, 48, 34) and decoded.shape[0] == 3


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import minialg.media

    frames = torch.rand(2, 16, 16, 3)
    with pytest.raises(av.error.FFmpegError):
        write_video(frames, tmp_path / "bad.mp4", fps=16, crf=-5)  # libx264 refuses the option when it opens
    assert list(tmp_path.iterdir()) == []

    written = []

    def failing_replace(src, dst):  # the video is complete in the temporary file, then the rename fails
        written.append(os.path.getsize(src))
        raise OSError("rename failed")

    (tmp_path / "keep.mp4").write_bytes(b"old")
    monkeypatch.setattr(minialg.media.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        write_video(frames, tmp_path / "keep.mp4", fps=16)
    monkeypatch.undo()
    assert written and written[0] > 100
    assert (tmp_path / "keep.mp4").read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(ValueError, match="frames"):
        write_video(torch.rand(2, 16, 16, 4), tmp_path / "x.mp4", fps=16)
    with pytest.raises(OSError):
        write_video(frames, tmp_path / "no" / "such" / "folder.mp4", fps=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.mp4"]


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pillow_does(tmp_path, fmt, orientation):
    """A rotated or mirrored photo comes upright, equal to Pillow's exif_transpose (what diffusers' load_image
    applies); JPEG decodes within the known 3 levels of libjpeg, PNG and lossless WebP exactly."""
    from PIL import Image, ImageOps

    pixels = (np.random.default_rng(orientation).random((20, 30, 3)) * 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"photo.{fmt}"
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), **({"lossless": True} if fmt == "webp" else {}))
    with Image.open(path) as im:
        expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    got = load_image(path).numpy()
    assert got.shape == expected.shape == ((30, 20, 3) if orientation >= 5 else (20, 30, 3))
    assert np.abs(got.astype(int) - expected).max() <= (3 if fmt == "jpeg" else 0)
