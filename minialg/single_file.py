"""Wan transformers outside diffusers' folder layout: `minialg.load(model, transformer=FILE, transformer_2=FILE)`.

    one .safetensors file   the official tensor names (Wan-AI's wan/modules/model.py), the same behind ComfyUI's
                            `model.diffusion_model.` prefix, or diffusers' names
    a folder                the official sharded layout (Wan-AI/Wan2.1-I2V-14B-480P): diffusion_pytorch_model-0000N-
                            of-0000M.safetensors, their .index.json and the official config.json (dim, num_heads, ...)

in any precision as stored: float32, bf16, fp16, fp8 (e4m3fn, e5m2) and ComfyUI's scaled fp8 (minialg.fp8). The
file's tensors load through minialg.checkpoint like any component's: `weights(path, config_file)` gives their
files, the config and the renaming from the official names to diffusers' (which minialg's WanTransformer uses):

    official                               diffusers
    patch_embedding                        patch_embedding
    time_embedding.0 / .2                  condition_embedder.time_embedder.linear_1 / linear_2
    time_projection.1                      condition_embedder.time_proj
    text_embedding.0 / .2                  condition_embedder.text_embedder.linear_1 / linear_2
    img_emb.proj.0 / 1 / 3 / 4             condition_embedder.image_embedder.norm1 / ff.net.0.proj / ff.net.2 / norm2
    head.head, head.modulation             proj_out, scale_shift_table
    blocks.N.self_attn.q/k/v/o             blocks.N.attn1.to_q/to_k/to_v/to_out.0   (norm_q, norm_k: the same)
    blocks.N.cross_attn.k_img/v_img        blocks.N.attn2.add_k_proj/add_v_proj     (norm_k_img: norm_added_k)
    blocks.N.norm3                         blocks.N.norm2   (the cross-attention norm; the official norm2, before
                                                             the MLP, has no weights: diffusers calls it norm3)
    blocks.N.ffn.0 / .2, .modulation       blocks.N.ffn.net.0.proj / ffn.net.2, .scale_shift_table

Which model a file holds is read from its header alone (names and shapes, no tensor data): the width and input
channels of patch_embedding, the number of blocks and whether there is an image branch (img_emb) tell Wan 2.1
I2V 14B (480P and 720P are the same transformer), a Wan 2.2 I2V-A14B expert (high and low noise: the same shapes)
and Wan 2.2 TI2V-5B apart. The config is the model folder's transformer config.json when it has one (it must
describe the same model), else the published one in minialg/real_configs.
"""

import math
import re
from pathlib import Path

from . import fp8
from .checkpoint import SAFETENSORS_DTYPES, CheckpointError, Weights, read_header, read_json, weight_files

REAL = Path(__file__).resolve().parent / "real_configs"
VARIANTS = {"Wan2.1-I2V-14B-480P-Diffusers": "Wan 2.1 I2V 14B (480P or 720P)",
            "Wan2.2-I2V-A14B-Diffusers": "Wan 2.2 I2V-A14B expert (high or low noise)",
            "Wan2.2-TI2V-5B-Diffusers": "Wan 2.2 TI2V-5B"}
PREFIX = "model.diffusion_model."  # ComfyUI's, before every name
SKIPPED = ("scaled_fp8", "scale_input")  # the scaled-fp8 marker, input scales for fp8 matmuls: not used here

TOP = {"patch_embedding": "patch_embedding", "time_projection.1": "condition_embedder.time_proj",
       **{f"{kind}_embedding.{i}": f"condition_embedder.{kind}_embedder.linear_{j}"
          for kind in ("time", "text") for i, j in ((0, 1), (2, 2))},
       **{f"img_emb.proj.{i}": f"condition_embedder.image_embedder.{part}"
          for i, part in ((0, "norm1"), (1, "ff.net.0.proj"), (3, "ff.net.2"), (4, "norm2"))},
       "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
       "head.head": "proj_out", "head.modulation": "scale_shift_table"}
BLOCK = {"modulation": "scale_shift_table", "norm3": "norm2", "norm2": "norm3", "ffn.0": "ffn.net.0.proj",
         "ffn.2": "ffn.net.2",
         **{f"{official}.{a}": f"{ours}.{b}" for official, ours in (("self_attn", "attn1"), ("cross_attn", "attn2"))
            for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"), ("norm_q", "norm_q"),
                         ("norm_k", "norm_k"), ("k_img", "add_k_proj"), ("v_img", "add_v_proj"),
                         ("norm_k_img", "norm_added_k"))}}


def convert(name: str, top: dict, block: dict) -> str:
    """A tensor name through the tables: module path looked up whole (in `block` under blocks.N.), leaf kept.
    Names the tables do not know come back unchanged (the header check then calls them unexpected)."""
    match = re.fullmatch(r"(blocks\.\d+\.)(.+)", name)
    start, path = match.groups() if match else ("", name)
    table = block if match else top
    module, leaf = (path, "") if path in table else (path.rpartition(".")[0], path.rpartition(".")[2])
    if module not in table:
        return name
    return start + table[module] + (f".{leaf}" if leaf else "")


def to_diffusers(name: str) -> str:
    return convert(name, TOP, BLOCK)


def to_official(name: str) -> str:
    return convert(name, {v: k for k, v in TOP.items()}, {v: k for k, v in BLOCK.items()})


def shape_of(config: dict) -> tuple:
    """What a header shows of a config: (width, input channels, blocks, image branch)."""
    return (config["num_attention_heads"] * config["attention_head_dim"], config["in_channels"],
            config["num_layers"], config.get("image_dim") is not None)


def shape_in(stored: dict) -> tuple:
    """The same, read from tensor names (diffusers') and shapes."""
    width, channels = stored["patch_embedding.weight"][1][:2]
    blocks = len({name.split(".")[1] for name in stored if name.startswith("blocks.")})
    return width, channels, blocks, "condition_embedder.image_embedder.norm1.weight" in stored


def describe(shape: tuple) -> str:
    width, channels, blocks, image = shape
    return f"width {width}, {channels} input channels, {blocks} blocks, {'an' if image else 'no'} image branch"


def published(shape: tuple) -> Path | None:
    """The config.json in minialg/real_configs of the published transformer with this shape, if any."""
    return next((REAL / name / "transformer" / "config.json" for name in VARIANTS
                 if shape_of(read_json(REAL / name / "transformer" / "config.json")) == shape), None)


def weights(path, config_file: Path) -> Weights:
    """A Wan transformer file or official folder as Weights for minialg.checkpoint; `config_file`: the model
    folder's transformer config.json (used when it exists). Raises a one-line CheckpointError for a file that is
    not a Wan transformer minialg runs, naming what it is or is not."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"transformer file not found: {path}")
    if path.is_file() and path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: minialg reads .safetensors files (not {path.suffix or 'this kind of file'})")
    files = weight_files(path) if path.is_dir() else [path]
    stored = {name: info for file in files for name, info in read_header(file).items()}
    prefix = PREFIX if any(name.startswith(PREFIX) for name in stored) else ""
    official = f"{prefix}blocks.0.self_attn.q.weight" in stored

    def rename(name: str) -> str | None:
        name = name.removeprefix(prefix)
        if name.split(".")[-1] in SKIPPED:
            return None
        return to_diffusers(name) if official else name

    def file_name(name: str) -> str:
        return prefix + (to_official(name) if official else name)

    ours = {rename(name): info for name, info in stored.items() if rename(name) is not None}  # diffusers' names
    if "patch_embedding.weight" not in ours or "blocks.0.attn1.to_q.weight" not in ours:
        raise CheckpointError(f"{path}: not a Wan transformer (no patch_embedding.weight / blocks.0.self_attn.q."
                              f"weight); found keys like {', '.join(sorted(stored)[:4]) or 'none'}")
    scaled = f"{prefix}scaled_fp8" in stored
    check_scales(path, ours, scaled, file_name)
    shape = shape_in(ours)
    config, config_path = pick_config(path, shape, config_file)
    known = published(shape)
    about = {"format": "comfyui" if prefix else "official" if official else "diffusers",
             "names": "official" if official else "diffusers", "config": str(config_path),
             "model": VARIANTS[known.parent.parent.name] if known else f"a Wan transformer ({describe(shape)})",
             "precision": precision(ours) + ("; scaled fp8" if scaled else ""),
             "bytes": sum(file.stat().st_size for file in files)}
    return Weights(config, files, path, rename, file_name, about)


def check_scales(path: Path, ours: dict, scaled: bool, file_name) -> None:
    """In a scaled fp8 file every fp8 weight has its scale_weight (`ours`: module name -> (dtype, shape))."""
    for name, (dtype, _) in ours.items():
        if scaled and dtype in fp8.FP8 and name.endswith(".weight") and name[:-6] + "scale_weight" not in ours:
            raise CheckpointError(f"{path}: a scaled fp8 file, but fp8 tensor '{file_name(name)}' has no "
                                  "scale_weight")


def precision(stored: dict) -> str:
    """The dtypes of the tensors, the largest share first: "F8_E4M3 480 tensors 16.15 GB, F32 1295 tensors ..."."""
    sizes = {}  # dtype -> (tensors, bytes)
    for dtype, shape in stored.values():
        count, size = sizes.get(dtype, (0, 0))
        sizes[dtype] = count + 1, size + SAFETENSORS_DTYPES.get(dtype, 0) * math.prod(shape)
    return ", ".join(f"{dtype} {count} tensors {size / 1e9:.2f} GB"
                     for dtype, (count, size) in sorted(sizes.items(), key=lambda item: -item[1][1]))


def pick_config(path: Path, shape: tuple, config_file: Path) -> tuple[dict, Path]:
    """The config for a transformer of this shape: a diffusers config.json beside its files, else the model
    folder's (`config_file`), else the published one. An official config.json beside the files must agree."""
    own = read_json(path / "config.json") if (path / "config.json").is_file() else {}
    where = path / "config.json" if "num_attention_heads" in own else config_file if config_file.is_file() \
        else published(shape)
    if where is None:
        raise CheckpointError(f"{path}: a Wan transformer with {describe(shape)}, not one minialg has a config "
                              f"for ({', '.join(VARIANTS.values())})")
    config = read_json(where)
    if shape_of(config) != shape:
        raise CheckpointError(f"{path}: a Wan transformer with {describe(shape)}, but {where} describes one with "
                              f"{describe(shape_of(config))}")
    ours = dict(config, dim=shape[0])
    for key, same in (("dim", "dim"), ("num_heads", "num_attention_heads"), ("num_layers", "num_layers"),
                      ("ffn_dim", "ffn_dim"), ("in_dim", "in_channels"), ("out_dim", "out_channels")):
        if "dim" in own and key in own and own[key] != ours.get(same):
            raise CheckpointError(f"{path / 'config.json'} says {key} {own[key]}, but {where} says {ours.get(same)}")
    return config, where
