"""LLaVA-LLaMA-3 text encoder (HunyuanVideo-I2V) vs transformers' LlavaForConditionalGeneration and diffusers'
HunyuanVideoImageToVideoPipeline._get_llama_prompt_embeds, on tiny random checkpoints saved by transformers."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hunyuan_text_reference import (IMAGE_TOKEN, PROMPTS, REAL, SPECIALS, llama_tokenizer, processor_config,
                                    reference_pipeline, tiny_llava, tiny_template)
from minialg import checkpoint
from minialg.models.clip import preprocess
from minialg.models.llava import (LlamaConfig, LlavaConfig, LlavaTextEncoder, llama_prompt_embeds,
                                  rope_inverse_frequencies, widen_image_token)

END_HEADER = SPECIALS.index("<|end_header_id|>")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tokenizer, transformers model, its save_pretrained folder, minialg's encoder loaded from it)."""
    tokenizer = llama_tokenizer()
    ref = tiny_llava(len(tokenizer))
    folder = tmp_path_factory.mktemp("llava")
    ref.save_pretrained(folder)
    ours = checkpoint.load(LlavaTextEncoder, LlavaConfig, folder)
    return tokenizer, ref, folder, ours


@pytest.fixture(scope="module")
def pixels(test_image):
    return preprocess(torch.from_numpy(test_image), processor_config(28))  # (1, 3, 28, 28)


def encode(tokenizer, template, prompt, max_sequence_length):
    """The pipeline's tokenization: the templated prompt padded / truncated to max_sequence_length + crop_start."""
    out = tokenizer(template["template"].format(prompt), max_length=max_sequence_length + template["crop_start"],
                    padding="max_length", truncation=True, return_tensors="pt")
    return out.input_ids, out.attention_mask


def test_widened_prompt_and_decoder_states_match_transformers(tiny, pixels):
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video import (
        _expand_input_ids_with_image_tokens)

    tokenizer, ref, _, ours = tiny
    template = tiny_template(tokenizer, 16)
    ids, mask = encode(tokenizer, template, PROMPTS[0], 20)
    start, end, length = template["image_emb_start"], template["image_emb_end"], template["image_emb_len"]
    expected = _expand_input_ids_with_image_tokens(ids, mask, ids.shape[1], IMAGE_TOKEN, length, start, end,
                                                   ref.config.pad_token_id)
    widened = widen_image_token(ids, ours.config, start, end, length)
    for got, key in zip(widened, ("input_ids", "attention_mask", "position_ids")):
        assert torch.equal(got, expected[key]), key
    with torch.no_grad():
        out = ref(**expected, pixel_values=pixels, output_hidden_states=True)
        features = ref.model.get_image_features(pixel_values=pixels).pooler_output[0]
        assert torch.equal(ours.image_features(pixels)[0], features)  # projected penultimate ViT states
        assert torch.equal(ours.input_embeddings(widened[0], pixels), out.hidden_states[0])  # the splice
        got = ours(*widened, pixels)
    assert len(ours.language_model.layers) == 2 and len(out.hidden_states) == 5
    assert torch.equal(got, out.hidden_states[-3])  # pipeline default: num_hidden_layers_to_skip = 2
    assert rel_err(got, out.hidden_states[-2]) > 1e-2  # the test can tell which layer is read


@pytest.mark.parametrize("prompt,max_sequence_length,interleave,headers,padded", [
    (PROMPTS[0], 24, 2, 3, True),  # short prompt (7 tokens + 5 of the template's tail), right padding
    (PROMPTS[2], 60, 4, 3, True),  # 44 + 5 tokens, token_replace interleave
    (PROMPTS[1], 58, 2, 3, False),  # 53 + 5 tokens: fills the length, no padding (transformers' is_causal path)
    (PROMPTS[1], 57, 2, 3, False),  # the reply's "\n\n" cut off: the reply starts past the end
    (PROMPTS[1], 20, 2, 2, False),  # truncated before the assistant header: diffusers' two-header fallback
    (PROMPTS[2], 60, 0, 3, True),  # interleave outside (0, 6): every image state kept
])
def test_prompt_embeds_match_the_pipeline(tiny, pixels, test_image, prompt, max_sequence_length, interleave, headers,
                                          padded):
    from PIL import Image

    tokenizer, ref, _, ours = tiny
    template = tiny_template(tokenizer, 16)
    pipe = reference_pipeline(ref, tokenizer)
    with torch.no_grad():
        expected, expected_mask = pipe._get_llama_prompt_embeds(
            Image.fromarray(test_image), prompt, template, device="cpu", max_sequence_length=max_sequence_length,
            image_embed_interleave=interleave)
    ids, mask = encode(tokenizer, template, prompt, max_sequence_length)
    assert int((ids == END_HEADER).sum()) == headers and bool(mask.all()) != padded
    got, got_mask = llama_prompt_embeds(ours, ids, mask, pixels, template, END_HEADER, interleave)
    image = 16 // interleave if 0 < interleave < 6 else 16
    assert got.shape == expected.shape == (1, image + max_sequence_length - 4, 32)
    print(f"llava prompt embeds L={max_sequence_length} k={interleave}: max abs {(got - expected).abs().max():.1e}")
    assert torch.equal(got, expected) and torch.equal(got_mask, expected_mask) and got_mask.dtype == torch.int64


def test_published_layout_loads_the_same(tiny, pixels, tmp_path):
    """The published file was written before transformers 5: `vision_tower.vision_model.*` (transformers 5 writes
    `vision_tower.*`), `language_model.model.*`, `language_model.lm_head.*`; sharded with an index."""
    tokenizer, _, folder, ours = tiny
    state = load_file(folder / "model.safetensors")
    assert any(k.startswith("vision_tower.encoder.") for k in state) and "language_model.lm_head.weight" in state
    old = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in state.items()}
    old["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    names = sorted(old)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file({k: old[k] for k in names[:40]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: old[k] for k in names[40:]}, tmp_path / "model-00002-of-00002.safetensors")
    index = {n: f"model-0000{1 + (i >= 40)}-of-00002.safetensors" for i, n in enumerate(names)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    published = checkpoint.load(LlavaTextEncoder, LlavaConfig, tmp_path)
    template = tiny_template(tokenizer, 16)
    ids, mask = encode(tokenizer, template, PROMPTS[1], 30)
    a = llama_prompt_embeds(ours, ids, mask, pixels, template, END_HEADER)
    b = llama_prompt_embeds(published, ids, mask, pixels, template, END_HEADER)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_checkpoint_name_skips_the_unread_tail():
    cfg = LlavaConfig(text_config=dict(hidden_size=32, num_hidden_layers=5, num_attention_heads=4),
                      vision_config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2))
    name = LlavaTextEncoder(cfg).checkpoint_name  # reads layers 0-2: skips 3, 4, the final norm and the lm_head
    assert name("language_model.model.layers.2.mlp.up_proj.weight") == "language_model.layers.2.mlp.up_proj.weight"
    assert name("model.language_model.layers.2.mlp.up_proj.weight") == "language_model.layers.2.mlp.up_proj.weight"
    for skipped in ("language_model.model.layers.3.mlp.up_proj.weight", "model.language_model.layers.4.mlp.up_proj.weight",
                    "language_model.model.norm.weight", "model.language_model.norm.weight",
                    "language_model.lm_head.weight", "lm_head.weight",
                    "vision_tower.vision_model.embeddings.position_ids"):
        assert name(skipped) is None, skipped
    assert name("vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight") == "vision_tower.encoder.layers.1.mlp.fc1.weight"
    assert name("model.vision_tower.pre_layrnorm.bias") == "vision_tower.pre_layrnorm.bias"
    assert name("model.multi_modal_projector.linear_2.bias") == "multi_modal_projector.linear_2.bias"
    assert name("multi_modal_projector.linear_1.weight") == "multi_modal_projector.linear_1.weight"


def test_bf16_matches_transformers_bf16(tiny, pixels, test_image):
    from PIL import Image
    from transformers import LlavaForConditionalGeneration

    tokenizer, ref32, folder, ours32 = tiny
    ref = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ours = checkpoint.load(LlavaTextEncoder, LlavaConfig, folder, dtype=torch.bfloat16)
    template = tiny_template(tokenizer, 16)
    pipe = reference_pipeline(ref, tokenizer)
    for prompt, length in ((PROMPTS[0], 24), (PROMPTS[1], 28)):
        with torch.no_grad():
            expected, expected_mask = pipe._get_llama_prompt_embeds(
                Image.fromarray(test_image), prompt, template, device="cpu", max_sequence_length=length)
        ids, mask = encode(tokenizer, template, prompt, length)
        got, got_mask = llama_prompt_embeds(ours, ids, mask, pixels, template, END_HEADER)
        assert got.dtype == expected.dtype == torch.bfloat16
        assert torch.equal(got, expected) and torch.equal(got_mask, expected_mask)
        full = llama_prompt_embeds(ours32, ids, mask, pixels, template, END_HEADER)[0]
        assert rel_err(got, full) > 1e-4  # the run really was in bf16


@pytest.mark.parametrize("rope", [None, {"rope_type": "linear", "factor": 4.0},
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_rotary_frequencies_match_transformers(rope):
    from transformers import LlamaConfig as RefConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    values = dict(hidden_size=256, num_attention_heads=2, max_position_embeddings=512, rope_theta=500000.0,
                  rope_scaling=rope)
    expected = LlamaRotaryEmbedding(RefConfig(**values)).inv_freq
    got = rope_inverse_frequencies(LlamaConfig(**values))
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    saved = RefConfig(**values).to_dict()  # transformers 5 writes rope_parameters instead
    assert "rope_parameters" in saved and torch.equal(rope_inverse_frequencies(LlamaConfig(**{
        k: v for k, v in saved.items() if k in LlamaConfig.__dataclass_fields__})), expected)


def test_mismatched_image_slots_fail_early(tiny, pixels):
    tokenizer, _, _, ours = tiny
    template = tiny_template(tokenizer, 9)  # the vision tower gives 16 features
    ids, mask = encode(tokenizer, template, PROMPTS[0], 20)
    with pytest.raises(ValueError, match="image slots"):
        llama_prompt_embeds(ours, ids, mask, pixels, template, END_HEADER)
    with pytest.raises(ValueError, match="one image per prompt"):
        llama_prompt_embeds(ours, ids.repeat(2, 1), mask.repeat(2, 1), pixels, tiny_template(tokenizer, 16), END_HEADER)
    with pytest.raises(ValueError, match="rope type"):
        LlamaConfig(rope_scaling={"type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="text_config"):
        LlavaConfig(vision_config={})


def reference_on_meta():
    from transformers import LlavaConfig as RefConfig
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        return LlavaForConditionalGeneration(RefConfig(**json.loads((REAL / "text_encoder/config.json").read_text())))


def published_name(name: str) -> str:
    """transformers 5 module name -> the name in a file written by transformers 4 (the published checkpoint)."""
    for new, old in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.vision_tower.", "vision_tower.vision_model."), ("model.multi_modal_projector.",
                                                                             "multi_modal_projector.")):
        if name.startswith(new):
            return old + name.removeprefix(new)
    raise AssertionError(name)


def test_real_config_names_and_shapes_on_meta(tmp_path):
    from test_real_layout import write_component

    ref = reference_on_meta()
    with torch.device("meta"):
        ours = checkpoint.build(LlavaTextEncoder, LlavaConfig, REAL / "text_encoder")
    cfg = ours.config
    assert (cfg.text_config.hidden_size, cfg.text_config.num_key_value_heads, cfg.text_config.head_dim) == (4096, 8, 128)
    assert cfg.num_image_features == 576 and len(ours.language_model.layers) == 30
    ref_state = ref.state_dict()
    for rename in (lambda n: n, published_name):  # transformers 5 names, then the published file's
        shapes = {ours.checkpoint_name(rename(n)): tuple(t.shape) for n, t in ref_state.items()}
        shapes.pop(None)
        assert shapes == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert len(list(ours.buffers())) == 0
    # the published layout (fp16, 4 shards) passes the header check; the unread tail is never loaded
    tensors = {published_name(n): (tuple(t.shape), torch.bfloat16) for n, t in ref_state.items()}
    write_component(tmp_path / "text_encoder", "model", tensors, 4)
    shutil.copy(REAL / "text_encoder/config.json", tmp_path / "text_encoder/config.json")
    planned = checkpoint.plan(ours, tmp_path / "text_encoder")
    assert sum(len(names) for names in planned.values()) == len(ours.state_dict())
    params = sum(t.numel() for t in ours.state_dict().values())
    assert 7.3e9 < params < 7.5e9 < sum(t.numel() for t in ref_state.values())  # 8.35 B with the tail and lm_head
    with torch.no_grad():
        ids = torch.zeros(1, 600, dtype=torch.long, device="meta")
        out = ours(ids, ids, ids, torch.empty(1, 3, 336, 336, device="meta"))
    assert out.shape == (1, 600, 4096)


def test_preprocess_matches_the_published_image_processor(test_image):
    from PIL import Image
    from transformers import CLIPImageProcessor

    config = json.loads((REAL / "image_processor/preprocessor_config.json").read_text())
    reference = CLIPImageProcessor(**{k: v for k, v in config.items() if k != "image_processor_type"})
    for image in (test_image, np.ascontiguousarray(test_image.transpose(1, 0, 2))):
        expected = reference(images=Image.fromarray(image), return_tensors="pt")["pixel_values"]
        got = preprocess(torch.from_numpy(image), config)
        assert got.shape == (1, 3, 336, 336) and torch.equal(got, expected)
