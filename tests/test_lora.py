"""LoRAs for Wan (minialg.lora), on tiny checkpoints diffusers saved, and the few-step distilled presets.

One random set of low-rank deltas is written in every format in circulation (diffusers/PEFT with and without the
`transformer.` prefix and with PEFT metadata, ComfyUI/diffusion-pipe official names, kohya/musubi with alpha),
each stored so that its effective delta is the same. The oracle is diffusers' pipeline after load_lora_weights
(+ set_adapters for the strengths, load_into_transformer_2 for Wan 2.2's second expert); where diffusers drops a
kind of tensor (.diff, .diff_m), the oracle is the same checkpoint with the delta added to its weights.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import cli
import minialg
from minialg import alg as lowpass
from minialg import fp8
from minialg.checkpoint import CheckpointError
from minialg.config import load_config
from minialg.sampling import make_solver
from conftest import save_tiny_wan
from test_single_file import folder_with, official_name, store, write_form
from wan_reference import pil

PROMPT = "a red ball bouncing on a wooden floor"
SIZE = dict(height=32, width=48, num_frames=9)
RUN = dict(num_inference_steps=3, guidance_scale=5.0, **SIZE)
TOL = 5e-4  # max abs on [0, 1]
RANK = 4


def gap_of(frames: torch.Tensor, expected) -> float:
    """Max abs difference on [0, 1], printed for the record (pytest -s)."""
    gap = float(np.abs(frames.numpy() - np.asarray(expected)).max())
    print(f"max abs gap {gap:.2e}")
    return gap


def official(module: str) -> str:
    return official_name(module + ".weight")[:-len(".weight")]


def low_rank(state: dict, seed: int, blocks_only: bool = False) -> dict:
    """{module (diffusers' name): (A (r, in), B (out, r))} for every Linear of the transformer (its 2-D weights)."""
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for name, w in sorted(state.items()):
        if w.ndim == 2 and name.endswith(".weight") and (name.startswith("blocks.") or not blocks_only):
            out, inp = w.shape
            pairs[name[:-len(".weight")]] = (torch.randn(RANK, inp, generator=g) * 0.4 / inp ** 0.5,
                                             torch.randn(out, RANK, generator=g) * 0.4 / RANK ** 0.5)
    return pairs


def write(path, pairs: dict, form: str, alpha: float | None = None) -> str:
    """The deltas as a LoRA file in `form`; with `alpha`, the up matrices are stored times rank / alpha, so the
    effective delta (alpha / rank) * B @ A stays B @ A."""
    names = {"diffusers": lambda m: f"transformer.{m}", "bare": lambda m: m,
             "comfyui": lambda m: f"diffusion_model.{official(m)}",
             "kohya": lambda m: "lora_unet_" + official(m).replace(".", "_")}[form]
    down, up = ("lora_down", "lora_up") if form == "kohya" or alpha else ("lora_A", "lora_B")
    tensors = {}
    for module, (a, b) in pairs.items():
        key = names(module)
        tensors[f"{key}.{down}.weight"] = a.contiguous()
        tensors[f"{key}.{up}.weight"] = (b * (RANK / alpha if alpha else 1)).contiguous()
        if alpha:
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path))
    return str(path)


def merged(state: dict, parts: list[tuple[dict, float]]) -> dict:
    """The transformer's weights with the deltas added, as minialg.lora computes them (float32)."""
    values = dict(state)
    for pairs, strength in parts:
        for module, (a, b) in pairs.items():
            values[module + ".weight"] = values[module + ".weight"] + strength * (b @ a)
    return values


@pytest.fixture(scope="module")
def state(tiny_wan):
    return load_file(str(tiny_wan / "transformer" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def reference(tiny_wan):
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(tiny_wan, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_video(pipe, files: list[tuple[str, float]], files_2=(), **run) -> np.ndarray:
    """diffusers' video with the LoRAs loaded (set_adapters for the strengths), then unloaded again."""
    for i, (file, _) in enumerate(files):
        pipe.load_lora_weights(file, adapter_name=f"a{i}")
    for i, (file, _) in enumerate(files_2):
        pipe.load_lora_weights(file, adapter_name=f"b{i}", load_into_transformer_2=True)
    pipe.transformer.set_adapters([f"a{i}" for i in range(len(files))], [s for _, s in files])
    if files_2:
        pipe.transformer_2.set_adapters([f"b{i}" for i in range(len(files_2))], [s for _, s in files_2])
    run = dict(RUN, **run)
    frames = pipe(image=pil(run.pop("image")), prompt=PROMPT, generator=torch.Generator("cpu").manual_seed(42),
                  output_type="np", **run).frames[0]
    pipe.unload_lora_weights()
    return frames


def ours(folder, test_image, **kwargs) -> torch.Tensor:
    load = {k: kwargs.pop(k) for k in ("loras", "loras_2", "transformer", "strict_loras") if k in kwargs}
    return minialg.load(folder, device="cpu", dtype=torch.float32, **load)(test_image, PROMPT, seed=42,
                                                                          progress=False, **dict(RUN, **kwargs))


@pytest.fixture(scope="module")
def base(tiny_wan, test_image):
    return ours(tiny_wan, test_image)


FORMS = {"diffusers": ("diffusers", None), "diffusers-unprefixed": ("bare", None), "comfyui": ("comfyui", None),
         "comfyui-alpha": ("comfyui", 2.0), "kohya-alpha": ("kohya", 2.0)}


@pytest.mark.parametrize("form", FORMS)
def test_each_format_matches_diffusers(tiny_wan, state, reference, base, test_image, tmp_path, form):
    kind, alpha = FORMS[form]
    # diffusers' converters read blocks only from musubi's files, and the alpha of block layers only
    pairs = low_rank(state, 0, blocks_only=alpha is not None)
    file = write(tmp_path / f"{form}.safetensors", pairs, kind, alpha)
    # diffusers ignores keys without its `transformer.` prefix: its oracle is the prefixed twin
    twin = write(tmp_path / "twin.safetensors", pairs, "diffusers") if kind == "bare" else file
    expected = diffusers_video(reference, [(twin, 0.7)], image=test_image)
    frames = ours(tiny_wan, test_image, loras=[(file, 0.7)])
    gap = gap_of(frames, expected)
    assert gap < TOL and (frames - base).abs().max() > 100 * gap  # the LoRA changed the video, diffusers agrees
    row = minialg.check(tiny_wan, loras=[(file, 0.7)])[0]["loras"][0]
    assert row["format"] == {"diffusers": "diffusers", "bare": "diffusers", "comfyui": "official",
                             "kohya": "kohya"}[kind]
    assert row["rank"] == str(RANK) and row["unmatched"] == [] and row["matched"] == len(pairs) * (3 if alpha else 2)


def test_peft_metadata_alpha_matches_diffusers(tiny_wan, state, reference, test_image, tmp_path):
    from diffusers import WanImageToVideoPipeline

    pairs = low_rank(state, 1)
    layers = {f"{m}.lora_A.weight": a for m, (a, _) in pairs.items()} | \
             {f"{m}.lora_B.weight": b / 3 for m, (_, b) in pairs.items()}  # lora_alpha / r = 3
    WanImageToVideoPipeline.save_lora_weights(tmp_path, transformer_lora_layers=layers,
                                              transformer_lora_adapter_metadata={
                                                  "r": RANK, "lora_alpha": 3 * RANK, "target_modules": list(pairs)})
    file = str(tmp_path / "pytorch_lora_weights.safetensors")
    expected = diffusers_video(reference, [(file, 1.0)], image=test_image)
    frames = ours(tiny_wan, test_image, loras=[file])
    assert gap_of(frames, expected) < TOL
    same = ours(tiny_wan, test_image, loras=[write(tmp_path / "plain.safetensors", pairs, "comfyui")])
    assert (frames - same).abs().max() < TOL  # the metadata's scale 3 undoes the stored B / 3


def test_two_stacked_loras_with_their_strengths(tiny_wan, state, reference, base, test_image, tmp_path):
    first = write(tmp_path / "a.safetensors", low_rank(state, 2), "comfyui")
    second = write(tmp_path / "b.safetensors", low_rank(state, 3, blocks_only=True), "kohya", alpha=1.0)
    files = [(first, 0.7), (second, 0.4)]
    expected = diffusers_video(reference, files, image=test_image)
    frames = ours(tiny_wan, test_image, loras=files)
    gap = gap_of(frames, expected)
    assert gap < TOL
    alone = ours(tiny_wan, test_image, loras=[(first, 0.7)])
    assert (frames - alone).abs().max() > 100 * gap  # the second LoRA counts


def test_bias_deltas_match_diffusers(tiny_wan, state, reference, test_image, tmp_path):
    """`.diff_b` beside a pair: diffusers' lora_B.bias, scaled by the strength like the pair."""
    pairs = low_rank(state, 4, blocks_only=True)
    file = write(tmp_path / "pairs.safetensors", pairs, "comfyui")
    tensors = load_file(file)
    g = torch.Generator().manual_seed(5)
    for module in pairs:
        tensors[f"diffusion_model.{official(module)}.diff_b"] = torch.randn(state[module + ".bias"].shape,
                                                                           generator=g) * 0.1
    save_file(tensors, file)
    expected = diffusers_video(reference, [(file, 0.6)], image=test_image)
    frames = ours(tiny_wan, test_image, loras=[(file, 0.6)])
    gap = gap_of(frames, expected)
    assert gap < TOL
    without = ours(tiny_wan, test_image, loras=[(write(tmp_path / "p.safetensors", pairs, "comfyui"), 0.6)])
    assert (frames - without).abs().max() > 100 * gap


def test_full_deltas_equal_the_weights_plus_the_delta(tiny_wan, state, base, test_image, tmp_path):
    """`.diff` (weights, conv kernels, norms), `.diff_b` (biases), `.diff_m` (modulations): diffusers drops the
    first and the last, so the oracle is the folder whose transformer holds W + strength * delta."""
    g = torch.Generator().manual_seed(6)
    targets = {"blocks.0.self_attn.q.diff": "blocks.0.attn1.to_q.weight",
               "patch_embedding.diff": "patch_embedding.weight", "blocks.1.norm3.diff": "blocks.1.norm2.weight",
               "blocks.1.ffn.2.diff_b": "blocks.1.ffn.net.2.bias", "blocks.0.diff_m": "blocks.0.scale_shift_table",
               "head.diff_m": "scale_shift_table", "time_projection.1.diff_b": "condition_embedder.time_proj.bias"}
    tensors = {f"diffusion_model.{k}": torch.randn(state[v].shape, generator=g) * 0.2 for k, v in targets.items()}
    file = str(tmp_path / "diff.safetensors")
    save_file(tensors, file)
    values = dict(state)
    for key, name in targets.items():
        values[name] = values[name] + 0.8 * tensors[f"diffusion_model.{key}"]
    expected = ours(folder_with(tmp_path, tiny_wan, values), test_image)
    frames = ours(tiny_wan, test_image, loras=[(file, 0.8)])
    assert torch.equal(frames, expected) and (frames - base).abs().max() > 1e-3
    assert minialg.check(tiny_wan, loras=[file])[0]["loras"][0]["matched"] == len(targets)


def test_keys_that_match_nothing_are_named(tiny_wan, state, tmp_path_factory, test_image):
    """A Wan 2.1 I2V LoRA on Wan 2.2 (no image cross-attention): k_img / v_img match nothing there."""
    tiny22 = save_tiny_wan(tmp_path_factory.mktemp("wan22-unmatched"), "wan22")
    tmp = tmp_path_factory.mktemp("unmatched")
    pairs = low_rank(state, 7, blocks_only=True)
    file = write(tmp / "wan21.safetensors", pairs, "comfyui")
    tensors = load_file(file) | {"diffusion_model.blocks.0.self_attn.q.lora_magnitude_vector": torch.ones(3)}
    save_file(tensors, file)
    row = minialg.check(tiny22, loras=[file])[0]["loras"][0]
    wrong = sorted(k for k in tensors if "_img" in k or "magnitude" in k)
    assert sorted(row["unmatched"]) == wrong and row["matched"] == len(tensors) - len(wrong)
    with pytest.raises(CheckpointError, match=rf"{len(wrong)} keys match nothing in transformer: diffusion_model"):
        minialg.load(tiny22, device="cpu", dtype=torch.float32, loras=[file])
    kept = write(tmp / "kept.safetensors", {m: p for m, p in pairs.items() if "add_" not in m}, "comfyui")
    with pytest.warns(UserWarning, match="match nothing in transformer"):
        frames = ours(tiny22, test_image, loras=[file], strict_loras=False)
    assert torch.equal(frames, ours(tiny22, test_image, loras=[kept]))  # the rest merged
    bad = {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(RANK, 3),
           "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(state["blocks.0.attn1.to_q.weight"]
                                                                             .shape[0], RANK)}
    save_file(bad, str(tmp / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="do not fit 'blocks.0.attn1.to_q.weight'"):
        minialg.check(tiny_wan, loras=[str(tmp / "bad.safetensors")])


def test_two_experts_each_with_its_loras(tmp_path_factory, test_image):
    from diffusers import WanImageToVideoPipeline

    tiny = save_tiny_wan(tmp_path_factory.mktemp("wan22-lora"), "wan22")
    tmp = tmp_path_factory.mktemp("wan22-files")
    high = load_file(str(tiny / "transformer" / "diffusion_pytorch_model.safetensors"))
    low = load_file(str(tiny / "transformer_2" / "diffusion_pytorch_model.safetensors"))
    files = [(write(tmp / "high.safetensors", low_rank(high, 8), "comfyui"), 0.8)]
    files_2 = [(write(tmp / "low.safetensors", low_rank(low, 9, blocks_only=True), "kohya", 2.0), 0.5)]
    pipe = WanImageToVideoPipeline.from_pretrained(tiny, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    steps = dict(num_inference_steps=4, guidance_scale_2=3.0)  # 999, 900 high; 750, 500 low (shift 3)
    expected = diffusers_video(pipe, files, files_2, image=test_image, **steps)
    frames = ours(tiny, test_image, loras=files, loras_2=files_2, **steps)
    gap = gap_of(frames, expected)
    assert gap < TOL
    for one in (dict(loras=files), dict(loras_2=files_2)):  # each expert's LoRAs count
        assert (ours(tiny, test_image, **one, **steps) - frames).abs().max() > 100 * gap


def test_ti2v(tmp_path_factory, test_image):
    from diffusers import WanImageToVideoPipeline

    tiny = save_tiny_wan(tmp_path_factory.mktemp("ti2v"), "wan22_ti2v")
    state = load_file(str(tiny / "transformer" / "diffusion_pytorch_model.safetensors"))
    file = write(tmp_path_factory.mktemp("ti2v-files") / "l.safetensors", low_rank(state, 10), "diffusers")
    pipe = WanImageToVideoPipeline.from_pretrained(tiny, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    size = dict(height=64, width=96, num_frames=9)
    expected = diffusers_video(pipe, [(file, 0.9)], image=test_image, **size)
    frames = ours(tiny, test_image, loras=[(file, 0.9)], **size)
    gap = gap_of(frames, expected)
    assert gap < TOL and (frames - ours(tiny, test_image, **size)).abs().max() > 100 * gap
    with pytest.raises(CheckpointError, match="one transformer: loras_2"):
        minialg.check(tiny, loras_2=[file])


def test_on_a_single_file_transformer(tiny_wan, state, test_image, tmp_path):
    config = json.loads((tiny_wan / "transformer" / "config.json").read_text())
    transformer = write_form(tmp_path / "comfy", state, "comfyui", config)
    file = write(tmp_path / "l.safetensors", low_rank(state, 11), "kohya", 2.0)
    frames = ours(tiny_wan, test_image, transformer=transformer, loras=[(file, 0.7)])
    assert torch.equal(frames, ours(tiny_wan, test_image, loras=[(file, 0.7)]))


def test_on_fp8_weights_merges_into_the_up_cast_weights(tiny_wan, state, test_image, tmp_path):
    config = json.loads((tiny_wan / "transformer" / "config.json").read_text())
    stored, values = store(state, "scaled_e4m3")  # values: the fp8 weights times their scales, float32
    transformer = write_form(tmp_path / "fp8", stored, "comfyui", config)
    pairs = {m: p for m, p in low_rank(state, 12).items() if ".attn1." in m}  # the FFNs stay fp8
    file = write(tmp_path / "l.safetensors", pairs, "comfyui")
    pipe = minialg.load(tiny_wan, device="cpu", dtype=torch.float32, transformer=transformer, loras=[(file, 0.7)])
    block = pipe.transformer.blocks[0]
    assert type(block.attn1.to_q) is torch.nn.Linear and block.attn1.to_q.weight.dtype == torch.float32
    assert isinstance(block.ffn.net[2], fp8.Fp8Linear) and block.ffn.net[2].weight.dtype == torch.float8_e4m3fn
    want = merged(values, [(pairs, 0.7)])
    assert torch.allclose(block.attn1.to_q.weight, want["blocks.0.attn1.to_q.weight"], rtol=0, atol=1e-6)
    frames = pipe(test_image, PROMPT, seed=42, progress=False, **RUN)
    expected = ours(folder_with(tmp_path, tiny_wan, want), test_image)
    assert (frames - expected).abs().max() < 1e-5


def test_check_and_the_flags(tiny_wan, state, tmp_path, capsys):
    file = write(tmp_path / "l.safetensors", low_rank(state, 13, blocks_only=True), "kohya", 2.0)
    assert cli.main(["check", str(tiny_wan), "--lora", f"{file}:0.5"]) == 0
    out = capsys.readouterr().out
    assert f"LoRA {file} (strength 0.5): kohya names, alpha, lora_down.weight, lora_up.weight, rank 4;" in out
    tensors = load_file(file) | {"lora_unet_blocks_0_nowhere.lora_down.weight": torch.zeros(RANK, 2)}
    save_file(tensors, file)
    assert cli.main(["check", str(tiny_wan), "--lora", file]) == 1
    assert "1 unmatched\n" in (out := capsys.readouterr().out) and "unmatched: lora_unet_blocks_0_nowhere" in out
    args = cli.top_parser().parse_args(["--config", "wan_alg", "--image_path", "i", "--prompt", "p", "--output_path",
                                        "o.mp4", "--lora", "a.safetensors:0.5", "b:c.safetensors",
                                        "--lora", "d.safetensors"])
    assert cli.loras(args, load_config("wan_lightx2v_alg")) == {
        "loras": [("a.safetensors", 0.5), ("b:c.safetensors", 1.0), ("d.safetensors", 1.0)], "loras_2": []}


def test_lcm_matches_diffusers_flow_match_lcm():
    from diffusers import FlowMatchLCMScheduler

    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 5.0, "num_train_timesteps": 1000}
    sigmas = [1.0, 0.75, 0.5, 0.25]
    ours_solver = make_solver("lcm", config, 4, generator=torch.Generator().manual_seed(0), sigmas=sigmas)
    theirs = FlowMatchLCMScheduler(shift=5.0)
    theirs.set_timesteps(sigmas=sigmas)
    assert torch.allclose(ours_solver.timesteps, theirs.timesteps) and ours_solver.timesteps[1] == 937.5
    g, x = torch.Generator().manual_seed(0), torch.randn(1, 4, 2, 3, 3)
    a = b = x
    for i, t in enumerate(theirs.timesteps):
        v = torch.sin(3 * a + i)  # any velocity
        a, b = ours_solver.step(v, i, a), theirs.step(v, t, b, generator=g).prev_sample
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
    v = torch.sin(3 * x)
    euler = make_solver("euler", config, 4, sigmas=sigmas)
    lcm = make_solver("lcm", config, 4, generator=torch.Generator().manual_seed(0), sigmas=sigmas)
    assert torch.equal(euler.timesteps, lcm.timesteps) and (euler.step(v, 0, x) - lcm.step(v, 0, x)).abs().max() > 0.1


PRESETS = {"wan_lightx2v": ("wan", "lcm"), "wan22_lightning": ("wan22", "euler")}


@pytest.mark.parametrize("preset", PRESETS)
def test_distilled_presets_run_alg_as_one_pass_on_c_lp_at_step_0(preset, tmp_path_factory, test_image):
    family, solver = PRESETS[preset]
    default, with_alg = load_config(f"{preset}_default"), load_config(f"{preset}_alg")
    generation = with_alg.generation
    assert generation["guidance_scale"] == 1.0 and generation["flow_shift"] == 5.0 and generation["solver"] == solver
    assert generation["num_inference_steps"] == 4 and generation["sigmas"] == [1.0, 0.75, 0.5, 0.25]
    assert default.generation == generation and default.loras == with_alg.loras and with_alg.loras
    assert not default.alg.enabled and with_alg.alg.enabled and (family == "wan") == (not with_alg.loras_2)
    tiny = save_tiny_wan(tmp_path_factory.mktemp(preset), family)
    state = load_file(str(tiny / "transformer" / "diffusion_pytorch_model.safetensors"))
    lora = write(tmp_path_factory.mktemp(preset + "-l") / "l.safetensors", low_rank(state, 14), "comfyui")
    pipe = minialg.load(tiny, device="cpu", dtype=torch.float32, loras=[lora], loras_2=[lora] * (family != "wan"))
    calls, denoise = [], pipe.denoise
    pipe.denoise = lambda model, x, t, conditions, texts: calls.append((model, conditions)) or \
        denoise(model, x, t, conditions, texts)
    run = dict(generation, **SIZE, seed=42, progress=False)
    frames = pipe(test_image, PROMPT, alg=with_alg.alg, **run)
    filtered = lowpass.low_pass(calls[-1][1][0], with_alg.alg, 1.0)
    assert [len(c) for _, c in calls] == [1] * 4  # one pass a step
    assert torch.equal(calls[0][1][0], filtered) and not torch.equal(filtered, calls[-1][1][0])  # step 0: c_lp
    assert all(torch.equal(c[0], calls[-1][1][0]) for _, c in calls[1:])  # steps 1-3: c
    if family == "wan22":  # 2 high-noise, 2 low-noise steps (t = 1000, 937.5 | 833.3, 625; the boundary is 900)
        assert [m is pipe.transformer for m, _ in calls] == [True, True, False, False]
    with pytest.raises(ValueError, match="sigmas must be 4 decreasing numbers in"):
        pipe(test_image, PROMPT, alg=with_alg.alg, **dict(run, sigmas=[1.0, 0.25, 0.5, 0.1]))
    calls.clear()
    plain = pipe(test_image, PROMPT, alg=default.alg, **run)
    assert all(torch.equal(c[0], calls[-1][1][0]) for _, c in calls) and (plain - frames).abs().max() > 1e-3
