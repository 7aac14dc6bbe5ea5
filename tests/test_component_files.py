"""Wan's VAE, UMT5 and CLIP from single files (minialg.component_files), as Wan-AI and ComfyUI publish them.

The files are written here from the tiny diffusers/transformers checkpoint: its tensors renamed into the official
layouts by this file's own inverse of the public mappings, which is checked first against the public code itself:
diffusers' from_single_file reads the official Wan 2.1 VAE back, the rules of diffusers' convert_vae_22 take the
Wan 2.2 names back, and the official T5 and CLIP forwards (wan/modules/t5.py, clip.py, written out below) on the
official names give what transformers gives on its own. Then a video made with the files must equal the video of
the diffusers folder holding the same values. The real-size ComfyUI files are sparse: headers only.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import minialg
from minialg import checkpoint, component_files
from minialg.checkpoint import CheckpointError
from minialg.models.clip import CLIPVision, CLIPVisionConfig
from minialg.models.t5 import relative_position_buckets
from minialg.models.wan22_vae import Wan22VAE
from minialg.models.wan_vae import WanVAE, WanVAEConfig
from test_single_file import E4M3, PROMPT, SIZE, real_tensors
from test_real_layout import WAN, write_sparse

ROOT = Path(__file__).resolve().parent.parent
FILES = {"vae": "diffusion_pytorch_model", "text_encoder": "model", "image_encoder": "model"}
RESIDUAL = [("norm1.", "residual.0."), ("conv1.", "residual.2."), ("norm2.", "residual.3."), ("conv2.", "residual.6."),
            ("conv_shortcut.", "shortcut.")]


# ---- the official names, from the public mappings run backwards ----

def inner(name: str) -> str:
    """A residual block's tensor: norm1 conv1 norm2 conv2 conv_shortcut -> residual.0 .2 .3 .6, shortcut."""
    return next((b + name[len(a):] for a, b in RESIDUAL if name.startswith(a)), name)


def vae_official(name: str, blocks: int = 2, residual: bool = False) -> str:
    """diffusers' AutoencoderKLWan name -> the official one (Wan 2.1: convert_vae backwards, 2.2: convert_vae_22)."""
    if name.split(".")[0] in ("quant_conv", "post_quant_conv"):
        return name.replace("post_quant_conv", "conv2").replace("quant_conv", "conv1")
    side, rest = name.split(".", 1)
    for ours, theirs in (("conv_in.", "conv1."), ("norm_out.", "head.0."), ("conv_out.", "head.2."),
                         ("mid_block.attentions.0.", "middle.1.")):
        if rest.startswith(ours):
            return f"{side}.{theirs}{rest[len(ours):]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", rest):
        return f"{side}.middle.{2 * int(m[1])}.{inner(m[2])}"
    if not residual and side == "encoder":
        n, tail = re.fullmatch(r"down_blocks\.(\d+)\.(.+)", rest).groups()
        return f"encoder.downsamples.{n}.{inner(tail)}"
    i, j, tail = re.fullmatch(r"(?:down|up)_blocks\.(\d+)\.(?:resnets\.(\d+)|downsampler|upsamplers?(?:\.0)?)\.(.+)",
                              rest).groups()
    kind = "down" if side == "encoder" else "up"
    j = int(j) if j is not None else blocks + (kind == "up")
    where = f"{kind}samples.{i}.{kind}samples.{j}" if residual else f"upsamples.{int(i) * (blocks + 2) + j}"
    return f"{side}.{where}.{inner(tail)}"


def vae22_to_diffusers(key: str) -> str:
    """The rules of diffusers' convert_vae_22 (scripts/convert_wan_to_diffusers.py) for the nested levels; the
    other names as the Wan 2.1 conversion (diffusers' own function) gives them."""
    if not key.startswith(("encoder.downsamples.", "decoder.upsamples.")):
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
        return next(iter(convert_wan_vae_to_diffusers({key: None})))
    new = key.replace("encoder.downsamples.", "encoder.down_blocks.").replace("decoder.upsamples.", "decoder.up_blocks.")
    if "residual" in new or "shortcut" in new:
        new = new.replace(".downsamples.", ".resnets.").replace(".upsamples.", ".resnets.")
        for ours, theirs in RESIDUAL:
            new = new.replace("." + theirs, "." + ours)
        return new
    parts = new.split(".")  # the level's sampler: its index dropped
    return ".".join(parts[:3] + [parts[3].replace("samples", "sampler")] + parts[5:])


def t5_official(name: str) -> str:
    """transformers' UMT5 name -> the official T5Encoder's (wan/modules/t5.py)."""
    name = re.sub(r"^encoder\.block\.(\d+)\.", r"blocks.\1.", name)
    for ours, theirs in (("shared.", "token_embedding."), ("encoder.final_layer_norm.", "norm."),
                         ("layer.0.layer_norm.", "norm1."), ("layer.1.layer_norm.", "norm2."),
                         ("layer.0.SelfAttention.relative_attention_bias.", "pos_embedding.embedding."),
                         ("layer.0.SelfAttention.", "attn."), ("layer.1.DenseReluDense.wi_0.", "ffn.gate.0."),
                         ("layer.1.DenseReluDense.wi_1.", "ffn.fc1."), ("layer.1.DenseReluDense.wo.", "ffn.fc2.")):
        name = name.replace(ours, theirs)
    return name


def clip_official(state: dict, layout: str = "official") -> dict:
    """transformers' CLIPVisionModelWithProjection tensors -> the official XLMRobertaCLIP's (wan/modules/clip.py:
    fused q/k/v, (1, 1, C) and (1, L, C) tables, the text tower beside) or open_clip's visual tower."""
    s = {k.removeprefix("vision_model."): v for k, v in state.items()}
    official = layout == "official"
    out = {"visual.patch_embedding.weight" if official else "visual.conv1.weight": s["embeddings.patch_embedding.weight"],
           "visual.cls_embedding" if official else "visual.class_embedding":
               s["embeddings.class_embedding"][None, None] if official else s["embeddings.class_embedding"],
           "visual.pos_embedding" if official else "visual.positional_embedding":
               s["embeddings.position_embedding.weight"][None] if official else s["embeddings.position_embedding.weight"],
           "visual.head" if official else "visual.proj": s["visual_projection.weight"].T,
           "textual.token_embedding.weight" if official else "token_embedding.weight": torch.randn(7, 4),
           "log_scale" if official else "logit_scale": torch.tensor(2.7)}
    names = {"pre_layrnorm": ("pre_norm", "ln_pre"), "post_layernorm": ("post_norm", "ln_post"),
             "layer_norm1": ("norm1", "ln_1"), "layer_norm2": ("norm2", "ln_2"),
             "self_attn.out_proj": ("attn.proj", "attn.out_proj"), "mlp.fc1": ("mlp.0", "mlp.c_fc"),
             "mlp.fc2": ("mlp.2", "mlp.c_proj")}
    for name, t in s.items():
        if m := re.fullmatch(r"(?:encoder\.layers\.(\d+)\.)?(.+)\.(weight|bias)", name):
            n, module, leaf = m.groups()
            start = "visual." if n is None else f"visual.transformer.{'' if official else 'resblocks.'}{n}."
            if module in names:
                out[f"{start}{names[module][not official]}.{leaf}"] = t
            elif module == "self_attn.q_proj":
                fused = torch.cat([s[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")])
                out[start + ("attn.to_qkv." + leaf if official else "attn.in_proj_" + leaf)] = fused
    return out


def official_t5(t: dict, ids, mask, config: dict) -> torch.Tensor:
    """wan/modules/t5.py's T5Encoder.forward (UMT5: a position bias per block), written out on official names."""
    eps, heads = config["layer_norm_epsilon"], config["num_heads"]
    norm = lambda x, w: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))  # noqa: E731
    x, B, L = t["token_embedding.weight"][ids], *ids.shape
    buckets = relative_position_buckets(L, config["relative_attention_num_buckets"],
                                        config["relative_attention_max_distance"], ids.device)
    for n in range(len({k.split(".")[1] for k in t if k.startswith("blocks.")})):
        p = lambda s: t[f"blocks.{n}.{s}.weight"]  # noqa: E731
        h = norm(x, p("norm1"))
        q, k, v = (F.linear(h, p(f"attn.{s}")).view(B, L, heads, -1) for s in "qkv")
        bias = p("pos_embedding.embedding")[buckets].permute(2, 0, 1)[None].masked_fill(mask[:, None, None] == 0,
                                                                                           torch.finfo(x.dtype).min)
        attn = (torch.einsum("binc,bjnc->bnij", q, k) + bias).softmax(-1)
        x = x + F.linear(torch.einsum("bnij,bjnc->binc", attn, v).reshape(B, L, -1), p("attn.o"))
        h = norm(x, p("norm2"))
        gate = F.gelu(F.linear(h, p("ffn.gate.0")), approximate="tanh")
        x = x + F.linear(F.linear(h, p("ffn.fc1")) * gate, p("ffn.fc2"))
    return norm(x, t["norm.weight"])


def official_clip(t: dict, pixels, heads: int, eps: float = 1e-5) -> torch.Tensor:
    """wan/modules/clip.py's VisionTransformer.forward(use_31_block=True), written out on official names."""
    w = t["visual.patch_embedding.weight"]
    x = F.conv2d(pixels, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([t["visual.cls_embedding"].expand(x.shape[0], -1, -1), x], 1) + t["visual.pos_embedding"]
    ln = lambda x, s: F.layer_norm(x, x.shape[-1:], t[s + ".weight"], t[s + ".bias"], eps)  # noqa: E731
    lin = lambda x, s: F.linear(x, t[s + ".weight"], t[s + ".bias"])  # noqa: E731
    x, (B, L, C) = ln(x, "visual.pre_norm"), x.shape
    for n in range(len({k.split(".")[2] for k in t if k.startswith("visual.transformer.")}) - 1):
        p = f"visual.transformer.{n}."
        q, k, v = lin(ln(x, p + "norm1"), p + "attn.to_qkv").view(B, L, 3, heads, C // heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + lin(a.transpose(1, 2).reshape(B, L, C), p + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, p + "norm2"), p + "mlp.0")), p + "mlp.2")
    return x


@pytest.fixture(scope="module")
def tiny(tiny_wan) -> dict:
    """The tiny folder's tensors per component, and its configs."""
    return {sub: (load_file(str(tiny_wan / sub / f"{stem}.safetensors")),
                  json.loads((tiny_wan / sub / "config.json").read_text())) for sub, stem in FILES.items()}


def test_the_official_vae_written_here_is_what_diffusers_reads(tmp_path):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, dim_mult=[1, 2, 4, 4])  # the Wan 2.1 shape diffusers' converter is written for
    vae.save_pretrained(tmp_path / "cfg" / "vae")
    state = vae.state_dict()
    save_file({vae_official(n): t for n, t in state.items()}, str(tmp_path / "wan_2.1_vae.safetensors"))
    back = AutoencoderKLWan.from_single_file(str(tmp_path / "wan_2.1_vae.safetensors"), config=str(tmp_path / "cfg"),
                                             subfolder="vae", torch_dtype=torch.float32, local_files_only=True)
    assert set(back.state_dict()) == set(state) and all(torch.equal(back.state_dict()[n], state[n]) for n in state)


def test_the_official_t5_and_clip_written_here_run_as_the_official_modules(tiny):
    from transformers import CLIPVisionConfig as Config, CLIPVisionModelWithProjection, UMT5Config, UMT5EncoderModel

    state, config = tiny["text_encoder"]
    t5 = UMT5EncoderModel(UMT5Config(**config)).eval()
    t5.load_state_dict(state, strict=False)
    ids, mask = torch.randint(0, config["vocab_size"], (2, 7)), torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        expected, ours = t5(ids, mask).last_hidden_state, official_t5({t5_official(n): t for n, t in state.items()},
                                                                      ids, mask, config)
    assert (ours - expected).abs().max() < 1e-5 * expected.abs().max()
    state, config = tiny["image_encoder"]
    clip = CLIPVisionModelWithProjection(Config(**config)).eval()
    clip.load_state_dict(state)
    pixels = torch.randn(1, 3, config["image_size"], config["image_size"])
    with torch.no_grad():
        expected = clip(pixels, output_hidden_states=True).hidden_states[-2]
        ours = official_clip(clip_official(state), pixels, config["num_attention_heads"])
    assert (ours - expected).abs().max() < 1e-5 * expected.abs().max()


def write(path: Path, tensors: dict) -> Path:
    """safetensors, or a .pth as torch.save writes a plain state dict."""
    tensors = {n: t.contiguous() for n, t in tensors.items()}
    save_file(tensors, str(path)) if path.suffix == ".safetensors" else torch.save(tensors, path)
    return path


def scaled_fp8(state: dict) -> tuple[dict, dict]:
    """(ComfyUI's scaled fp8 UMT5: each block Linear weight fp8 times a float32 scale_weight, the rest bf16, the
    scaled_fp8 marker; the same values in float32)."""
    stored, values = {"scaled_fp8": torch.zeros(0, dtype=E4M3)}, {}
    for name, t in state.items():
        if name.startswith("encoder.block.") and t.ndim == 2 and "relative_attention_bias" not in name:
            scale = t.abs().max() / torch.finfo(E4M3).max
            stored[name], stored[name[:-len("weight")] + "scale_weight"] = (t / scale).to(E4M3), scale
            values[name] = stored[name].float() * scale
        else:
            stored[name] = t.to(torch.bfloat16)
            values[name] = stored[name].float()
    return stored, values


def folder_with(tmp: Path, tiny_wan: Path, values: dict) -> Path:
    """A copy of the tiny folder (hard links) whose components hold `values` (component -> tensors)."""
    folder = tmp / "folder"
    shutil.copytree(tiny_wan, folder, copy_function=os.link)
    for sub, tensors in values.items():
        (folder / sub / f"{FILES[sub]}.safetensors").unlink()
        save_file(tensors, str(folder / sub / f"{FILES[sub]}.safetensors"))
    return folder


def test_official_pth_files_make_the_folder_video(tiny_wan, tiny, test_image, tmp_path):
    (vae, vae_config), (t5, _), (clip, _) = tiny["vae"], tiny["text_encoder"], tiny["image_encoder"]
    blocks = vae_config["num_res_blocks"]
    files = {"vae": write(tmp_path / "Wan2.1_VAE.pth", {vae_official(n, blocks): t for n, t in vae.items()}),
             "text_encoder": write(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth",
                                   {t5_official(n): t for n, t in t5.items()}),
             "image_encoder": write(tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
                                    clip_official(clip))}
    expected = minialg.load(tiny_wan, device="cpu", dtype=torch.float32)(test_image, PROMPT, **SIZE)
    pipe = minialg.load(tiny_wan, device="cpu", dtype=torch.float32, **files)
    assert torch.equal(pipe(test_image, PROMPT, **SIZE), expected) and expected.std() > 0.01
    rows = {row["component"]: row for row in minialg.check(tiny_wan, **files)}
    assert [rows[c]["format"] for c in files] == ["official"] * 3
    assert rows["vae"]["model"] == "a Wan 2.1 VAE (16 latent channels)"
    assert rows["text_encoder"]["precision"].startswith("F32 22 tensors")
    assert rows["image_encoder"]["bytes"] == files["image_encoder"].stat().st_size


def test_comfyui_files_make_the_folder_video_on_the_stored_values(tiny_wan, tiny, test_image, tmp_path):
    (vae, vae_config), (t5, _), (clip, _) = tiny["vae"], tiny["text_encoder"], tiny["image_encoder"]
    t5_stored, t5_values = scaled_fp8(t5)
    t5_stored["spiece_model"] = torch.frombuffer(bytearray((tiny_wan / "tokenizer" / "spiece.model").read_bytes()),
                                                 dtype=torch.uint8)
    values = {"vae": {n: t.bfloat16().float() for n, t in vae.items()}, "text_encoder": t5_values,
              "image_encoder": {n: t.half().float() for n, t in clip.items()}}
    files = {"vae": write(tmp_path / "wan_2.1_vae.safetensors",
                          {vae_official(n, vae_config["num_res_blocks"]): t.bfloat16() for n, t in vae.items()}),
             "text_encoder": write(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", t5_stored),
             "image_encoder": write(tmp_path / "clip_vision_h.safetensors", {n: t.half() for n, t in clip.items()})}
    pipe = minialg.load(tiny_wan, device="cpu", dtype=torch.float32, **files)
    frames = pipe(test_image, PROMPT, **SIZE)
    reference = minialg.load(folder_with(tmp_path, tiny_wan, values), device="cpu", dtype=torch.float32)
    expected = reference(test_image, PROMPT, **SIZE)
    assert torch.equal(frames, expected)
    plain = minialg.load(tiny_wan, device="cpu", dtype=torch.float32)(test_image, PROMPT, **SIZE)
    assert (expected - plain).abs().max() > 1e-4  # the stored values differ: the comparison has teeth
    q = pipe.text_encoder.encoder.block[1].layer[0].SelfAttention.q
    assert q.weight.dtype == E4M3 and q.scale_weight is not None  # fp8 in memory, as in the transformer
    rows = {row["component"]: row for row in minialg.check(tiny_wan, **files)}
    assert [rows[c]["format"] for c in files] == ["comfyui", "transformers", "transformers"]
    assert rows["text_encoder"]["precision"].endswith("; scaled fp8") and "F8_E4M3 14 tensors" in rows["text_encoder"]["precision"]
    assert rows["vae"]["precision"].startswith("BF16 194 tensors")


@pytest.mark.parametrize("layout", ["official", "open_clip"])
def test_clip_layouts_give_the_folders_image_tokens(tiny_wan, tiny, tmp_path, layout):
    state, config = tiny["image_encoder"]
    file = write(tmp_path / "clip.safetensors", clip_official(state, layout))
    source = component_files.weights("image_encoder", file, tiny_wan / "image_encoder" / "config.json",
                                     CLIPVision, CLIPVisionConfig)
    ours = checkpoint.load(CLIPVision, CLIPVisionConfig, source)
    folder = checkpoint.load(CLIPVision, CLIPVisionConfig, tiny_wan / "image_encoder")
    pixels = torch.randn(2, 3, config["image_size"], config["image_size"])
    with torch.no_grad():
        assert torch.equal(ours(pixels), folder(pixels))
    assert source.about["format"] == layout and source.file_name("encoder.layers.2.self_attn.v_proj.bias") == \
        ("visual.transformer.2.attn.to_qkv.bias" if layout == "official" else
         "visual.transformer.resblocks.2.attn.in_proj_bias")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_the_wan22_vae_from_its_official_file(tmp_path, suffix):
    from diffusers import AutoencoderKLWan
    from minialg.demo import tiny_configs

    config = {k: v for k, v in tiny_configs(64, family="wan22_ti2v")["vae"].items() if not k.startswith("_")}
    torch.manual_seed(0)
    AutoencoderKLWan(**config).save_pretrained(tmp_path / "vae")
    state = load_file(str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    official = {vae_official(n, config["num_res_blocks"], residual=True): t for n, t in state.items()}
    assert {vae22_to_diffusers(n) for n in official} == set(state)  # the public rules take the names back
    file = write(tmp_path / f"Wan2.2_VAE{suffix}", official)
    source = component_files.weights("vae", file, tmp_path / "vae" / "config.json", Wan22VAE, WanVAEConfig)
    ours = checkpoint.load(Wan22VAE, WanVAEConfig, source)
    folder = checkpoint.load(Wan22VAE, WanVAEConfig, tmp_path / "vae")
    video = torch.randn(1, 3, 5, 32, 32)
    with torch.no_grad():
        mean, _ = ours.encode(video)
        assert torch.equal(mean, folder.encode(video)[0]) and torch.equal(ours.decode(mean), folder.decode(mean))
    assert source.about["model"] == f"a Wan 2.2 VAE ({config['z_dim']} latent channels)"
    with pytest.raises(CheckpointError, match=r"a Wan 2.2 VAE \(48 latent channels\), but .*vae/config.json "
                                              r"describes a Wan 2.1 VAE \(16 latent channels\)"):
        component_files.weights("vae", file, WAN / "vae" / "config.json", WanVAE, WanVAEConfig)


class Settings:  # a pickled class: what weights_only refuses to build
    pass


def test_files_that_are_not_plain_or_known_are_refused(tiny_wan, tiny, tmp_path):
    torch.save({"decoder.middle.0.residual.0.gamma": torch.zeros(2), "settings": Settings()}, tmp_path / "code.pth")
    with pytest.raises(CheckpointError, match=r"code.pth: not a plain dict of tensors; torch.load\(weights_only=True\) "
                                              r"refused it"):
        minialg.check(tiny_wan, vae=tmp_path / "code.pth")
    torch.save({"state_dict": {"conv1.weight": torch.zeros(2)}}, tmp_path / "nested.pth")
    with pytest.raises(CheckpointError, match="nested.pth: not a plain dict of tensors"):
        minialg.check(tiny_wan, vae=tmp_path / "nested.pth")
    write(tmp_path / "ldm.safetensors", {"first_stage_model.decoder.up.1.block.0.conv1.weight": torch.zeros(2),
                                         "first_stage_model.encoder.conv_in.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"ldm.safetensors: not a Wan VAE; not a layout minialg knows: keys like "
                                              r"first_stage_model.decoder.up.N.block.N.conv1.weight, "
                                              r"first_stage_model.encoder.conv_in.weight$"):
        minialg.check(tiny_wan, vae=tmp_path / "ldm.safetensors")
    vae = write(tmp_path / "Wan2.1_VAE.pth", {vae_official(n): t for n, t in tiny["vae"][0].items()})
    with pytest.raises(CheckpointError, match=r"Wan2.1_VAE.pth: not a UMT5 text encoder; it holds a Wan VAE "
                                              r"\(official names\)"):
        minialg.check(tiny_wan, text_encoder=vae)
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "check", str(tiny_wan), "--image_encoder", str(vae)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 1 and "Traceback" not in out.stderr and "not a CLIP image encoder; it holds a Wan VAE" \
        in out.stderr
    (tmp_path / "vae.ckpt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="minialg reads .safetensors and .pth files"):
        minialg.check(tiny_wan, vae=tmp_path / "vae.ckpt")


def test_the_flags_reach_load_and_check(monkeypatch, tmp_path):
    import cli
    from minialg.config import load_config

    seen = {}
    monkeypatch.setattr(minialg, "load", lambda folder, **kw: seen.update(kw))
    monkeypatch.setattr(minialg, "check", lambda model, **kw: seen.update(kw) or [])
    flags = ["--vae", "v.pth", "--text_encoder", "t.safetensors", "--image_encoder", "c.safetensors"]
    for argv in (["--config", "wan_alg", "--image_path", "i", "--prompt", "p", "--output_path", "o.mp4"],
                 ["compare", "--config", "wan_alg", "--image_path", "i", "--prompt", "p", "--output_dir", "d"],
                 ["batch", "m.jsonl", "--output_dir", "d"], ["check", "m"]):
        seen.clear()
        parser = cli.top_parser() if argv[0].startswith("--") else cli.subcommand_parser(argv[0])
        args = parser.parse_args((argv if argv[0].startswith("--") else argv[1:]) + flags)
        cli.check(args) if argv[0] == "check" else cli.load_pipeline(args, tmp_path, load_config("wan_alg"))
        assert (seen["vae"], seen["text_encoder"], seen["image_encoder"]) == ("v.pth", "t.safetensors", "c.safetensors")


# ---- the real sizes: the ComfyUI files as sparse files (headers only), the published configs alone ----

def real_files(root: Path, spiece: bytes | None) -> dict[str, Path]:
    """ComfyUI's wan_2.1_vae (bf16), umt5_xxl_fp8_e4m3fn_scaled (block Linear weights fp8 with a float32 scale,
    168 of them; the embedding and norms taken as bf16 here), clip_vision_h (fp16) and the Wan 2.1 I2V 14B
    transformer in scaled fp8, their names and shapes from the reference classes on the meta device."""
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionConfig as Config, CLIPVisionModelWithProjection, UMT5Config, UMT5EncoderModel

    configs = {sub: {k: v for k, v in json.loads((WAN / sub / "config.json").read_text()).items()
                     if not k.startswith("_")} for sub in FILES}
    with torch.device("meta"):
        vae, t5 = AutoencoderKLWan(**configs["vae"]), UMT5EncoderModel(UMT5Config(**configs["text_encoder"]))
        clip = CLIPVisionModelWithProjection(Config(**configs["image_encoder"]))
    t5_tensors = {"scaled_fp8": ((0,), "F8_E4M3")} | ({"spiece_model": ((len(spiece),), "U8")} if spiece else {})
    for name, t in t5.state_dict().items():
        if name.startswith("encoder.block.") and t.ndim == 2 and "relative_attention_bias" not in name:
            t5_tensors |= {name: (tuple(t.shape), "F8_E4M3"), name[:-len("weight")] + "scale_weight": ((), "F32")}
        elif name != "encoder.embed_tokens.weight":
            t5_tensors[name] = (tuple(t.shape), "BF16")
    return {"vae": write_sparse(root / "wan_2.1_vae.safetensors",
                                {vae_official(n): (tuple(t.shape), "BF16") for n, t in vae.state_dict().items()}),
            "text_encoder": write_sparse(root / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", t5_tensors,
                                         {"spiece_model": spiece} if spiece else {}),
            "image_encoder": write_sparse(root / "clip_vision_h.safetensors",
                                          {"vision_model." + n.removeprefix("vision_model."): (tuple(t.shape), "F16")
                                           for n, t in clip.state_dict().items() if "position_ids" not in n}),
            "transformer": write_sparse(root / "wan2.1_i2v_480p_14B_fp8_scaled.safetensors",
                                        real_tensors(WAN, "comfyui", "scaled_e4m3"))}


def no_download(*args, **kwargs):
    raise OSError("offline")


def test_the_real_comfyui_files_run_from_the_published_configs_alone(tiny_wan, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", tmp_path / "weights")
    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_download)
    spiece = (tiny_wan / "tokenizer" / "spiece.model").read_bytes()  # the real one is 4.5 MB; the bytes are real here
    files = real_files(tmp_path, spiece)
    rows = {row["component"]: row for row in minialg.check("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", **files)}
    assert (tmp_path / "weights" / "umt5-xxl" / "spiece.model").read_bytes() == spiece  # the file's own tokenizer
    assert rows["vae"]["model"] == "a Wan 2.1 VAE (16 latent channels)" and rows["vae"]["format"] == "comfyui"
    assert rows["vae"]["precision"] == f"BF16 {rows['vae']['tensors']} tensors {2 * rows['vae']['parameters'] / 1e9:.2f} GB"
    in_fp8 = 24 * (4 * 4096 ** 2 + 3 * 4096 * 10240)  # 24 blocks: q, k, v, o and the gated MLP's three
    t5 = rows["text_encoder"]
    assert t5["model"] == "UMT5-XXL" and 5.6e9 < t5["parameters"] < 5.7e9 and t5["tensors"] == 242 + 168
    assert t5["precision"] == (f"F8_E4M3 168 tensors {in_fp8 / 1e9:.2f} GB, BF16 74 tensors "
                               f"{2 * (t5['parameters'] - in_fp8 - 168) / 1e9:.2f} GB, F32 168 tensors 0.00 GB; "
                               "scaled fp8")
    assert rows["image_encoder"]["model"] == "CLIP ViT-H/14's vision tower" and 0.6e9 < rows["image_encoder"]["parameters"] < 0.65e9
    assert all(row["config"].startswith(str(WAN)) for row in rows.values() if "config" in row)
    env = dict(os.environ, MINIALG_WEIGHTS=str(tmp_path / "weights"), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "check", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
                          *[f"--{k}={v}" for k, v in files.items()]], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    assert f"{files['text_encoder']}: UMT5-XXL\n" in out.stdout and "transformers layout (transformers names" in out.stdout


def test_without_a_tokenizer_the_published_configs_say_where_it_goes(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", tmp_path / "weights")
    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_download)
    files = real_files(tmp_path, None)
    with pytest.raises(CheckpointError, match=re.escape(
            f"the UMT5 tokenizer is missing: {tmp_path / 'weights' / 'umt5-xxl' / 'spiece.model'} (the hub's "
            "google/umt5-xxl/spiece.model, ~4.5 MB, no weights) could not be downloaded (OSError); put that file there")):
        minialg.check("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", **files)
    files.pop("image_encoder")  # not every weight from a file: the hub checkpoint is the folder (here: offline)
    monkeypatch.setattr(checkpoint, "download", lambda repo, dest=None: (_ for _ in ()).throw(CheckpointError(repo)))
    with pytest.raises(CheckpointError, match="^Wan-AI/Wan2.1-I2V-14B-480P-Diffusers$"):
        minialg.check("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", **files)
