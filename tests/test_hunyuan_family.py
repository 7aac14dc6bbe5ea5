"""HunyuanVideo-I2V around the loop: the real layout checked from headers (sparse files, published tensor names),
the presets and the authors' command line, the offline demo, the memory defaults, and block streaming and
regional compilation on its two kinds of blocks."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import minialg
from minialg import checkpoint
from minialg.checkpoint import CheckpointError, config_from
from minialg.config import bucket_size, load_config, parse_config
from minialg.demo import demo_image, write_bpe_tokenizers, write_tiny
from minialg.families.hunyuan import HunyuanVideo
from minialg.gpu import blocks_of, compile_blocks, stream_blocks
from minialg.models.hunyuan import HunyuanVideoTransformer, HunyuanVideoTransformerConfig
from test_cli import read_video
from test_llava import published_name, reference_on_meta
from test_real_layout import write_component, write_sparse

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT / "minialg" / "real_configs" / "HunyuanVideo-I2V"
LAYOUT = {"transformer": ("diffusion_pytorch_model", 6, torch.bfloat16), "vae": ("diffusion_pytorch_model", 1,
                                                                                  torch.float32),
          "text_encoder": ("model", 4, torch.float16), "text_encoder_2": ("model", 1, torch.float16)}


def reference_tensors(component: str) -> dict:
    """Names, shapes and dtypes of the published files, from diffusers'/transformers' classes on meta."""
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config = {k: v for k, v in json.loads((REAL / component / "config.json").read_text()).items()
              if not k.startswith("_") and k not in ("architectures", "model_type")}
    with torch.device("meta"):
        if component == "text_encoder":  # written by transformers 4: language_model.model.*, vision_tower.vision_model.*
            state = {published_name(n): t for n, t in reference_on_meta().state_dict().items()}
        else:
            model = {"transformer": lambda: HunyuanVideoTransformer3DModel(**config),
                     "vae": lambda: AutoencoderKLHunyuanVideo(**config),
                     "text_encoder_2": lambda: CLIPTextModel(CLIPTextConfig(**config))}[component]()
            state = {("text_model." if component == "text_encoder_2" else "") + n.removeprefix("text_model."): t
                     for n, t in model.state_dict().items()}
    return {name: (tuple(t.shape), LAYOUT[component][2]) for name, t in state.items()}


@pytest.fixture(scope="module")
def real_hunyuan(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("real") / "HunyuanVideo-I2V"
    for component, (stem, shards, _) in LAYOUT.items():
        write_component(folder / component, stem, reference_tensors(component), shards)
        shutil.copy(REAL / component / "config.json", folder / component / "config.json")
    for sub in ("scheduler", "image_processor"):
        shutil.copytree(REAL / sub, folder / sub)
    write_bpe_tokenizers(folder)  # small stand-ins in the published files (check reads no tokenizer)
    for sub in ("tokenizer", "tokenizer_2"):
        shutil.copy(REAL / sub / "tokenizer_config.json", folder / sub / "tokenizer_config.json")
    shutil.copy(REAL / "model_index.json", folder / "model_index.json")
    return folder


def test_check_accepts_the_real_layout(real_hunyuan):
    summary = {row["component"]: row for row in minialg.check(real_hunyuan)}
    assert summary["transformer"]["class"] == "HunyuanVideoTransformer" and summary["transformer"]["files"] == 6
    assert 12.5e9 < summary["transformer"]["parameters"] < 13.5e9  # the 13B denoiser
    assert 7.3e9 < summary["text_encoder"]["parameters"] < 7.5e9  # LLaVA: ViT-L + the 30 LLaMA layers read
    assert 0.12e9 < summary["text_encoder_2"]["parameters"] < 0.13e9  # CLIP-L text
    assert 0.2e9 < summary["vae"]["parameters"] < 0.3e9
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "check", str(real_hunyuan)], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "LlavaTextEncoder" in out.stdout and "text_encoder_2" in out.stdout and "ok:" in out.stdout


@pytest.mark.parametrize("component, name, shape", [
    ("transformer", "single_transformer_blocks.17.proj_mlp.weight", (12288, 3000)),
    ("text_encoder", "language_model.model.layers.12.self_attn.k_proj.weight", (4096, 4096)),  # GQA: 1024 rows
    ("text_encoder_2", "text_model.encoder.layers.3.mlp.fc1.bias", (3071,)),
])
def test_check_names_a_broken_tensor_and_its_file(real_hunyuan, tmp_path, component, name, shape):
    broken = tmp_path / "broken"
    shutil.copytree(real_hunyuan, broken, copy_function=os.link)  # hard links: the sparse files stay unread
    stem, shards, dtype = LAYOUT[component]
    tensors = reference_tensors(component)
    if shards > 1:
        index = json.loads((broken / component / f"{stem}.safetensors.index.json").read_text())["weight_map"]
        file = index[name]
        tensors = {n: tensors[n] for n, f in index.items() if f == file}
    else:
        file = f"{stem}.safetensors"
    tensors[name] = (shape, dtype)
    write_sparse(broken / component / file, tensors)
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "check", str(broken)], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"tensor '{name}' in" in out.stderr and file in out.stderr and f"has shape {list(shape)}" in out.stderr


def test_check_names_a_missing_tensor_and_a_missing_tokenizer_file(real_hunyuan, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(real_hunyuan, broken, copy_function=os.link)
    tensors = reference_tensors("text_encoder_2")
    del tensors["text_model.final_layer_norm.weight"]
    write_sparse(broken / "text_encoder_2" / "model.safetensors", tensors)
    with pytest.raises(CheckpointError, match="'final_layer_norm.weight' missing from .*text_encoder_2"):
        minialg.check(broken)
    (real_hunyuan / "tokenizer_2" / "merges.txt").rename(tmp_path / "merges.txt")
    try:
        with pytest.raises(CheckpointError, match="missing file: .*tokenizer_2/merges.txt"):
            minialg.check(real_hunyuan)
    finally:
        (tmp_path / "merges.txt").rename(real_hunyuan / "tokenizer_2" / "merges.txt")


def test_a_text_to_video_transformer_is_refused(tmp_path):
    folder = write_tiny(tmp_path / "tiny", "hunyuan_video")
    config = json.loads((folder / "transformer/config.json").read_text())
    (folder / "transformer/config.json").write_text(json.dumps(dict(config, image_condition_type=None)))
    with pytest.raises(CheckpointError, match="image_condition_type None is not an image-to-video kind"):
        minialg.check(folder)


# --- presets, the authors' command line, the demo -------------------------------------------------------------

def test_presets_equal_the_authors_configs():
    for name in ("hunyuan_video_alg", "hunyuan_video_default"):
        config = load_config(name)
        assert (config.model, config.dtype, config.fps, config.resolution) == (
            "hunyuanvideo-community/HunyuanVideo-I2V", "bfloat16", 30, "360p")
        assert config.generation == dict(num_frames=129, num_inference_steps=50, guidance_scale=6.0,
                                         i2v_stable=True, true_cfg_scale=1.0, flow_shift=7.0)
    alg = load_config("hunyuan_video_alg").alg
    assert (alg.use_low_pass_guidance, alg.lp_filter_type, alg.lp_filter_in_latent, alg.lp_resize_factor) == (
        True, "down_up", True, 0.625)
    assert (alg.lp_strength_schedule_type, alg.schedule_interval_start_time, alg.schedule_interval_end_time) == (
        "interval", 0.0, 0.04)
    # the authors' default file turns ALG on without a filter, a path their pipeline cannot run: the baseline
    assert not load_config("hunyuan_video_default").alg.use_low_pass_guidance


@pytest.mark.parametrize("raw, message", [
    ({"model": {"flow_reverse": True}}, "model.flow_reverse: true"),
    ({"model": {"flow_shift": 0}}, "model.flow_shift must be a number > 0"),
    ({"model": {"flow_shift": 7.0}, "generation": {"flow_shift": 5.0}}, "disagree"),
    ({"video": {"resolution": "480p"}}, "video.resolution must be one of 360p, 540p, 720p"),
    ({"generation": {"true_cfg_scale": "high"}}, "generation.true_cfg_scale has the wrong type"),
])
def test_bad_hunyuan_config_keys_name_the_key(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_config(raw)


def authors_buckets(resolution: str, height: int, width: int) -> tuple[int, int]:
    """The authors' lp_utils.get_hunyuan_video_size, written again from its description (numpy, their loop)."""
    side = {"720p": 960, "540p": 720, "360p": 480}[resolution]
    patches, sizes = round((side / 32) ** 2), []
    a, b = patches, 1
    while a > 0:
        if max(a, b) / min(a, b) <= 4.0:
            sizes.append((a * 32, b * 32))
        a, b = (a, b + 1) if (b + 1) * a <= patches else (a - 1, b)
    diffs = np.array([round(float(h) / float(w), 5) for h, w in sizes]) - float(height) / float(width)
    keep = [(i, d) for i, d in enumerate(diffs) if (d <= 0 if height / width >= 1 else d > 0)]
    return sizes[min(keep, key=lambda pair: abs(pair[1]))[0]]


def test_resolution_buckets_are_the_authors():
    for resolution in ("360p", "540p", "720p"):
        for height, width in [(40, 60), (720, 1280), (1280, 720), (512, 512), (300, 1500), (1500, 300), (481, 640)]:
            assert bucket_size(resolution, height, width) == authors_buckets(resolution, height, width)
    assert bucket_size("360p", 720, 1280) == (352, 608) and bucket_size("720p", 720, 1280) == (704, 1248)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("tiny") / "hunyuan", "hunyuan_video")


def test_authors_command_line_with_the_preset(tiny, tmp_path, test_image):
    """`cli.py --config hunyuan_video_alg` with a local model: the size from video.resolution (the 360p bucket of
    a 2:3 image), 30 fps; frames and steps cut down for the CPU."""
    from PIL import Image

    Image.fromarray(test_image).save(tmp_path / "bus.png")
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--config", "hunyuan_video_alg", "--image_path",
                          str(tmp_path / "bus.png"), "--prompt", "a red double decker bus driving down a street",
                          "--output_path", str(tmp_path / "bus.mp4"), "--model", str(tiny), "--dtype", "float32",
                          "--num_frames", "5", "--num_inference_steps", "2"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    frames, codec, fps = read_video(tmp_path / "bus.mp4")
    assert len(frames) == 5 and frames[0].shape == (384, 576, 3) and codec == "h264" and fps == 30


def test_demo_runs_offline(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "demo", "--family", "hunyuan_video", "--steps", "3",
                          "--output_path", str(tmp_path / "d.mp4")], capture_output=True, text=True, cwd=tmp_path,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stderr
    frames, codec, _ = read_video(tmp_path / "d.mp4")
    assert len(frames) == 17 and frames[0].shape == (64, 96, 3) and np.std(frames) > 5


# --- memory ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("total, offload", [(85_899_345_920 - 2**30, False), (48 * 2**30, True), (24 * 2**30, True)])
def test_encoders_offloaded_by_default_on_cards_under_80_gb(monkeypatch, total, offload):
    class Properties:
        total_memory = total

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Properties)
    assert HunyuanVideo.offload_by_default(torch.device("cuda")) == offload
    assert not HunyuanVideo.offload_by_default(torch.device("cpu"))


def test_encoders_visit_the_device_only_to_encode(tiny):
    """Offloaded encoders stay on the encoder device between calls; each encode moves them and back (watched
    through `.to`, as the CPU cannot show two devices)."""
    pipe = minialg.load(tiny, device="cpu", dtype=torch.float32, offload_encoders=True)
    moves = []
    for name in ("text_encoder", "text_encoder_2"):
        module = getattr(pipe, name)
        module.to = (lambda m, n: lambda device: moves.append((n, str(device))) or m)(module, name)
    pipe(demo_image(), "a ball", num_frames=5, height=32, width=48, num_inference_steps=1, progress=False)
    assert moves == [("text_encoder", "cpu"), ("text_encoder", "cpu"), ("text_encoder_2", "cpu"),
                     ("text_encoder_2", "cpu")]
    assert pipe.encoder_device.type == "cpu"


def test_bf16_loads_the_vae_and_encoders_in_float16(tiny):
    pipe = minialg.load(tiny, device="cpu", dtype="bfloat16")
    dtypes = {name: next(getattr(pipe, name).parameters()).dtype
              for name in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    assert dtypes == {"transformer": torch.bfloat16, "vae": torch.float16, "text_encoder": torch.float16,
                      "text_encoder_2": torch.float16}
    assert minialg.load(tiny, device="cpu", dtype="float32").vae.decoder.conv_in.conv.weight.dtype == torch.float32


def small_transformer(seed=0):
    cfg = config_from(HunyuanVideoTransformerConfig, json.loads((REAL / "transformer/config.json").read_text()))
    cfg = HunyuanVideoTransformerConfig(**dict(cfg.__dict__, num_attention_heads=2, attention_head_dim=12,
                                               rope_axes_dim=(4, 4, 4), num_layers=2, num_single_layers=3,
                                               num_refiner_layers=1, text_embed_dim=16, pooled_projection_dim=8))
    torch.manual_seed(seed)
    model = HunyuanVideoTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def inputs(batch, seed):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(7)[None] < torch.tensor([7, 4, 5][:batch])[:, None]).long()
    return (torch.randn(batch, 16, 3, 4, 6, generator=g), torch.rand(batch, generator=g) * 1000,
            torch.randn(batch, 7, 16, generator=g), mask, torch.randn(batch, 8, generator=g),
            torch.full((batch,), 6000.0))


def test_blocks_of_lists_double_then_single_stream_blocks():
    model = small_transformer()
    assert blocks_of(model) == [*model.transformer_blocks, *model.single_transformer_blocks]


def test_stream_blocks_keeps_the_output():
    model = small_transformer()
    args = inputs(2, seed=1)
    with torch.no_grad():
        expected = model(*args)
        host = [{n: p.data_ptr() for n, p in block.named_parameters()} for block in blocks_of(model)]
        streamer = stream_blocks(model, "cpu")
        seen = []
        hooks = [block.register_forward_pre_hook(lambda m, a, k=k: seen.append(k)) for k, block in
                 enumerate(blocks_of(model))]
        assert torch.equal(model(*args), expected) and seen == list(range(5))
        after = [{n: p.data_ptr() for n, p in block.named_parameters()} for block in blocks_of(model)]
        assert after != host  # the blocks now live in the streamer's packed CPU buffers ...
        assert all(p.device.type == "cpu" for block in blocks_of(model) for p in block.parameters())
        assert streamer.arriving == {}  # ... and nothing is left in flight
        for hook in hooks:
            hook.remove()


def test_compile_blocks_one_graph_per_block_kind_and_batch():
    model = small_transformer()
    steps = [inputs(batch, seed=10 * i + batch) for i, batch in enumerate((2, 3, 2))]
    with torch.no_grad():
        expected = [model(*args) for args in steps]
        torch._dynamo.reset()
        counters.clear()
        compile_blocks(model, backend="eager")
        for args, want in zip(steps, expected):
            assert torch.equal(model(*args), want)
    assert counters["stats"]["unique_graphs"] == 4  # double and single stream, at batch 2 and 3
    assert not counters["graph_break"]
