"""CLIP vision tower and its preprocessing vs transformers (CLIPVisionModelWithProjection, CLIPImageProcessor)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from minialg.models.clip import CLIPVision, CLIPVisionConfig, preprocess
from minialg.checkpoint import config_from

REAL = Path(__file__).resolve().parent.parent / "minialg" / "real_configs" / "Wan2.1-I2V-14B-480P-Diffusers"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def tiny_reference(hidden_act: str, patch_size: int):
    from transformers import CLIPVisionConfig as RefConfig
    from transformers import CLIPVisionModelWithProjection

    config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
                  patch_size=patch_size, projection_dim=16, hidden_act=hidden_act, layer_norm_eps=1e-5)
    torch.manual_seed(0)
    ref = CLIPVisionModelWithProjection(RefConfig(**config)).eval()
    with torch.no_grad():  # default init leaves biases and norms at 0/1: perturb everything
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    file_config = {**config, "architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
                   "torch_dtype": "float32", "projection_dim": 16}  # extra keys, as in config.json
    return ref, file_config


def load_into_ours(config: dict, state: dict) -> CLIPVision:
    ours = CLIPVision(config_from(CLIPVisionConfig, config)).eval()
    mapped = {CLIPVision.checkpoint_name(k): v for k, v in state.items()}
    ours.load_state_dict({k: v for k, v in mapped.items() if k is not None}, strict=True)
    return ours


@pytest.mark.parametrize("hidden_act,patch_size", [("gelu", 14), ("quick_gelu", 7), ("gelu", 7)])
def test_penultimate_hidden_states_match(hidden_act, patch_size):
    ref, config = tiny_reference(hidden_act, patch_size)
    state = ref.state_dict()  # "vision_model." prefix + visual_projection, as in the checkpoint file
    assert any(k.startswith("visual_projection.") for k in state) and all(
        k.startswith(("vision_model.", "visual_projection.")) for k in state)
    ours = load_into_ours(config, state)
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        out = ref(pixel_values=pixels, output_hidden_states=True)
        expected = out.hidden_states[-2]
        got = ours(pixels)
    assert len(out.hidden_states) == 4  # embeddings + 3 layers: [-2] skips the last layer
    assert got.shape == (2, 1 + (28 // patch_size) ** 2, 32)
    err = rel_err(got, expected)
    print(f"clip {hidden_act} p{patch_size}: rel err {err:.2e}")
    assert err <= 1e-5
    # the last layer's output is different: the test can tell which layer we stop at
    assert rel_err(got, out.hidden_states[-1]) > 1e-2


def test_loads_unprefixed_state_dict():
    ref, config = tiny_reference("gelu", 14)
    state = {k.removeprefix("vision_model."): v for k, v in ref.vision_model.state_dict().items()}
    state["embeddings.position_ids"] = torch.arange(5)[None]  # older files carry it
    ours = load_into_ours(config, state)
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        expected = ref(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        assert rel_err(ours(pixels), expected) <= 1e-5


def test_checkpoint_name():
    name = "encoder.layers.3.mlp.fc1.weight"
    assert CLIPVision.checkpoint_name("vision_model." + name) == name
    assert CLIPVision.checkpoint_name("pre_layrnorm.bias") == "pre_layrnorm.bias"
    assert CLIPVision.checkpoint_name("visual_projection.weight") is None
    assert CLIPVision.checkpoint_name("vision_model.embeddings.position_ids") is None


def test_real_config_keys_and_shapes_on_meta():
    from transformers import CLIPVisionConfig as RefConfig
    from transformers import CLIPVisionModelWithProjection

    config = json.loads((REAL / "image_encoder" / "config.json").read_text())
    with torch.device("meta"):
        ours = CLIPVision(config_from(CLIPVisionConfig, config))
        ref = CLIPVisionModelWithProjection(RefConfig(**config))
    assert ours.config.hidden_act == "gelu" and ours.config.num_hidden_layers == 32 and ours.config.patch_size == 14
    ref_shapes = {}
    for name, tensor in ref.state_dict().items():
        if (ours_name := CLIPVision.checkpoint_name(name)) is not None:
            ref_shapes[ours_name] = tuple(tensor.shape)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == ref_shapes
    assert len(list(ours.buffers())) == 0
    with torch.no_grad():
        assert ours(torch.empty(1, 3, 224, 224, device="meta")).shape == (1, 257, 1280)


def test_rejects_unknown_activation():
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPVision(CLIPVisionConfig(hidden_act="relu"))


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from transformers import CLIPImageProcessor

    folder = tmp_path_factory.mktemp("image_processor")
    shutil.copy(REAL / "image_processor" / "preprocessor_config.json", folder)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    return CLIPImageProcessor.from_pretrained(folder), config  # falls back to the Pillow backend without torchvision


@pytest.mark.parametrize("height,width", [(480, 832), (832, 480), (100, 150), (224, 224), (37, 300), (225, 223)])
def test_preprocess_matches_clip_image_processor(processor, height, width):
    from PIL import Image

    reference, config = processor
    rng = np.random.default_rng(height * 1000 + width)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    expected = reference(images=Image.fromarray(image), return_tensors="pt")["pixel_values"]
    got = preprocess(torch.from_numpy(image), config)
    assert got.shape == expected.shape == (1, 3, 224, 224) and got.dtype == torch.float32
    print(f"preprocess {height}x{width}: rel err {rel_err(got, expected):.2e}")
    assert torch.equal(got, expected)  # same pixels, same float32 arithmetic: bit-exact
