"""What the benchmark (minialg.bench) builds, one `Denoiser` entry per family in SPECS: the transformer from its real
config (or the small CPU stand-in derived from it) with random weights made directly on the device, its arguments
at the benchmark shape, the FLOPs (minialg.flops) and attention shapes of a call, diffusers' transformer holding
the same weights and called the same way (--compare-diffusers), and a whole random pipeline of the family.

A new family: an input builder (and a FLOP count, a diffusers call when its arguments differ), then one entry.
"""

import json
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import config_from, read_json
from .demo import train_tokenizer, write_tiny
from .families.ltx import MULTI_SCALE
from .flops import cogvideox_flops, hunyuan_flops, ltx_flops, wan_flops
from .models.cogvideox import CogVideoXTransformer, CogVideoXTransformerConfig
from .models.hunyuan import HunyuanVideoTransformer, HunyuanVideoTransformerConfig
from .models.ltx import LTXVideoTransformer, LTXVideoTransformerConfig
from .models.wan import WanTransformer, WanTransformerConfig
from .registry import pipeline_class

REAL_CONFIGS = Path(__file__).parent / "real_configs"
LTX_LATER = REAL_CONFIGS / "LTX-Video-later"


# ---- each family's arguments (B batch; randn draws in the benchmark's dtype), FLOPs, attentions, diffusers call

def wan_inputs(cfg, batch, small, randn, timestep, grid, frame_timesteps=False) -> tuple:
    """x (B, C, F, H, W) (small: (3, 6, 10)), timestep (B,) or per latent frame (B, F) with frame 0 (the image)
    at 0, text (B, 512, text_dim), Wan 2.1's CLIP image (B, 257, image_dim) or None."""
    frames, height, width = (3, 6, 10) if small else grid
    image = randn(batch, 257, cfg.image_dim) if cfg.image_dim else None
    if frame_timesteps:
        timestep = (torch.arange(frames, device=timestep.device) > 0) * timestep[:, None]  # (B, F)
    return randn(batch, cfg.in_channels, frames, height, width), timestep, randn(batch, 512, cfg.text_dim), image


def wan_flops_of(cfg, inputs) -> int:
    x, t, text, image = inputs
    return wan_flops(cfg, tuple(x.shape), text.shape[1], 0 if image is None else image.shape[1],
                     t.shape[1] if t.ndim == 2 else 1)


def wan_lengths(cfg, inputs) -> list:
    x, text, image = inputs[0], inputs[2], inputs[3]
    pf, ph, pw = cfg.patch_size
    L = x.shape[2] // pf * (x.shape[3] // ph) * (x.shape[4] // pw)
    return [(L, L), (L, text.shape[1])] + ([(L, image.shape[1])] if image is not None else [])


def wan_call(ref):
    def call(x, t, text, image):  # diffusers takes TI2V's timesteps per token: each frame's, h*w/4 times
        t = t.repeat_interleave(x.shape[3] * x.shape[4] // 4, dim=1) if t.ndim == 2 else t
        return ref(x, t, text, encoder_hidden_states_image=image, return_dict=False)[0]

    return call


def cogvideox_inputs(cfg, batch, small, randn, timestep) -> tuple:
    """At its (learned-embedding) sample size: x (B, F, C, H, W), timestep (B,), text (B, max_text_seq_length, C)."""
    frames = (cfg.sample_frames - 1) // cfg.temporal_compression_ratio + 1
    x = randn(batch, frames, cfg.in_channels, cfg.sample_height, cfg.sample_width)
    return x, timestep, randn(batch, cfg.max_text_seq_length, cfg.text_embed_dim)


def cogvideox_lengths(cfg, inputs) -> list:  # joint [text ; video]
    x, text = inputs[0], inputs[2]
    p, pt = cfg.patch_size, cfg.patch_size_t or 1
    return [(text.shape[1] + x.shape[1] // pt * (x.shape[3] // p) * (x.shape[4] // p),) * 2]


def cogvideox_call(ref):
    from types import SimpleNamespace

    from diffusers import CogVideoXImageToVideoPipeline

    rotary = {}  # per latent shape, made once as the pipeline does before its loop

    def call(x, t, text):
        if x.shape not in rotary:
            pipe = SimpleNamespace(vae_scale_factor_spatial=8, transformer=ref)
            rotary[x.shape] = CogVideoXImageToVideoPipeline._prepare_rotary_positional_embeddings(
                pipe, x.shape[3] * 8, x.shape[4] * 8, x.shape[1], x.device)
        return ref(x, text, t, image_rotary_emb=rotary[x.shape], return_dict=False)[0]

    return call


def hunyuan_inputs(cfg, batch, small, randn, timestep) -> tuple:
    """The authors' preset: 129 frames at 360p (16:9 bucket 352x608): x (B, C, 33, 44, 76); 400 text states (144
    image + 256 prompt), every one a prompt token (the mask's worst case); pooled CLIP text; guidance 6.0 x 1000."""
    frames, height, width, length = (3, 6, 10, 7) if small else (33, 44, 76, 400)
    x = randn(batch, cfg.in_channels, frames, height, width)
    guidance = torch.full((batch,), 6000.0, device=x.device, dtype=x.dtype)
    mask = torch.ones(batch, length, device=x.device, dtype=torch.int64)
    return x, timestep.float(), randn(batch, length, cfg.text_embed_dim), mask, randn(
        batch, cfg.pooled_projection_dim), guidance


def hunyuan_lengths(cfg, inputs) -> list:  # joint [video ; text], and the token refiner's text alone
    x, T = inputs[0], inputs[2].shape[1]
    p, pt = cfg.patch_size, cfg.patch_size_t
    S = T + x.shape[2] // pt * (x.shape[3] // p) * (x.shape[4] // p)
    return [(S, S), (T, T)]


def hunyuan_call(ref):
    return lambda x, t, text, mask, pooled, guidance: ref(x, t, text, mask, pooled, guidance=guidance,
                                                          return_dict=False)[0]


def ltx_inputs(cfg, batch, small, randn, timestep, grid, small_grid, coords=False) -> tuple:
    """As minialg.families.ltx calls the transformer on a latent grid (F, H, W) (small: `small_grid`): packed
    tokens x (B, F*H*W, C); per-token timesteps (B, L), frame 0's tokens (the image) at 0; T5 text (B, 128, 4096)
    (small: 16 states) and its mask: row 0 the empty negative prompt (1 token), the others half the length; the
    positions: 0.9.0's grid with rope_interpolation_scale (8 / 25 fps, 32, 32), or (coords) 0.9.5+'s pixel
    coordinates (B, 3, L): frame (8f - 7)+ / 25 s, row 32h, column 32w."""
    f, h, w = small_grid if small else grid
    T, device = 16 if small else 128, timestep.device
    x = randn(batch, f * h * w, cfg.in_channels)
    t = (torch.arange(f * h * w, device=device) >= h * w) * timestep[:, None].float()  # (B, L)
    text = randn(batch, T, cfg.caption_channels)
    valid = torch.tensor([1] + [T // 2] * (batch - 1), device=device)
    mask = (torch.arange(T, device=device) < valid[:, None]).to(torch.int64)  # (B, T), as the tokenizer's
    if not coords:
        return x, t, text, mask, (f, h, w), None, (8 / 25, 32, 32)
    frames = (torch.arange(f, device=device) * 8 - 7).clamp(min=0).float() * (1.0 / 25)
    axes = torch.meshgrid(frames, torch.arange(h, device=device) * 32.0, torch.arange(w, device=device) * 32.0,
                          indexing="ij")
    return x, t, text, mask, None, torch.stack(axes).reshape(1, 3, -1).expand(batch, -1, -1)


def ltx_flops_of(cfg, inputs) -> int:
    x, t, text = inputs[:3]
    return ltx_flops(cfg, tuple(x.shape), text.shape[1], t.shape[1] if t.ndim == 2 else 1)


def ltx_lengths(cfg, inputs) -> list:  # self-attention over the video tokens, cross-attention to the text
    L, T = inputs[0].shape[1], inputs[2].shape[1]
    return [(L, L), (L, T)]


def ltx_call(ref):
    def call(x, t, text, mask, grid=None, coords=None, scale=None):
        frames, height, width = grid or (None, None, None)
        return ref(x, text, t, mask, frames, height, width, rope_interpolation_scale=scale, video_coords=coords,
                   return_dict=False)[0]

    return call


def ltx097_layout(folder: Path, small: bool) -> None:
    """Turn a copied LTX-Video 0.9.0 folder into 0.9.7 13B's, as diffusers' conversion script writes it:
    LTXConditionPipeline, the 13B transformer, the 0.9.5+ VAE and scheduler. Small: the tiny transformer kept,
    the VAE of 0.9.5+ narrowed (every block kind kept; the tests' tiny 0.9.5 widths)."""
    shutil.copy(LTX_LATER / "model_index_0.9.7.json", folder / "model_index.json")
    shutil.copy(LTX_LATER / "scheduler_0.9.5+_config_DERIVED.json", folder / "scheduler" / "scheduler_config.json")
    vae = read_json(LTX_LATER / "vae_0.9.5-0.9.8_config.json")
    if small:
        vae.update(latent_channels=8, block_out_channels=[4, 8, 16, 32, 64], layers_per_block=[1] * 5,
                   decoder_block_out_channels=[8, 16, 32], decoder_layers_per_block=[1] * 4)
    else:
        shutil.copy(LTX_LATER / "transformer_13b_0.9.7_config_DERIVED.json", folder / "transformer" / "config.json")
    (folder / "vae" / "config.json").write_text(json.dumps(vae, indent=2))


@dataclass(frozen=True)
class Denoiser:
    """How the benchmark builds, feeds, counts and compares one family's transformer, and runs its pipeline."""
    model: type
    config: type
    checkpoint: str  # its folder in real_configs: the whole run's configs
    small: dict  # the CPU stand-in: the real config with these keys replaced
    inputs: Callable  # (cfg, batch, small, randn, timestep (B,) int) -> the model's arguments
    flops: Callable  # (cfg, arguments) -> FLOPs of one call
    lengths: Callable  # (cfg, arguments) -> (query, key) token counts of each kind of attention
    reference: str  # diffusers' transformer class
    call: Callable  # (diffusers' model) -> a function of our arguments
    transformer_config: str = ""  # under real_configs; "": checkpoint/transformer/config.json
    mask: str | None = None  # the mask its attention takes: "bool" or "bias" (the SDPA probe passes one too)
    stages: dict = field(default_factory=dict)  # more shapes: name -> (batch, inputs), e.g. a second stage
    tiny: str = ""  # the demo family whose tiny checkpoint the small whole run starts from ("": this one)
    layout: Callable | None = None  # (folder, small): the copied configs made this checkpoint's
    run: dict = field(default_factory=dict)  # the whole run's settings over the ALG preset's
    run_small: dict = field(default_factory=lambda: dict(num_frames=9))  # with the small configs
    drop: tuple = ()  # preset keys the whole run leaves out
    min_steps: int = 1  # of the whole run
    note: str = ""  # in the whole run's report

    @property
    def config_file(self) -> str:
        return self.transformer_config or f"{self.checkpoint}/transformer/config.json"


SMALL_RUN = dict(num_frames=9, height=64, width=96)
WAN_SMALL = dict(num_attention_heads=2, attention_head_dim=24, num_layers=2, ffn_dim=96, freq_dim=32, text_dim=32)
WAN_480P = (21, 60, 104)  # the latent of 480x832, 81 frames
wan = partial(Denoiser, WanTransformer, WanTransformerConfig, flops=wan_flops_of, lengths=wan_lengths,
              reference="WanTransformer3DModel", call=wan_call, run_small=SMALL_RUN)
ltx = partial(Denoiser, LTXVideoTransformer, LTXVideoTransformerConfig, "LTX-Video", flops=ltx_flops_of,
              lengths=ltx_lengths, reference="LTXVideoTransformer3DModel", call=ltx_call, mask="bias",
              run_small=SMALL_RUN)
SPECS = {
    "wan": wan("Wan2.1-I2V-14B-480P-Diffusers", dict(WAN_SMALL, image_dim=40, added_kv_proj_dim=48),
               partial(wan_inputs, grid=WAN_480P)),
    "wan22": wan("Wan2.2-I2V-A14B-Diffusers", WAN_SMALL, partial(wan_inputs, grid=WAN_480P),  # each expert
                 run=dict(height=480, width=832)),  # the A14B figures are asked for at 480p (the preset is 720p)
    "wan22_ti2v": wan("Wan2.2-TI2V-5B-Diffusers", WAN_SMALL,  # 704x1280, 121 frames, a timestep per latent frame
                      partial(wan_inputs, grid=(31, 44, 80), frame_timesteps=True)),
    "cogvideox": Denoiser(CogVideoXTransformer, CogVideoXTransformerConfig, "CogVideoX-5b-I2V", dict(
        num_attention_heads=2, attention_head_dim=16, num_layers=2, time_embed_dim=24, text_embed_dim=32,
        sample_height=8, sample_width=12, sample_frames=9, max_text_seq_length=16), cogvideox_inputs,
        lambda cfg, inputs: cogvideox_flops(cfg, tuple(inputs[0].shape), inputs[2].shape[1]), cogvideox_lengths,
        "CogVideoXTransformer3DModel", cogvideox_call),
    "hunyuan_video": Denoiser(HunyuanVideoTransformer, HunyuanVideoTransformerConfig, "HunyuanVideo-I2V", dict(
        num_attention_heads=2, attention_head_dim=24, num_layers=2, num_single_layers=2, rope_axes_dim=[8, 8, 8],
        text_embed_dim=32, pooled_projection_dim=16), hunyuan_inputs,
        lambda cfg, inputs: hunyuan_flops(cfg, tuple(inputs[0].shape), inputs[2].shape[1]), hunyuan_lengths,
        "HunyuanVideoTransformer3DModel", hunyuan_call, mask="bool"),
    # 2B 0.9.0 at the preset's 704x480, 161 frames: 21 x 15 x 22 tokens. Small: D 32 (like 2048, D % 6 = 2)
    "ltx": ltx(dict(num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32, num_layers=2,
                    caption_channels=32), partial(ltx_inputs, grid=(21, 15, 22), small_grid=(3, 6, 10)),
               min_steps=2),  # 0.9.0's schedule, stretched to shift_terminal, needs 2 steps
    # 13B 0.9.7 at the two-stage recipe's sizes: stage 1 768x512 (21 x 16 x 24), stage 2 1536x1024 (21 x 32 x 48,
    # CFG only). Small: D 40 (like 4096, D % 6 = 4). The whole run is single-stage (see note)
    "ltx13b": ltx(dict(num_attention_heads=2, attention_head_dim=20, cross_attention_dim=40, num_layers=2,
                       caption_channels=32), partial(ltx_inputs, grid=(21, 16, 24), small_grid=(3, 4, 6), coords=True),
                  transformer_config="LTX-Video-later/transformer_13b_0.9.7_config_DERIVED.json",
                  stages={"stage2": (2, partial(ltx_inputs, grid=(21, 32, 48), small_grid=(3, 8, 12), coords=True))},
                  tiny="ltx", layout=ltx097_layout, run=dict(height=512, width=768), drop=tuple(MULTI_SCALE),
                  note="single stage: the preset without its upsampler keys (the hub upsampler is not available "
                       "here): stage 1 and its decode, no upsampling, no stage 2"),
}
DENOISERS = {family: (s.model, s.config, s.checkpoint) for family, s in SPECS.items()}  # module, config, folder


def denoiser_config(family: str, small: bool) -> dict:
    """The real transformer config.json of the family, or the small one derived from it."""
    real = read_json(REAL_CONFIGS / SPECS[family].config_file)
    return dict(real, **SPECS[family].small) if small else real


def denoiser_inputs(family: str, cfg, batch: int, small: bool, device, dtype, generator, stage: str = "") -> tuple:
    """The denoiser's arguments at the benchmark shape (`stage`: one of the family's other shapes), drawn from
    `generator`: a timestep per batch element in [0, 1000), then the family's tensors (see each builder)."""
    def randn(*shape):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    timestep = torch.randint(0, 1000, (batch,), generator=generator, device=device)
    build = SPECS[family].stages[stage][1] if stage else SPECS[family].inputs
    return build(cfg, batch, small, randn, timestep)


def denoiser_flops(family: str, cfg, inputs: tuple) -> int:
    return SPECS[family].flops(cfg, inputs)


def attention_lengths(family: str, cfg, inputs: tuple) -> list[tuple[int, int]]:
    """(query, key) token counts of each kind of attention the model runs on these inputs."""
    return SPECS[family].lengths(cfg, inputs)


def random_model(model_cls, cfg, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """`model_cls(cfg)` built on the meta device, every tensor then made directly on `device` with random values
    (scaled normal matrices, unit norm weights, small vectors) in `dtype`, or float32 for the `fp32_params`; the
    persistent buffers (LTX-Video VAE's latents_mean / latents_std) as statistics: *std 1, the others 0."""
    with torch.device("meta"):
        model = model_cls(cfg)
    keep_fp32 = getattr(model, "fp32_params", ())
    generator = torch.Generator(device).manual_seed(seed)
    for name, p in list(model.named_parameters()):
        fp32 = any(part in keep_fp32 for part in name.split("."))
        t = torch.empty(p.shape, device=device, dtype=torch.float32 if fp32 else dtype)
        if p.ndim >= 2:
            t.normal_(0, p[0].numel() ** -0.5, generator=generator)
        elif "norm" in name and name.endswith("weight"):
            t.fill_(1)
        else:
            t.normal_(0, 0.02, generator=generator)
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)
    for name, b in list(model.named_buffers()):  # as checkpoint.load makes them: floating ones in `dtype`
        owner, _, leaf = name.rpartition(".")
        value = torch.full(b.shape, 1.0 if leaf.endswith("std") else 0.0, device=device,
                           dtype=dtype if b.is_floating_point() else b.dtype)
        model.get_submodule(owner)._buffers[leaf] = value
    return model.eval()


def diffusers_denoiser(family: str, config: dict, model: torch.nn.Module, device: torch.device):
    """diffusers' transformer for `config`, holding *our* model's weights (the same tensors: no second copy),
    and a function calling it on our arguments (the family's `call`: CogVideoX's rotary tables as its pipeline
    makes them, Wan 2.2 TI2V's per-token timesteps, LTX-Video's positions)."""
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # parameters on meta; constant buffers computed on the CPU
        ref = getattr(diffusers, SPECS[family].reference)(**{k: v for k, v in config.items() if not k.startswith("_")})
    ref.load_state_dict(model.state_dict(), strict=True, assign=True)
    ref = ref.to(device).eval()  # moves its buffers; the parameters are already there
    return ref, SPECS[family].call(ref)


def write_configs(family: str, folder: Path, small: bool) -> Path:
    """The family's checkpoint folder without weights: the real configs (small: the demo's tiny checkpoint), a
    test tokenizer, the real scheduler and image processor configs."""
    spec = SPECS[family]
    if small:
        write_tiny(folder, spec.tiny or family)
    else:
        shutil.copytree(REAL_CONFIGS / spec.checkpoint, folder, dirs_exist_ok=True)
        (folder / "tokenizer").mkdir(exist_ok=True)
        train_tokenizer(folder / "tokenizer" / "spiece.model")
    if spec.layout:
        spec.layout(folder, small)
    return folder


def random_pipeline(family: str, folder: Path, device: torch.device, dtype: torch.dtype, small: bool):
    """A pipeline with every model random, made where `minialg.load` puts it (the encoders and a second expert in
    CPU memory, the rest on `device`), from `write_configs` into `folder`."""
    write_configs(family, folder, small)
    cls, cpu = pipeline_class(folder), torch.device("cpu")
    modules = {sub: random_model(model_cls, config_from(config_cls, read_json(folder / sub / "config.json")),
                                 cpu if sub.endswith("encoder") or sub == "transformer_2" else device,
                                 cls.dtype_of(sub, dtype))
               for sub, (model_cls, config_cls) in cls.components_of(folder).items()}
    return cls(folder, modules, device, cpu, dtype)
