"""The real LTX-Video layouts (the hub's 0.9.0 2B folder; the 0.9.5+ VAE and the 13B transformer), checked from
headers alone: names and shapes from diffusers' classes built on the meta device, written as sparse files."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minialg
import minialg.registry
from minialg.demo import train_tokenizer
from test_real_layout import write_component, write_sparse

ROOT = Path(__file__).resolve().parent.parent
LTX = ROOT / "minialg" / "real_configs" / "LTX-Video"
LATER = ROOT / "minialg" / "real_configs" / "LTX-Video-later"


def reference_tensors(component: str, config_file: Path) -> dict:
    from diffusers import AutoencoderKLLTXVideo, LTXVideoTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    config = json.loads(config_file.read_text())
    kwargs = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "model_type")}
    build = {"transformer": lambda: LTXVideoTransformer3DModel(**kwargs), "vae": lambda: AutoencoderKLLTXVideo(**kwargs),
             "text_encoder": lambda: T5EncoderModel(T5Config(**kwargs))}[component]
    with torch.device("meta"):
        model = build()
    tensors = {name: (tuple(t.shape), torch.bfloat16) for name, t in model.state_dict().items()}
    tensors.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight: saved once
    return tensors


def write_ltx(folder: Path, configs: dict, index: Path, scheduler: Path) -> Path:
    """configs: component -> (config file, shards)."""
    stems = {"text_encoder": "model"}
    for component, (config_file, shards) in configs.items():
        write_component(folder / component, stems.get(component, "diffusion_pytorch_model"),
                        reference_tensors(component, config_file), shards)
        shutil.copy(config_file, folder / component / "config.json")
    (folder / "scheduler").mkdir()
    shutil.copy(scheduler, folder / "scheduler" / "scheduler_config.json")
    shutil.copy(index, folder / "model_index.json")
    (folder / "tokenizer").mkdir()
    train_tokenizer(folder / "tokenizer" / "spiece.model")
    return folder


@pytest.fixture(scope="module")
def real_ltx(tmp_path_factory) -> Path:
    return write_ltx(tmp_path_factory.mktemp("real") / "LTX-Video", {
        "transformer": (LTX / "transformer" / "config.json", 2), "vae": (LTX / "vae" / "config.json", 1),
        "text_encoder": (LTX / "text_encoder" / "config.json", 4)},
        LTX / "model_index.json", LTX / "scheduler" / "scheduler_config.json")


@pytest.fixture(scope="module")
def real_ltx13b(tmp_path_factory) -> Path:
    """The 0.9.7 13B layout: the 13B transformer, the 0.9.5+ VAE, LTXConditionPipeline (DERIVED configs)."""
    return write_ltx(tmp_path_factory.mktemp("real") / "LTX-Video-0.9.7-dev", {
        "transformer": (LATER / "transformer_13b_0.9.7_config_DERIVED.json", 6),
        "vae": (LATER / "vae_0.9.5-0.9.8_config.json", 1), "text_encoder": (LTX / "text_encoder" / "config.json", 4)},
        LATER / "model_index_0.9.7.json", LATER / "scheduler_0.9.5+_config_DERIVED.json")


def test_check_accepts_the_real_2b_layout(real_ltx):
    summary = {row["component"]: row for row in minialg.check(real_ltx)}
    assert set(summary) == {"transformer", "vae", "text_encoder"}
    assert 1.9e9 < summary["transformer"]["parameters"] < 2.0e9  # LTX-Video 2B
    assert 4.7e9 < summary["text_encoder"]["parameters"] < 4.8e9  # T5 v1.1 XXL encoder
    assert summary["transformer"]["files"] == 2
    assert minialg.registry.default_preset(real_ltx) == "ltx_alg"


def test_check_accepts_the_real_13b_layout(real_ltx13b):
    summary = {row["component"]: row for row in minialg.check(real_ltx13b)}
    assert 13.0e9 < summary["transformer"]["parameters"] < 13.3e9
    assert minialg.registry.default_preset(real_ltx13b) == "ltx13b_alg"


@pytest.mark.parametrize("component", ["transformer", "vae"])
def test_check_names_a_broken_tensor(real_ltx, tmp_path, component):
    broken = tmp_path / "broken"
    shutil.copytree(real_ltx, broken, copy_function=os.link)  # hard links: the sparse files stay unread
    tensors = reference_tensors(component, LTX / component / "config.json")
    name = "transformer_blocks.27.attn1.to_k.weight" if component == "transformer" else \
        next(n for n in tensors if n.startswith("decoder.up_blocks.2.") and n.endswith("conv.weight"))
    tensors[name] = ((7, 3), torch.bfloat16)
    if component == "transformer":  # rewrite the shard holding it
        index = json.loads((broken / component / "diffusion_pytorch_model.safetensors.index.json").read_text())
        file = index["weight_map"][name]
        write_sparse(broken / component / file, {n: tensors[n] for n, f in index["weight_map"].items() if f == file})
    else:
        write_sparse(broken / component / "diffusion_pytorch_model.safetensors", tensors)
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "check", str(broken)], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"tensor '{name}' in" in out.stderr and "has shape [7, 3]" in out.stderr
