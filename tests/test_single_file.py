"""Wan transformers from single files and official folders (minialg.single_file), in every precision as stored.

The files are written here from tiny diffusers checkpoints: diffusers' tensor names are turned into the official
ones by this file's own inverse of the public mapping (diffusers' convert_wan_transformer_to_diffusers), and the
result is checked against what diffusers' from_single_file reads back. The video of a run with the file must equal,
bit for bit, the video of the diffusers folder whose transformer holds the same values (the stored tensors up-cast
to float32). The real-size layouts (ComfyUI's files, the official sharded folder) are sparse files: headers only.
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
from safetensors.torch import load_file, save_file

import minialg
from minialg import checkpoint, fp8, gpu, single_file
from minialg.checkpoint import CheckpointError
from minialg.config import load_config
from minialg.models.wan import WanTransformer, WanTransformerConfig
from conftest import save_tiny_wan
from test_real_layout import TI2V, WAN, WAN22, write_checkpoint, write_sparse

ROOT = Path(__file__).resolve().parent.parent
SIZE = dict(height=16, width=16, num_frames=5, num_inference_steps=2, seed=3, progress=False)
PROMPT = "a red ball bouncing on a wooden floor"
PREFIX = "model.diffusion_model."
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", E4M3: "F8_E4M3", E5M2: "F8_E5M2"}


def official_name(name: str) -> str:
    """diffusers' name -> the official one: the public mapping (diffusers' single_file_utils) run backwards."""
    top = [("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
           ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
           ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
           ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
           ("condition_embedder.time_proj", "time_projection.1"),
           ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
           ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
           ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
           ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"), ("proj_out", "head.head")]
    for ours, theirs in top:
        if name.startswith(ours + "."):
            return theirs + name[len(ours):]
    if name == "scale_shift_table":
        return "head.modulation"
    name = name.replace(".attn1.", ".self_attn.").replace(".attn2.", ".cross_attn.")
    name = re.sub(r"\.to_([qkv])\.", r".\1.", name).replace(".to_out.0.", ".o.")
    name = name.replace(".add_k_proj.", ".k_img.").replace(".add_v_proj.", ".v_img.")
    name = name.replace(".norm_added_k.", ".norm_k_img.").replace(".norm2.", ".norm3.")
    name = name.replace(".ffn.net.0.proj.", ".ffn.0.").replace(".ffn.net.2.", ".ffn.2.")
    return name.replace(".scale_shift_table", ".modulation")


def block_linear(name: str, shape) -> bool:
    """The tensors fp8 files keep in fp8: the Linear weights of the blocks (diffusers' names)."""
    return name.startswith("blocks.") and name.endswith(".weight") and len(shape) == 2


def store(state: dict, precision: str) -> tuple[dict, dict]:
    """(the tensors as a file in `precision` stores them, under diffusers' names; the same values in float32).
    Plain fp8: every matrix and kernel in fp8 (the embeddings' and the head's too), biases and norms in bf16.
    Scaled fp8, as ComfyUI's and Kijai's files: the block Linear weights as fp8 times a float32 scale_weight,
    the rest float32, and the `scaled_fp8` marker."""
    kind = precision.removeprefix("scaled_")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "e4m3": E4M3, "e5m2": E5M2}[kind]
    scaled = precision.startswith("scaled_")
    stored, values = {}, {}
    for name, t in state.items():
        if scaled and block_linear(name, t.shape):
            scale = t.abs().max().float() / torch.finfo(dtype).max
            stored[name] = (t / scale).to(dtype)
            stored[name[:-len("weight")] + "scale_weight"] = scale.reshape([1] if dtype == E4M3 else [])
            values[name] = stored[name].float() * scale
            continue
        if dtype.itemsize == 1:
            fp8_here = not scaled and name.endswith(".weight") and t.ndim >= 2
            stored[name] = t.to(dtype if fp8_here else torch.float32 if scaled else torch.bfloat16)
        else:
            stored[name] = t.to(dtype)
        values[name] = stored[name].float()
    if scaled:
        stored["scaled_fp8"] = torch.zeros(2 if dtype == E4M3 else 0, dtype=dtype)
    return stored, values


def official_config(config: dict) -> dict:
    return {"_class_name": "WanModel", "dim": config["num_attention_heads"] * config["attention_head_dim"],
            "ffn_dim": config["ffn_dim"], "freq_dim": config["freq_dim"], "in_dim": config["in_channels"],
            "model_type": "i2v", "num_heads": config["num_attention_heads"], "num_layers": config["num_layers"],
            "out_dim": config["out_channels"], "text_len": 512, "eps": config["eps"]}


def write_form(path: Path, stored: dict, form: str, config: dict) -> Path:
    """Write `stored` (diffusers' names) as `form`: official names, ComfyUI's (prefixed official names), diffusers'
    names in one file, or an official sharded folder (3 shards, index, official config.json)."""
    rename = {"official": official_name, "comfyui": lambda n: PREFIX + official_name(n), "diffusers": lambda n: n,
              "sharded": official_name}[form]
    tensors = {rename(n) if n != "scaled_fp8" else n: t.contiguous() for n, t in stored.items()}
    if form != "sharded":
        save_file(tensors, str(path.with_suffix(".safetensors")))
        return path.with_suffix(".safetensors")
    path.mkdir()
    names, weight_map = sorted(tensors), {}
    for i in range(3):
        file = f"diffusion_pytorch_model-{i + 1:05d}-of-00003.safetensors"
        part = names[i * len(names) // 3:(i + 1) * len(names) // 3]
        save_file({n: tensors[n] for n in part}, str(path / file))
        weight_map.update({n: file for n in part})
    (path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(official_config(config)))
    return path


def folder_with(tmp: Path, tiny: Path, values: dict, name: str = "transformer") -> Path:
    """A copy of the tiny folder (hard links) whose transformer holds `values` in float32."""
    folder = tmp / "folder"
    if not folder.exists():
        shutil.copytree(tiny, folder, copy_function=os.link)
    file = folder / name / "diffusion_pytorch_model.safetensors"
    file.unlink()
    save_file(values, str(file))
    return folder


@pytest.fixture(scope="module")
def tiny_state(tiny_wan):
    return load_file(str(tiny_wan / "transformer" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def tiny_config(tiny_wan):
    return json.loads((tiny_wan / "transformer" / "config.json").read_text())


@pytest.fixture(scope="module")
def reference_video(tiny_wan, tiny_state, test_image, tmp_path_factory):
    """The folder run on the values a precision stores, one per precision."""
    videos = {}

    def video(precision: str) -> torch.Tensor:
        if precision not in videos:
            folder = folder_with(tmp_path_factory.mktemp(precision), tiny_wan, store(tiny_state, precision)[1])
            videos[precision] = minialg.load(folder, device="cpu", dtype=torch.float32)(test_image, PROMPT, **SIZE)
        return videos[precision]
    return video


@pytest.mark.parametrize("form", ["official", "comfyui"])
def test_the_official_files_written_here_are_what_diffusers_reads(tiny_wan, tiny_state, tiny_config, tmp_path, form):
    from diffusers import WanTransformer3DModel

    file = write_form(tmp_path / form, tiny_state, form, tiny_config)
    model = WanTransformer3DModel.from_single_file(str(file), config=str(tiny_wan), subfolder="transformer",
                                                   torch_dtype=torch.float32, local_files_only=True)
    state = model.state_dict()
    assert set(state) == set(tiny_state) and all(torch.equal(state[n], tiny_state[n]) for n in state)


CASES = [("official", "fp32"), ("sharded", "fp32"), ("comfyui", "bf16"), ("diffusers", "fp16"),
         ("official", "e4m3"), ("comfyui", "scaled_e4m3"), ("sharded", "scaled_e5m2")]


@pytest.mark.parametrize("form, precision", CASES, ids=[f"{f}-{p}" for f, p in CASES])
def test_video_equals_the_folder_run_on_the_stored_values(tiny_wan, tiny_state, tiny_config, test_image,
                                                           reference_video, tmp_path, form, precision):
    stored, _ = store(tiny_state, precision)
    file = write_form(tmp_path / "wan", stored, form, tiny_config)
    pipe = minialg.load(tiny_wan, device="cpu", dtype=torch.float32, transformer=file)
    frames = pipe(test_image, PROMPT, **SIZE)
    assert torch.equal(frames, reference_video(precision)) and frames.std() > 0.01
    linear, norm = pipe.transformer.blocks[1].attn2.add_k_proj, pipe.transformer.blocks[1].norm2
    fp8_dtype = {"e4m3": E4M3, "e5m2": E5M2}.get(precision.removeprefix("scaled_"))
    assert linear.weight.dtype == (fp8_dtype or torch.float32)  # fp8 in memory; the rest in the compute dtype
    outside = pipe.transformer.proj_out.weight, pipe.transformer.patch_embedding.weight  # fp8 in the plain fp8 file
    assert linear.bias.dtype == norm.weight.dtype == outside[0].dtype == outside[1].dtype == torch.float32
    if fp8_dtype is not None:  # the fp8 values are not the original ones: the comparison above has teeth
        assert (reference_video(precision) - reference_video("fp32")).abs().max() > 1e-3
        assert isinstance(linear, fp8.Fp8Linear) and (linear.scale_weight is not None) == ("scaled" in precision)


def test_two_expert_files(tmp_path_factory, test_image):
    tiny = save_tiny_wan(tmp_path_factory.mktemp("tiny-wan22"), "wan22")
    config = json.loads((tiny / "transformer" / "config.json").read_text())
    files = {}
    for expert in ("transformer", "transformer_2"):
        state = load_file(str(tiny / expert / "diffusion_pytorch_model.safetensors"))
        files[expert] = write_form(tmp_path_factory.mktemp(expert) / expert, state, "comfyui", config)
    expected = minialg.load(tiny, device="cpu", dtype=torch.float32)(test_image, PROMPT, **SIZE)
    pipe = minialg.load(tiny, device="cpu", dtype=torch.float32, **files)
    assert torch.equal(pipe(test_image, PROMPT, **SIZE), expected)
    q, q_2 = pipe.transformer.blocks[0].attn1.to_q.weight, pipe.transformer_2.blocks[0].attn1.to_q.weight
    assert not torch.equal(q, q_2)  # two different experts, so the video above tells them apart


def transformer_from(file: Path, folder: Path) -> WanTransformer:
    source = single_file.weights(file, folder / "transformer" / "config.json")
    return checkpoint.load(WanTransformer, WanTransformerConfig, source, "cpu", torch.float32)


def inputs(config: dict):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, config["in_channels"], 2, 4, 4, generator=g)
    return x, torch.tensor([900.0, 300.0]), torch.randn(2, 5, config["text_dim"], generator=g), \
        torch.randn(1, 3, config["image_dim"], generator=g)


def test_fp8_blocks_stream_and_compile(tiny_wan, tiny_state, tiny_config, tmp_path):
    file = write_form(tmp_path / "wan", store(tiny_state, "scaled_e4m3")[0], "comfyui", tiny_config)
    model, args = transformer_from(file, tiny_wan), inputs(tiny_config)
    with torch.no_grad():
        expected = model(*args)
        streamer = gpu.stream_blocks(model, "cpu")  # packs each block's fp8 and float32 tensors, copies per call
        assert {flat.dtype for flat, _ in streamer.host[0]} == {E4M3, torch.float32}
        assert torch.equal(model(*args), expected)
        streamer.remove()
        block = model.blocks[0]
        eager = block(model.patch_embedding(args[0]).flatten(2).transpose(1, 2), *block_args(model, args))
        compiled = torch.compile(block.forward, backend="aot_eager", fullgraph=True, dynamic=False)
        out = compiled(model.patch_embedding(args[0]).flatten(2).transpose(1, 2), *block_args(model, args))
    assert torch.equal(out[0], eager[0])


def block_args(model: WanTransformer, args) -> tuple:
    """A block's inputs after the embedders, for one call of one block."""
    from minialg.models.wan import rope_cos_sin

    x, t, text, image = args
    _, modulation = model.condition_embedder(t, text.dtype)
    cos, sin = rope_cos_sin(model.config.attention_head_dim, 2, 2, 2, x.device)
    text, image = model.condition_embedder.embed_context(text, image)
    return modulation, cos, sin, (0, 1), None, text, image


def fp8_linear(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> fp8.Fp8Linear:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0]).to(dtype)
    linear.__class__ = fp8.Fp8Linear
    linear.weight, linear.scale_weight = torch.nn.Parameter(weight, False), torch.nn.Parameter(scale, False)
    return linear


def test_fp8_linear_up_casts_to_the_input_dtype():
    weight, scale = torch.randn(32, 64).to(E4M3), torch.tensor([0.37])
    linear, x = fp8_linear(weight, scale, torch.bfloat16), torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(linear(x), torch.nn.functional.linear(x, (weight.float() * scale).bfloat16(), linear.bias))
        assert linear.weight.dtype == E4M3
        linear, x = fp8_linear(weight, scale, torch.float32), x.float()
        compiled = torch.compile(linear, fullgraph=True, dynamic=False)  # inductor: the cast fused into the read
        assert torch.allclose(compiled(x), linear(x), rtol=1e-6, atol=1e-6)


def test_a_transform_sees_every_tensor_once(tiny_wan, tiny_state, tiny_config, tmp_path):
    """The per-tensor hook (where a LoRA merge goes): every tensor once, as stored, before the dtype rule."""
    file = write_form(tmp_path / "wan", store(tiny_state, "scaled_e5m2")[0], "official", tiny_config)
    seen = []

    def transform(name, tensor):
        seen.append((name, tensor.dtype))
        return tensor * 2 if name == "blocks.0.attn1.to_q.bias" else tensor

    source = single_file.weights(file, tiny_wan / "transformer" / "config.json")
    model = checkpoint.load(WanTransformer, WanTransformerConfig, source, "cpu", torch.float32, transform=transform)
    names = [name for name, _ in seen]
    assert sorted(names) == sorted(model.state_dict()) and len(names) == len(set(names))
    assert dict(seen)["blocks.0.attn1.to_q.weight"] == E5M2
    assert torch.equal(model.blocks[0].attn1.to_q.bias, 2 * tiny_state["blocks.0.attn1.to_q.bias"])


def test_check_says_what_the_file_is(tiny_wan, tiny_state, tiny_config, tmp_path):
    folder = write_form(tmp_path / "wan", store(tiny_state, "scaled_e4m3")[0], "sharded", tiny_config)
    row = minialg.check(tiny_wan, transformer=folder)[0]
    assert row["component"] == "transformer" and row["files"] == 3 and row["format"] == "official"
    assert row["precision"].startswith("F32 ") and "F8_E4M3" in row["precision"]
    assert row["precision"].endswith("; scaled fp8")
    assert row["model"].startswith("a Wan transformer (width 24, 36 input channels, 2 blocks")
    assert row["bytes"] == sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def test_a_file_that_is_no_wan_transformer_gets_one_line(tiny_wan, tmp_path):
    vae = tiny_wan / "vae" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(CheckpointError, match=r"not a Wan transformer \(no patch_embedding.weight / "
                                              r"blocks.0.self_attn.q.weight\); found keys like decoder\."):
        minialg.check(tiny_wan, transformer=vae)
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "check", str(tiny_wan), "--transformer", str(vae)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 1 and "Traceback" not in out.stderr and "not a Wan transformer" in out.stderr
    with pytest.raises(CheckpointError, match="has one transformer: transformer_2 is for two-expert"):
        minialg.check(tiny_wan, transformer_2=vae)
    (tmp_path / "model.ckpt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="minialg reads .safetensors files"):
        minialg.check(tiny_wan, transformer=tmp_path / "model.ckpt")


def test_a_scaled_file_without_a_scale_is_refused(tiny_wan, tiny_state, tiny_config, tmp_path):
    stored = store(tiny_state, "scaled_e4m3")[0]
    del stored["blocks.1.ffn.net.2.scale_weight"]
    file = write_form(tmp_path / "wan", stored, "official", tiny_config)
    with pytest.raises(CheckpointError, match="fp8 tensor 'blocks.1.ffn.2.weight' has no scale_weight"):
        minialg.check(tiny_wan, transformer=file)


def test_the_flags_reach_load(monkeypatch, tmp_path):
    import cli

    seen = {}
    monkeypatch.setattr(minialg, "load", lambda folder, **kw: seen.update(kw))
    for argv in (["--config", "wan_alg", "--image_path", "i", "--prompt", "p", "--output_path", "o.mp4"],
                 ["compare", "--config", "wan_alg", "--image_path", "i", "--prompt", "p", "--output_dir", "d"],
                 ["batch", "m.jsonl", "--output_dir", "d"]):
        parser = cli.top_parser() if argv[0].startswith("--") else cli.subcommand_parser(argv[0])
        args = parser.parse_args((argv if argv[0].startswith("--") else argv[1:]) +
                                 ["--transformer", "high.safetensors", "--transformer_2", "low.safetensors"])
        cli.load_pipeline(args, tmp_path, load_config("wan_alg"))
        assert seen["transformer"] == "high.safetensors" and seen["transformer_2"] == "low.safetensors"


# ---- the real sizes, as sparse files: headers only ----

def real_tensors(real: Path, form: str, precision: str) -> dict:
    """The published transformer's names (official, prefixed or not) and shapes, from diffusers' class on meta."""
    from diffusers import WanTransformer3DModel

    config = json.loads((real / "transformer" / "config.json").read_text())
    with torch.device("meta"):
        model = WanTransformer3DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    prefix = PREFIX if form == "comfyui" else ""
    tensors = {}
    for name, t in model.state_dict().items():
        if precision == "scaled_e4m3" and block_linear(name, t.shape):
            tensors[prefix + official_name(name)] = (tuple(t.shape), "F8_E4M3")
            tensors[prefix + official_name(name)[:-len("weight")] + "scale_weight"] = ((1,), "F32")
        else:
            tensors[prefix + official_name(name)] = (tuple(t.shape), "F32" if precision == "scaled_e4m3" else "BF16")
    if precision == "scaled_e4m3":
        tensors[prefix + "scaled_fp8"] = ((2,), "F8_E4M3")
    return tensors


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict[str, Path]:
    """Model folders without transformer weights (VAE, text and image encoders as published), and the transformer
    files: ComfyUI's Wan 2.1 I2V 14B in scaled fp8 and in bf16, the official sharded folder, Wan 2.2 files."""
    root = tmp_path_factory.mktemp("real-single")
    paths = {"wan": write_checkpoint(root / "wan", WAN, [("vae", "diffusion_pytorch_model", 1),
                                                         ("text_encoder", "model", 5), ("image_encoder", "model", 1)]),
             "a14b": write_checkpoint(root / "a14b", WAN22, [("vae", "diffusion_pytorch_model", 1),
                                                            ("text_encoder", "model", 5)]),
             "ti2v": write_checkpoint(root / "ti2v", TI2V, [("vae", "diffusion_pytorch_model", 1),
                                                           ("text_encoder", "model", 5)])}
    for name, real_folder, form, precision in [("fp8", WAN, "comfyui", "scaled_e4m3"), ("bf16", WAN, "comfyui", "bf16"),
                                               ("high", WAN22, "official", "bf16"), ("5b", TI2V, "official", "bf16")]:
        paths[name] = root / f"{name}.safetensors"
        write_sparse(paths[name], real_tensors(real_folder, form, precision))
    official = paths["official"] = root / "Wan2.1-I2V-14B-480P"
    official.mkdir()
    tensors = real_tensors(WAN, "official", "bf16")
    names, weight_map = list(tensors), {}
    for i in range(7):
        file = f"diffusion_pytorch_model-{i + 1:05d}-of-00007.safetensors"
        write_sparse(official / file, {n: tensors[n] for n in names[i * len(names) // 7:(i + 1) * len(names) // 7]})
        weight_map.update({n: file for n in names[i * len(names) // 7:(i + 1) * len(names) // 7]})
    (official / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = json.loads((WAN / "transformer" / "config.json").read_text())
    (official / "config.json").write_text(json.dumps(official_config(config)))
    return paths


def test_the_real_wan21_files_are_recognised(real):
    rows = {name: minialg.check(real["wan"], transformer=real[name])[0] for name in ("fp8", "bf16", "official")}
    for name, row in rows.items():
        assert row["model"] == "Wan 2.1 I2V 14B (480P or 720P)" and 16.0e9 < row["parameters"] < 17.0e9
        assert row["config"].endswith("Wan2.1-I2V-14B-480P-Diffusers/transformer/config.json")  # none in the folder
    n, params = rows["bf16"]["tensors"], rows["bf16"]["parameters"]
    assert rows["bf16"]["format"] == "comfyui" and rows["bf16"]["precision"] == f"BF16 {n} tensors {2 * params / 1e9:.2f} GB"
    in_fp8 = 40 * (10 * 5120 ** 2 + 2 * 5120 * 13824)  # 40 blocks: 10 attention projections and the MLP's two
    assert rows["fp8"]["precision"] == (f"F8_E4M3 480 tensors {in_fp8 / 1e9:.2f} GB, "  # the rest and 480 scales
                                        f"F32 {n} tensors {4 * (params - in_fp8 + 480) / 1e9:.2f} GB; scaled fp8")
    assert rows["fp8"]["bytes"] < 0.55 * rows["bf16"]["bytes"]  # one byte per block weight
    assert rows["official"]["format"] == "official" and rows["official"]["files"] == 7
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "check", str(real["wan"]), "--transformer",
                          str(real["fp8"])], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert f"{real['fp8']}: Wan 2.1 I2V 14B (480P or 720P)\n" in out.stdout
    assert "comfyui layout (official names, one file, 17.14 GB): F8_E4M3 480" in out.stdout and "; scaled fp8\n" in out.stdout


def test_the_real_wan22_files_are_recognised(real):
    rows = {row["component"]: row for row in minialg.check(real["a14b"], transformer=real["high"],
                                                            transformer_2=real["high"])}
    for expert in ("transformer", "transformer_2"):
        assert rows[expert]["model"] == "Wan 2.2 I2V-A14B expert (high or low noise)"
        assert rows[expert]["format"] == "official" and 14.2e9 < rows[expert]["parameters"] < 14.4e9
    ti2v = minialg.check(real["ti2v"], transformer=real["5b"])[0]
    assert ti2v["model"] == "Wan 2.2 TI2V-5B" and 4.9e9 < ti2v["parameters"] < 5.1e9


def test_a_file_of_another_model_than_the_folder_is_refused(real, tmp_path):
    folder = tmp_path / "wan"
    shutil.copytree(real["wan"], folder, copy_function=os.link)
    (folder / "transformer").mkdir()
    shutil.copy(WAN / "transformer" / "config.json", folder / "transformer")
    assert minialg.check(folder, transformer=real["fp8"])[0]["config"] == str(folder / "transformer" / "config.json")
    with pytest.raises(CheckpointError, match=r"high.safetensors: a Wan transformer with width 5120, 36 input "
                                              r"channels, 40 blocks, no image branch, but .*wan/transformer/config.json"
                                              r" describes one with width 5120, 36 input channels, 40 blocks, an "):
        minialg.check(folder, transformer=real["high"])


@pytest.mark.parametrize("problem", ["missing", "shape"])
def test_check_names_a_broken_tensor(real, tmp_path, problem):
    tensors = real_tensors(WAN, "comfyui", "scaled_e4m3")
    name = PREFIX + "blocks.31.cross_attn.k_img.weight"
    if problem == "missing":  # the weight and its scale
        del tensors[name], tensors[name[:-len("weight")] + "scale_weight"]
        message = f"tensor '{name}' missing from {tmp_path / 'broken.safetensors'}"
    else:
        tensors[name] = ((5120, 1024), "F8_E4M3")
        message = f"tensor '{name}' in {tmp_path / 'broken.safetensors'} has shape [5120, 1024]"
    write_sparse(tmp_path / "broken.safetensors", tensors)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        minialg.check(real["wan"], transformer=tmp_path / "broken.safetensors")


def test_check_names_a_tensor_missing_from_an_official_shard(real, tmp_path):
    broken = tmp_path / "Wan2.1-I2V-14B-480P"
    shutil.copytree(real["official"], broken, copy_function=os.link)  # hard links: the sparse files stay unread
    index = json.loads((broken / "diffusion_pytorch_model.safetensors.index.json").read_text())
    name, tensors = "blocks.7.norm3.weight", real_tensors(WAN, "official", "bf16")
    part = {n: tensors[n] for n, f in index["weight_map"].items() if f == index["weight_map"][name] and n != name}
    (broken / index["weight_map"][name]).unlink()
    write_sparse(broken / index["weight_map"][name], part)
    with pytest.raises(CheckpointError, match=re.escape(f"tensor '{name}' missing from {broken}")):
        minialg.check(real["wan"], transformer=broken)
