"""The real Wan 2.1 I2V 14B and CogVideoX-5b-I2V layouts, checked from headers alone.

The folder is built from the published configs with the reference libraries' own tensor names and shapes
(diffusers/transformers modules on the meta device), sharded with index files like the published checkpoint,
and written as sparse files: headers only, no tensor data on disk.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minialg
from minialg.checkpoint import CheckpointError
from minialg.demo import train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
WAN = ROOT / "minialg" / "real_configs" / "Wan2.1-I2V-14B-480P-Diffusers"
COGVIDEOX = ROOT / "minialg" / "real_configs" / "CogVideoX-5b-I2V"
WAN22 = ROOT / "minialg" / "real_configs" / "Wan2.2-I2V-A14B-Diffusers"
TI2V = ROOT / "minialg" / "real_configs" / "Wan2.2-TI2V-5B-Diffusers"
DTYPES = {torch.float32: ("F32", 4), torch.bfloat16: ("BF16", 2), torch.float16: ("F16", 2)}
CODE_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "U8": 1}


def write_sparse(path: Path, tensors: dict[str, tuple[tuple, "torch.dtype | str"]], data: dict | None = None) -> Path:
    """A safetensors file whose data region is a hole: the header is real, the data never written, except the
    bytes in `data` (name -> bytes). A dtype is a torch dtype or a safetensors code ("F8_E4M3", ...)."""
    header, offset = {}, 0
    for name, (shape, dtype) in tensors.items():
        code = DTYPES[dtype][0] if isinstance(dtype, torch.dtype) else dtype
        nbytes = CODE_BYTES[code] * int(torch.Size(shape).numel())
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    path.unlink(missing_ok=True)  # never write through a hard link into another folder's file
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name, raw in (data or {}).items():
            f.seek(8 + len(blob) + header[name]["data_offsets"][0])
            f.write(raw)
        f.truncate(8 + len(blob) + offset)
    return path


def write_component(folder: Path, stem: str, tensors: dict, shards: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else f"{stem}.safetensors"
        part = names[i * len(names) // shards:(i + 1) * len(names) // shards]
        write_sparse(folder / file, {n: tensors[n] for n in part})
        weight_map.update({n: file for n in part})
    if shards > 1:
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def reference_tensors(component: str, real: Path = WAN) -> dict:
    """Names, shapes and dtypes of the published files, from the reference classes built on meta."""
    from diffusers import AutoencoderKLCogVideoX, AutoencoderKLWan, CogVideoXTransformer3DModel, WanTransformer3DModel
    from transformers import (CLIPVisionConfig, CLIPVisionModelWithProjection, T5Config, T5EncoderModel, UMT5Config,
                              UMT5EncoderModel)

    config = json.loads((real / component / "config.json").read_text())
    kwargs = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "model_type")}
    builders = {"transformer": lambda: WanTransformer3DModel(**kwargs),
                "transformer_2": lambda: WanTransformer3DModel(**kwargs),
                "vae": lambda: AutoencoderKLWan(**kwargs),
                "text_encoder": lambda: UMT5EncoderModel(UMT5Config(**kwargs)),
                "image_encoder": lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**kwargs))}
    if real == COGVIDEOX:
        builders.update(transformer=lambda: CogVideoXTransformer3DModel(**kwargs),
                        vae=lambda: AutoencoderKLCogVideoX(**kwargs),
                        text_encoder=lambda: T5EncoderModel(T5Config(**kwargs)))
    with torch.device("meta"):
        model = builders[component]()
    fp32 = component in ("vae", "image_encoder") and real != COGVIDEOX
    tensors = {name: (tuple(t.shape), torch.float32 if fp32 else torch.bfloat16)
               for name, t in model.state_dict().items()}
    tensors.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight: saved once
    return tensors


def write_checkpoint(folder: Path, real: Path, layout) -> Path:
    for component, stem, shards in layout:
        write_component(folder / component, stem, reference_tensors(component, real), shards)
        shutil.copy(real / component / "config.json", folder / component / "config.json")
    for sub in ("scheduler", "image_processor"):
        if (real / sub).is_dir():
            shutil.copytree(real / sub, folder / sub)
    shutil.copy(real / "model_index.json", folder / "model_index.json")
    (folder / "tokenizer").mkdir()
    train_tokenizer(folder / "tokenizer" / "spiece.model")
    return folder


@pytest.fixture(scope="module")
def real_wan(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("real") / "Wan2.1-I2V-14B-480P-Diffusers", WAN, [
        ("transformer", "diffusion_pytorch_model", 14), ("vae", "diffusion_pytorch_model", 1),
        ("text_encoder", "model", 5), ("image_encoder", "model", 1)])


@pytest.fixture(scope="module")
def real_cogvideox(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("real") / "CogVideoX-5b-I2V", COGVIDEOX, [
        ("transformer", "diffusion_pytorch_model", 3), ("vae", "diffusion_pytorch_model", 1),
        ("text_encoder", "model", 2)])


@pytest.fixture(scope="module")
def real_wan22(tmp_path_factory) -> dict[str, Path]:
    """Wan 2.2 I2V-A14B (two experts, 6 shards each) and TI2V-5B (3 shards), as published."""
    root = tmp_path_factory.mktemp("real")
    return {"a14b": write_checkpoint(root / "Wan2.2-I2V-A14B-Diffusers", WAN22, [
                ("transformer", "diffusion_pytorch_model", 6), ("transformer_2", "diffusion_pytorch_model", 6),
                ("vae", "diffusion_pytorch_model", 1), ("text_encoder", "model", 5)]),
            "ti2v": write_checkpoint(root / "Wan2.2-TI2V-5B-Diffusers", TI2V, [
                ("transformer", "diffusion_pytorch_model", 3), ("vae", "diffusion_pytorch_model", 1),
                ("text_encoder", "model", 5)])}


def test_check_accepts_the_real_wan22_layouts(real_wan22):
    a14b = {row["component"]: row for row in minialg.check(real_wan22["a14b"])}
    assert set(a14b) == {"transformer", "transformer_2", "vae", "text_encoder"}
    for expert in ("transformer", "transformer_2"):  # each the Wan 2.1 14B shape without the image branch
        assert 14.2e9 < a14b[expert]["parameters"] < 14.4e9 and a14b[expert]["files"] == 6
    ti2v = {row["component"]: row for row in minialg.check(real_wan22["ti2v"])}
    assert set(ti2v) == {"transformer", "vae", "text_encoder"} and ti2v["vae"]["class"] == "Wan22VAE"
    assert 4.9e9 < ti2v["transformer"]["parameters"] < 5.1e9
    assert 0.70e9 < ti2v["vae"]["parameters"] < 0.71e9


@pytest.mark.parametrize("expert", ["transformer", "transformer_2"])
def test_check_names_a_broken_tensor_of_either_expert(real_wan22, tmp_path, expert):
    broken = tmp_path / "broken"
    shutil.copytree(real_wan22["a14b"], broken, copy_function=os.link)  # hard links: the sparse files stay unread
    index = json.loads((broken / expert / "diffusion_pytorch_model.safetensors.index.json").read_text())
    name = "blocks.31.ffn.net.0.proj.weight"
    file = index["weight_map"][name]
    tensors = reference_tensors(expert, WAN22)
    part = {n: tensors[n] for n, f in index["weight_map"].items() if f == file and n != name}  # the tensor is gone
    write_sparse(broken / expert / file, part)
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "check", str(broken)], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"tensor '{name}' missing from {broken / expert}" in out.stderr


def test_check_accepts_the_real_layout(real_wan):
    summary = {row["component"]: row for row in minialg.check(real_wan)}
    assert summary["transformer"]["files"] == 14
    assert 16.0e9 < summary["transformer"]["parameters"] < 17.0e9  # the 14B model (16.4 B with the image branch)
    assert 5.5e9 < summary["text_encoder"]["parameters"] < 6.0e9  # UMT5-XXL encoder
    assert 0.6e9 < summary["image_encoder"]["parameters"] < 0.65e9  # ViT-H/14 tower, projection ignored
    assert 0.12e9 < summary["vae"]["parameters"] < 0.13e9


def test_check_cli_prints_a_summary(real_wan):
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "check", str(real_wan)], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "transformer" in out.stdout and "WanTransformer" in out.stdout and "ok:" in out.stdout


def test_check_names_a_mis_shaped_tensor_and_its_file(real_wan, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(real_wan, broken, copy_function=os.link)  # hard links: the sparse files stay unread
    index = json.loads((broken / "transformer/diffusion_pytorch_model.safetensors.index.json").read_text())
    file = index["weight_map"]["blocks.7.attn2.add_k_proj.weight"]
    tensors = reference_tensors("transformer")
    part = {n: tensors[n] for n, f in index["weight_map"].items() if f == file}
    part["blocks.7.attn2.add_k_proj.weight"] = ((5120, 1024), torch.bfloat16)
    write_sparse(broken / "transformer" / file, part)
    with pytest.raises(CheckpointError, match=rf"'blocks.7.attn2.add_k_proj.weight' in .*{file} has shape"):
        minialg.check(broken)
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "check", str(broken)], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "blocks.7.attn2.add_k_proj.weight" in out.stderr and file in out.stderr


def test_check_names_a_missing_tensor(real_wan, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(real_wan, broken, copy_function=os.link)  # hard links: the sparse files stay unread
    tensors = reference_tensors("image_encoder")
    del tensors["vision_model.encoder.layers.5.mlp.fc1.bias"]
    write_sparse(broken / "image_encoder" / "model.safetensors", tensors)
    with pytest.raises(CheckpointError, match="'encoder.layers.5.mlp.fc1.bias' missing from .*image_encoder"):
        minialg.check(broken)


def test_check_accepts_the_real_cogvideox_layout(real_cogvideox):
    summary = {row["component"]: row for row in minialg.check(real_cogvideox)}
    assert set(summary) == {"transformer", "vae", "text_encoder"}
    assert 5.5e9 < summary["transformer"]["parameters"] < 5.7e9  # CogVideoX-5b (with its learned positions)
    assert 4.7e9 < summary["text_encoder"]["parameters"] < 4.8e9  # T5 v1.1 XXL encoder
    assert summary["transformer"]["files"] == 3


def test_check_names_a_broken_cogvideox_tensor(real_cogvideox, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(real_cogvideox, broken, copy_function=os.link)  # hard links: the sparse files stay unread
    tensors = reference_tensors("vae", COGVIDEOX)
    name = next(n for n in tensors if n.startswith("decoder.up_blocks.1.") and n.endswith("conv_y.conv.weight"))
    tensors[name] = ((7, 16, 1, 1, 1), torch.bfloat16)
    write_sparse(broken / "vae" / "diffusion_pytorch_model.safetensors", tensors)
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "check", str(broken)], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"tensor '{name}' in" in out.stderr and "has shape [7, 16, 1, 1, 1]" in out.stderr
