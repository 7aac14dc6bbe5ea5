"""Wan's VAE, UMT5 text encoder and CLIP image encoder from single files: `minialg.load(model, vae=FILE,
text_encoder=FILE, image_encoder=FILE)`, beside `transformer=` (minialg.single_file).

    component      published as                                        tensor names (layout)
    vae            Wan2.1_VAE.pth, Wan2.2_VAE.pth (Wan-AI)             official: wan/modules/vae.py, vae2_2.py
                   wan_2.1_vae.safetensors, wan2.2_vae (ComfyUI)       the same ("comfyui")
    text_encoder   models_t5_umt5-xxl-enc-bf16.pth (Wan-AI)            official: wan/modules/t5.py
                   umt5_xxl_fp16, umt5_xxl_fp8_e4m3fn_scaled (ComfyUI) transformers' (comfy/text_encoders/t5.py)
    image_encoder  models_clip_open-clip-xlm-roberta-large-vit-        official: wan/modules/clip.py; only
                   huge-14.pth (Wan-AI)                                `visual.*` is used (not the text tower)
                   clip_vision_h.safetensors (ComfyUI)                 transformers' (vision_model.*)
                   open_clip's own visual.* names                      open_clip (ComfyUI's convert_to_transformers)

and each in diffusers'/transformers' names, as in the folders. A file's layout and component are read from its
tensor names (and shapes); its config is the model folder's for that component. Each layout is one function from
minialg's tensor names (diffusers'/transformers') to the file's, the inverse of the public conversion:

    VAE (diffusers' convert_vae, convert_vae_22)    official
    quant_conv / post_quant_conv                    conv1 / conv2
    encoder.conv_in, .norm_out, .conv_out           encoder.conv1, .head.0, .head.2 (decoder the same)
    encoder.mid_block.resnets.0 / attentions.0 / 1  encoder.middle.0 / 1 / 2
    2.1: encoder.down_blocks.K                      encoder.downsamples.K (one flat list)
         decoder.up_blocks.I.resnets.J              decoder.upsamples.(I (R + 2) + J)   R = num_res_blocks
         decoder.up_blocks.I.upsamplers.0           decoder.upsamples.(I (R + 2) + R + 1)
    2.2: {en,de}coder.{down,up}_blocks.I.resnets.J  {en,de}coder.{down,up}samples.I.{down,up}samples.J
         down_blocks.I.downsampler / up_blocks.I.upsampler     ...samples.I.downsamples.R / upsamples.(R + 1)
    in a residual block: norm1 conv1 norm2 conv2 conv_shortcut -> residual.0 .2 .3 .6, shortcut

    UMT5 (transformers)                          official
    shared, encoder.final_layer_norm             token_embedding, norm
    encoder.block.N.layer.0.layer_norm           blocks.N.norm1          (layer.1.layer_norm: norm2)
    ....layer.0.SelfAttention.q/k/v/o            blocks.N.attn.q/k/v/o   (relative_attention_bias: pos_embedding.
    ....layer.1.DenseReluDense.wi_0/wi_1/wo      blocks.N.ffn.gate.0 / fc1 / fc2                     embedding)

    CLIP (transformers)             official (Wan)                 open_clip
    embeddings.patch_embedding      visual.patch_embedding         visual.conv1
    embeddings.class_embedding      visual.cls_embedding (1,1,C)   visual.class_embedding
    embeddings.position_embedding   visual.pos_embedding (1,L,C)   visual.positional_embedding
    pre_layrnorm / post_layernorm   visual.pre_norm / post_norm    visual.ln_pre / ln_post
    encoder.layers.N.layer_norm1/2  visual.transformer.N.norm1/2   visual.transformer.resblocks.N.ln_1/2
    ....self_attn.q/k/v_proj        ....attn.to_qkv (q, k, v one   ....attn.in_proj_weight / in_proj_bias
                                     after another)
    ....self_attn.out_proj          ....attn.proj                  ....attn.out_proj
    ....mlp.fc1 / fc2               ....mlp.0 / mlp.2              ....mlp.c_fc / c_proj

Precision as stored: fp32, bf16, fp16; fp8 Linear weights in the text encoder's blocks stay fp8 (minialg.fp8),
with ComfyUI's scaled fp8 (`scaled_fp8` marker, a `scale_weight` per weight); other fp8 tensors are up-cast at
load. `.pth` files are read only as plain tensor dicts (minialg.checkpoint.read_pth).

With every weight from a file, a hub id whose configs minialg ships (minialg/real_configs) needs no download:
those configs make the folder (registry.folder_of), and the UMT5 tokenizer is google/umt5-xxl's spiece.model (a
4.5 MB file, no weights) in weights/umt5-xxl/: taken from a ComfyUI text encoder file's `spiece_model` tensor
where it has one, else downloaded once from the hub (fetch_tokenizer).
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import checkpoint, fp8, single_file
from .checkpoint import CheckpointError, Weights

RESIDUAL = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
            "conv_shortcut": "shortcut"}
VAE_ENDS = {"conv_in": "conv1", "norm_out": "head.0", "conv_out": "head.2", "mid_block.attentions.0": "middle.1"}
T5_BLOCK = {"layer.0.layer_norm": "norm1", "layer.1.layer_norm": "norm2",
            "layer.0.SelfAttention.relative_attention_bias": "pos_embedding.embedding",
            **{f"layer.0.SelfAttention.{p}": f"attn.{p}" for p in "qkvo"},
            **{f"layer.1.DenseReluDense.{a}": f"ffn.{b}" for a, b in (("wi_0", "gate.0"), ("wi_1", "fc1"),
                                                                       ("wo", "fc2"))}}
T5_TOP = {"shared": "token_embedding", "encoder.final_layer_norm": "norm"}
CLIP_TOP = {  # ours -> (official, open_clip)
    "embeddings.patch_embedding.weight": ("visual.patch_embedding.weight", "visual.conv1.weight"),
    "embeddings.class_embedding": ("visual.cls_embedding", "visual.class_embedding"),
    "embeddings.position_embedding.weight": ("visual.pos_embedding", "visual.positional_embedding"),
    **{f"{ours}.{leaf}": (f"visual.{a}.{leaf}", f"visual.{b}.{leaf}") for leaf in ("weight", "bias")
       for ours, a, b in (("pre_layrnorm", "pre_norm", "ln_pre"), ("post_layernorm", "post_norm", "ln_post"))}}
CLIP_LAYER = {"layer_norm1": ("norm1", "ln_1"), "layer_norm2": ("norm2", "ln_2"),
              "self_attn.out_proj": ("attn.proj", "attn.out_proj"), "mlp.fc1": ("mlp.0", "mlp.c_fc"),
              "mlp.fc2": ("mlp.2", "mlp.c_proj")}
UMT5_TOKENIZER = ("google/umt5-xxl", "spiece.model")  # hub repo, file


def vae_name(name: str, cfg: dict) -> tuple[str, int | None]:
    """diffusers' AutoencoderKLWan name -> the official one (Wan 2.1, or 2.2 where cfg says is_residual)."""
    top = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
    module, _, rest = name.partition(".")
    if module in top:
        return f"{top[module]}.{rest}", None
    for ours, theirs in VAE_ENDS.items():
        if rest.startswith(ours + "."):
            return f"{module}.{theirs}{rest[len(ours):]}", None
    blocks, residual = cfg["num_res_blocks"], cfg.get("is_residual", False)
    if match := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
        where, inner = f"middle.{2 * int(match[1])}", match[2]
    else:
        kind, i, inner = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(.+)", rest).groups()
        i, j = int(i), None
        if match := re.fullmatch(r"resnets\.(\d+)\.(.+)", inner):
            j, inner = int(match[1]), match[2]
        elif kind == "up" or residual:  # the level's sampler, after its residual blocks
            j, inner = blocks + (kind == "up"), inner.split(".", 2 if inner.startswith("upsamplers.") else 1)[-1]
        where = (f"{kind}samples.{i}.{kind}samples.{j}" if residual else f"downsamples.{i}" if kind == "down"
                 else f"upsamples.{i * (blocks + 2) + j}")
    part, _, leaf = inner.partition(".")
    return f"{module}.{where}.{RESIDUAL.get(part, part)}.{leaf}", None


def t5_name(name: str, cfg: dict) -> tuple[str, int | None]:
    """transformers' UMT5 encoder name -> the official one."""
    if match := re.fullmatch(r"encoder\.block\.(\d+)\.(.+)\.weight", name):
        return f"blocks.{match[1]}.{T5_BLOCK[match[2]]}.weight", None
    return f"{T5_TOP[name.removesuffix('.weight')]}.weight", None


def clip_name(name: str, cfg: dict, which: int) -> tuple[str, int | None]:
    """transformers' CLIP vision name -> official (which 0) or open_clip (1), with the part index where one stored
    tensor holds several (q, k, v) or is reshaped (the official (1, 1, C) class and (1, L, C) position tables)."""
    if name in CLIP_TOP:
        reshaped = which == 0 and name.startswith(("embeddings.class", "embeddings.position"))
        return CLIP_TOP[name][which], 0 if reshaped else None
    n, module, leaf = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name).groups()
    start = ("visual.transformer.", "visual.transformer.resblocks.")[which] + n
    if qkv := re.fullmatch(r"self_attn\.([qkv])_proj", module):
        fused = ("attn.to_qkv." + leaf, "attn.in_proj_" + leaf)[which]
        return f"{start}.{fused}", "qkv".index(qkv[1])
    return f"{start}.{CLIP_LAYER[module][which]}.{leaf}", None


@dataclass
class Layout:
    names: str  # "official", "open_clip", "diffusers", "transformers"
    marker: str  # a tensor name that only files of this layout hold
    name_of: Callable[[str, dict], tuple[str, int | None]] | None  # ours -> the file's (None: ours)
    unused: Callable[[str], bool] = lambda name: False  # tensors of the file the component does not use


LAYOUTS = {  # the marker: as ComfyUI tells a Wan VAE (decoder.middle...), a UMT5, a CLIP vision tower apart
    "vae": [Layout("official", "decoder.middle.0.residual.0.gamma", vae_name),
            Layout("diffusers", "decoder.mid_block.resnets.0.norm1.gamma", None)],
    "text_encoder": [Layout("official", "blocks.0.attn.q.weight", t5_name),
                     Layout("transformers", "encoder.block.0.layer.0.SelfAttention.q.weight", None)],
    "image_encoder": [Layout("official", "visual.transformer.0.attn.to_qkv.weight", lambda n, c: clip_name(n, c, 0),
                             lambda n: n.startswith("textual.") or n in ("log_scale", "visual.head")),
                      Layout("open_clip", "visual.transformer.resblocks.0.attn.in_proj_weight",
                             lambda n, c: clip_name(n, c, 1), lambda n: not n.startswith("visual.") or n == "visual.proj"),
                      Layout("transformers", "vision_model.encoder.layers.0.self_attn.q_proj.weight", None),
                      Layout("transformers", "encoder.layers.0.self_attn.q_proj.weight", None)]}
RESIDUAL_VAE = ("decoder.upsamples.0.upsamples.0.residual.2.weight", "encoder.down_blocks.0.resnets.0.conv1.weight")
# ^ Wan 2.2's nested levels, in official and in diffusers' names (2.1: flat downsamples / down_blocks)
WHAT = {"vae": "Wan VAE", "text_encoder": "UMT5 text encoder", "image_encoder": "CLIP image encoder"}
TRANSFORMER = ("blocks.0.self_attn.q.weight", single_file.PREFIX + "blocks.0.self_attn.q.weight",
               "blocks.0.attn1.to_q.weight")


def layout_of(component: str, stored: dict) -> Layout | None:
    return next((layout for layout in LAYOUTS[component] if layout.marker in stored), None)


def identify(stored: dict) -> str:
    """What a file holds, for a message: 'it holds a Wan VAE (official names)', or its tensor names' patterns."""
    for component in LAYOUTS:
        if layout := layout_of(component, stored):
            return f"it holds a {WHAT[component]} ({layout.names} names)"
    if any(name in stored for name in TRANSFORMER):
        return "it holds a Wan transformer (transformer=)"
    patterns = sorted({re.sub(r"(^|\.)\d+(?=\.|$)", r"\1N", name) for name in stored})  # blocks.N.attn...
    return f"not a layout minialg knows: keys like {', '.join(patterns[:4]) or '(none)'}"


def shape_of(component: str, config: dict) -> tuple:
    """What tells one model of a component from another: (Wan 2.2's residual VAE, latent channels), (width,
    vocabulary), (width)."""
    return {"vae": lambda: (config.get("is_residual", False), config["z_dim"]),
            "text_encoder": lambda: (config["d_model"], config["vocab_size"]),
            "image_encoder": lambda: (config["hidden_size"],)}[component]()


def shape_in(component: str, stored: dict, ours: dict) -> tuple:
    """The same from a file: its names as stored, and ours (tensor name -> (dtype, shape))."""
    shape = lambda name: ours.get(name, (None, (None, None)))[1]  # noqa: E731
    return {"vae": lambda: (any(n in stored for n in RESIDUAL_VAE), shape("post_quant_conv.weight")[0]),
            "text_encoder": lambda: tuple(shape("shared.weight")[::-1]),
            "image_encoder": lambda: (shape("embeddings.patch_embedding.weight")[0],)}[component]()


def describe(component: str, shape: tuple) -> str:
    if component == "vae":
        return f"a Wan {'2.2' if shape[0] else '2.1'} VAE ({shape[1]} latent channels)"
    if component == "text_encoder":
        return "UMT5-XXL" if shape == (4096, 256384) else f"a UMT5 encoder (width {shape[0]}, vocabulary {shape[1]})"
    return "CLIP ViT-H/14's vision tower" if shape == (1280,) else f"a CLIP vision tower (width {shape[0]})"


def weights(component: str, path, config_file: Path, model_cls, config_cls) -> Weights:
    """A VAE, text encoder or image encoder file as Weights for minialg.checkpoint, configured by the model
    folder's `config_file`. Raises a one-line CheckpointError for a file that is not that component, or not in a
    layout minialg knows, or of another model than the config describes."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{component} file not found: {path}")
    if path.suffix not in (".safetensors", ".pth"):
        raise CheckpointError(f"{path}: minialg reads .safetensors and .pth files (not {path.suffix or 'this'})")
    stored = checkpoint.header_of(path)
    layout = layout_of(component, stored)
    if layout is None:
        raise CheckpointError(f"{path}: not a {WHAT[component]}; {identify(stored)}")
    config = checkpoint.read_json(config_file)
    module = checkpoint.build(model_cls, config_cls, Weights(config, [], path))
    table, parts = {}, {}  # the file's name -> ours, or [ours, ...] in order (one stored tensor holding several)
    for ours in module.state_dict():
        theirs, part = layout.name_of(ours, config) if layout.name_of else (ours, None)
        if part is None:
            table[theirs] = ours
        else:
            parts.setdefault(theirs, {})[part] = ours
    table |= {theirs: [held[i] for i in sorted(held)] for theirs, held in parts.items()}
    back = {ours: theirs for theirs, held in table.items() for ours in ([held] if isinstance(held, str) else held)}

    def rename(name: str):
        if name in table:
            return table[name]
        unused = name.split(".")[-1] in single_file.SKIPPED or name == "spiece_model" or layout.unused(name)
        return None if unused else name

    ours = {target: (dtype, shape) for name, (dtype, stored_shape) in stored.items()
            for target, shape in checkpoint.held(module, Weights(config, [], path, rename), name, stored_shape)}
    found, wanted = shape_in(component, stored, ours), shape_of(component, config)
    if found != wanted:
        raise CheckpointError(f"{path}: {describe(component, found)}, but {config_file} describes "
                              f"{describe(component, wanted)}")
    scaled = "scaled_fp8" in stored
    single_file.check_scales(path, ours, scaled, lambda name: back.get(name, name))
    precision = single_file.precision(ours) + ("; scaled fp8" if scaled else "")
    fp8.keep_fp8(module, ours)  # fp8 stays fp8 in the text encoder's block Linear layers; elsewhere it is up-cast
    known = module.state_dict()
    upcast = [name for name, (dtype, _) in ours.items() if dtype in fp8.FP8 and name in known and name.rpartition(
        ".")[2] not in getattr(module.get_submodule(name.rpartition(".")[0]), "stored", ())]
    precision += f"; {len(upcast)} fp8 tensors up-cast at load" if upcast else ""
    comfyui = component == "vae" and layout.names == "official" and path.suffix == ".safetensors"
    about = {"format": "comfyui" if comfyui else layout.names, "names": layout.names, "config": str(config_file),
             "model": describe(component, found), "precision": precision, "bytes": path.stat().st_size}
    return Weights(config, [path], path, rename, lambda name: back.get(name, name), about)


def published(model) -> Path | None:
    """The published configs (minialg/real_configs) of a hub id that is neither a local path nor downloaded."""
    name = str(model)
    configs = single_file.REAL / name.rpartition("/")[2]
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name) or Path(name).expanduser().exists() or not configs.is_dir():
        return None
    return None if (checkpoint.WEIGHTS_DIR / configs.name / "model_index.json").is_file() else configs


def is_published(folder: Path) -> bool:
    return folder.resolve().parent == single_file.REAL.resolve()


def spiece_of(folder: Path) -> Path:
    """The UMT5 tokenizer of a Wan folder: its own, or for the published configs weights/umt5-xxl/spiece.model."""
    if is_published(folder):
        return checkpoint.WEIGHTS_DIR / "umt5-xxl" / UMT5_TOKENIZER[1]
    return folder / "tokenizer" / "spiece.model"


def fetch_tokenizer(folder: Path, text_encoder_file) -> None:
    """Make sure the published configs have their tokenizer (spiece_of): from the text encoder file's
    `spiece_model` tensor (ComfyUI's files carry one) where it has one, else downloaded: one small file."""
    target = spiece_of(folder)
    if not is_published(folder) or target.is_file():
        return
    import sentencepiece
    from safetensors import safe_open

    file = Path(text_encoder_file).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    if file.suffix == ".safetensors" and "spiece_model" in checkpoint.read_header(file):
        with safe_open(str(file), framework="pt") as f:
            blob = f.get_tensor("spiece_model").numpy().tobytes()
        try:
            sentencepiece.SentencePieceProcessor(model_proto=blob)
        except Exception as e:  # noqa: BLE001 (sentencepiece raises RuntimeError or its own)
            raise CheckpointError(f"{file}: its spiece_model tensor is not a sentencepiece model ({str(e).splitlines()[0]})")
        target.write_bytes(blob)
        return
    from huggingface_hub import hf_hub_download

    repo, name = UMT5_TOKENIZER
    try:
        hf_hub_download(repo, name, local_dir=target.parent)
    except Exception as e:  # offline, blocked: the one file is named with where it goes
        raise CheckpointError(f"the UMT5 tokenizer is missing: {target} (the hub's {repo}/{name}, ~4.5 MB, no "
                              f"weights) could not be downloaded ({type(e).__name__}); put that file there")
