"""The loader: header checks that name the broken tensor and its file, sharding, dtypes, the real layout."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from minialg import checkpoint
from minialg.checkpoint import CheckpointError

REAL = Path(__file__).resolve().parent.parent / "minialg" / "real_configs"


@dataclass
class TinyConfig:
    dim: int = 4


class Tiny(torch.nn.Module):
    fp32_params = ("norm",)

    def __init__(self, config):
        super().__init__()
        self.proj = torch.nn.Linear(config.dim, 2 * config.dim)
        self.norm = torch.nn.LayerNorm(2 * config.dim)


def write_component(folder: Path, tensors: dict, dim=4, shards=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"dim": dim, "_class_name": "Tiny"}))
    if shards is None:
        save_file(tensors, str(folder / "model.safetensors"))
    else:
        weight_map = {}
        for i, names in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: tensors[n] for n in names}, str(folder / file))
            weight_map.update({n: file for n in names})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def tiny_tensors(dim=4):
    torch.manual_seed(0)
    return {"proj.weight": torch.randn(2 * dim, dim), "proj.bias": torch.randn(2 * dim),
            "norm.weight": torch.randn(2 * dim), "norm.bias": torch.randn(2 * dim)}


def test_load_streams_every_tensor_in_dtype_and_keeps_fp32_params(tmp_path):
    tensors = tiny_tensors()
    folder = write_component(tmp_path / "c", tensors)
    module = checkpoint.load(Tiny, TinyConfig, folder, "cpu", torch.bfloat16)
    assert module.proj.weight.dtype == torch.bfloat16 and module.norm.weight.dtype == torch.float32
    assert torch.equal(module.proj.weight, tensors["proj.weight"].bfloat16())
    assert torch.equal(module.norm.bias, tensors["norm.bias"])
    assert not module.training and not any(p.requires_grad for p in module.parameters())


def test_sharded_checkpoint_loads_through_its_index(tmp_path):
    tensors = tiny_tensors()
    folder = write_component(tmp_path / "c", tensors, shards=[["proj.weight", "norm.bias"], ["proj.bias", "norm.weight"]])
    module = checkpoint.load(Tiny, TinyConfig, folder)
    for name, t in tensors.items():
        assert torch.equal(module.state_dict()[name], t)


def test_missing_shard_is_named(tmp_path):
    folder = write_component(tmp_path / "c", tiny_tensors(), shards=[["proj.weight", "norm.bias"],
                                                                      ["proj.bias", "norm.weight"]])
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        checkpoint.load(Tiny, TinyConfig, folder)


@pytest.mark.parametrize("problem, message", [
    ("missing", r"tensor 'norm.bias' missing from"),
    ("unexpected", r"unexpected tensor 'extra.weight' in .*model.safetensors"),
    ("shape", r"tensor 'proj.weight' in .*model.safetensors has shape \[8, 5\], the config says \[8, 4\]"),
])
def test_broken_tensor_is_named_with_its_file(tmp_path, problem, message):
    tensors = tiny_tensors()
    if problem == "missing":
        del tensors["norm.bias"]
    elif problem == "unexpected":
        tensors["extra.weight"] = torch.zeros(1)
    else:
        tensors["proj.weight"] = torch.zeros(8, 5)
    folder = write_component(tmp_path / "c", tensors)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load(Tiny, TinyConfig, folder)


def test_truncated_and_corrupt_files_are_refused(tmp_path):
    folder = write_component(tmp_path / "c", tiny_tensors())
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.load(Tiny, TinyConfig, folder)
    file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[24:])
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        checkpoint.load(Tiny, TinyConfig, folder)
    file.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        checkpoint.load(Tiny, TinyConfig, folder)


def test_missing_folder_config_and_weights(tmp_path):
    with pytest.raises(CheckpointError, match="model folder not found"):
        checkpoint.resolve(tmp_path / "nowhere")
    folder = write_component(tmp_path / "c", tiny_tensors())
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no safetensors weights in"):
        checkpoint.load(Tiny, TinyConfig, folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing file: .*config.json"):
        checkpoint.load(Tiny, TinyConfig, folder)


def test_hub_ids_download_only_what_a_run_needs(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: calls.append((repo, kw)))
    assert checkpoint.resolve("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers") == tmp_path / "Wan2.1-I2V-14B-480P-Diffusers"
    (repo, kw), = calls
    assert repo == "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
    assert "*/*.safetensors" in kw["allow_patterns"] and not any(".bin" in p for p in kw["allow_patterns"])
