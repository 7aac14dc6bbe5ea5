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


# --- the text encoder (HunyuanVideo's text_encoder_2) vs transformers' CLIPTextModel and the diffusers pipeline ---

HUNYUAN = Path(__file__).resolve().parent.parent / "minialg" / "real_configs" / "HunyuanVideo-I2V"
CLIP_PROMPTS = ["a cat", "A man with short gray hair plays a red electric guitar.", "waves " * 20]  # 3rd: truncated


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    from hunyuan_text_reference import clip_tokenizer as make

    return make(tmp_path_factory.mktemp("clip_tokenizer"))


@pytest.mark.parametrize("eos_token_id,hidden_act", [(2, "quick_gelu"), (513, "quick_gelu"), (300, "quick_gelu"),
                                                     (2, "gelu")])
def test_text_pooled_output_matches_the_pipeline(clip_tokenizer, tmp_path, eos_token_id, hidden_act):
    from hunyuan_text_reference import reference_pipeline, tiny_clip_text

    from minialg.checkpoint import load
    from minialg.models.clip import CLIPText, CLIPTextConfig

    ref = tiny_clip_text(eos_token_id, hidden_act)
    ref.save_pretrained(tmp_path)
    ours = load(CLIPText, CLIPTextConfig, tmp_path)
    pipe = reference_pipeline(text_encoder_2=ref, tokenizer_2=clip_tokenizer)
    for prompt in CLIP_PROMPTS:
        ids = clip_tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = pipe._get_clip_prompt_embeds(prompt, device="cpu")
            assert torch.equal(ref(ids).pooler_output, expected)
            got = ours(ids)
        assert got.shape == (1, 32)
        print(f"clip text eos {eos_token_id} {hidden_act} {len(prompt)} chars: rel err {rel_err(got, expected):.1e}")
        assert torch.equal(got, expected)
    assert ids[0, -1] == 513 and (ids[0, 1:-1] != 513).all()  # the long prompt was cut to 77 tokens
    # eos_token_id 2 pools at the largest id (4 here), any other at its first occurrence (2 for 300, 4 for 513)
    odd = torch.tensor([[512, 40, 300, 41, 513, 513, 7]])
    with torch.no_grad():
        assert torch.equal(ours(odd), ref(odd).pooler_output)
        assert torch.equal(ours(odd), ref(odd).last_hidden_state[:, 2 if eos_token_id == 300 else 4])


def test_text_loads_the_published_layout_and_runs_bf16(clip_tokenizer, tmp_path):
    from hunyuan_text_reference import tiny_clip_text
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextModel

    from minialg.checkpoint import load
    from minialg.models.clip import CLIPText, CLIPTextConfig

    tiny_clip_text().save_pretrained(tmp_path / "new")
    state = load_file(tmp_path / "new" / "model.safetensors")  # transformers 5: no `text_model.` prefix
    assert "embeddings.token_embedding.weight" in state
    (tmp_path / "old").mkdir()
    shutil.copy(tmp_path / "new" / "config.json", tmp_path / "old" / "config.json")
    old = {"text_model." + k: v for k, v in state.items()} | {"text_model.embeddings.position_ids": torch.arange(77)[None]}
    save_file(old, tmp_path / "old" / "model.safetensors")
    ids = clip_tokenizer(CLIP_PROMPTS[:2], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(load(CLIPText, CLIPTextConfig, tmp_path / "new")(ids),
                           load(CLIPText, CLIPTextConfig, tmp_path / "old")(ids))
        ref = CLIPTextModel.from_pretrained(tmp_path / "new", dtype=torch.bfloat16).eval()
        expected = ref(ids).pooler_output
        got = load(CLIPText, CLIPTextConfig, tmp_path / "old", dtype=torch.bfloat16)(ids)
        full = load(CLIPText, CLIPTextConfig, tmp_path / "old")(ids)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
    assert rel_err(got.float(), full) > 1e-4  # the run really was in bf16


def test_text_real_config_names_and_shapes_on_meta():
    from transformers import CLIPTextConfig as RefConfig
    from transformers import CLIPTextModel

    from minialg.models.clip import CLIPText, CLIPTextConfig

    config = json.loads((HUNYUAN / "text_encoder_2" / "config.json").read_text())
    with torch.device("meta"):
        ours = CLIPText(config_from(CLIPTextConfig, config))
        ref = CLIPTextModel(RefConfig(**config))
    assert ours.config.eos_token_id == 2 and ours.config.hidden_act == "quick_gelu"
    expected = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    for prefix in ("", "text_model."):  # transformers 5 names, the published file's (older transformers)
        assert {CLIPText.checkpoint_name(prefix + k): tuple(t.shape) for k, t in ref.state_dict().items()} == expected
    assert CLIPText.checkpoint_name("text_model.embeddings.position_ids") is None
    assert 123e6 < sum(t.numel() for t in ours.state_dict().values()) < 124e6  # CLIP ViT-L/14's text tower
    with torch.no_grad():
        assert ours(torch.zeros(1, 77, dtype=torch.long, device="meta")).shape == (1, 768)
    with pytest.raises(ValueError, match="at most 77 tokens"):
        ours(torch.zeros(1, 78, dtype=torch.long, device="meta"))
