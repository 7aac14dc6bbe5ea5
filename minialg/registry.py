"""The family registry: which family runs a checkpoint folder, and the two entry points built on it.

    minialg.load(folder) ─> pipeline_class(folder) ─> a family (minialg/families/) ─> its modules, loaded
    minialg.check(folder) ─> the same family's components, validated from configs and headers

A new family plugs in here and nowhere else outside its own files: write minialg/families/NAME.py (a subclass of
minialg.pipeline.Pipeline naming, in `references`, the diffusers pipeline classes its model_index.json may say)
and its model files, then add the class to FAMILIES below. The loop (minialg/pipeline.py) knows no family.
"""

from importlib import import_module
from pathlib import Path

import torch

from . import checkpoint, component_files, gpu, lora, parallel
from .pipeline import Pipeline

FAMILIES = (  # module, class: imported when a folder is first matched (each pulls in its model files)
    ("minialg.families.wan", "Wan"),
    ("minialg.families.cogvideox", "CogVideoX"),
    ("minialg.families.hunyuan", "HunyuanVideo"),
    ("minialg.families.ltx", "LTXVideo"),
)


def families() -> list[type[Pipeline]]:
    return [getattr(import_module(module), name) for module, name in FAMILIES]


def pipeline_class(folder: Path) -> type[Pipeline]:
    """The family that runs the folder, from its model_index.json `_class_name` (and the family's own checks)."""
    index = checkpoint.read_json(folder / "model_index.json")
    name = index.get("_class_name")
    for cls in families():
        if name in cls.references:
            cls.check_index(folder, index)
            return cls
    known = ", ".join(n for cls in families() for n in cls.references)
    raise checkpoint.CheckpointError(f"{folder}: unsupported pipeline '{name}' in model_index.json "
                                     f"(minialg knows {known})")


def default_preset(folder: Path) -> str:
    """The name of the ALG preset (minialg/configs) made for the folder's model: the family's, per variant."""
    return pipeline_class(folder).preset_of(folder)


def components(folder: Path, **files) -> dict[str, tuple]:
    """Each component's (module class, config class, weights): its sub-folder, or, for a component given as a
    file (or folder) of its own in `files` (component -> path), what the family reads there (Pipeline.weights_from)."""
    cls = pipeline_class(folder)
    parts = {sub: (model_cls, config_cls, folder / sub) for sub, (model_cls, config_cls) in
             cls.components_of(folder).items()}
    for sub, path in files.items():
        if path is not None and sub not in parts:
            raise checkpoint.CheckpointError(f"{folder} has one transformer: {sub} is for two-expert checkpoints "
                                             "(Wan 2.2 I2V-A14B)" if sub == "transformer_2" else
                                             f"{folder} has no {sub} (this model runs without one)")
        if path is not None:
            parts[sub] = parts[sub][:2] + (cls.weights_from(folder, sub, path),)
    return parts


def lora_lists(folder: Path, parts: dict, loras, loras_2) -> dict[str, list[tuple[str, float]]]:
    """Each transformer's LoRAs [(file, strength)]: `loras` for transformer, `loras_2` for transformer_2."""
    lists = {"transformer": lora.entries(loras), "transformer_2": lora.entries(loras_2)}
    for sub, given in lists.items():
        if given and not pipeline_class(folder).takes_loras:
            raise checkpoint.CheckpointError(f"{folder}: minialg merges LoRAs into Wan transformers only")
        if given and sub not in parts:
            raise checkpoint.CheckpointError(f"{folder} has one transformer: loras_2 is for two-expert checkpoints "
                                             "(Wan 2.2 I2V-A14B)")
    return lists


def folder_of(model, files: dict) -> Path:
    """The checkpoint folder: `model` as checkpoint.resolve finds it; but a hub id not downloaded whose configs
    minialg ships (minialg/real_configs), with every weight from a file, runs from those configs: no download."""
    configs = component_files.published(model)
    if configs is not None and all(files.get(sub) for sub in pipeline_class(configs).components_of(configs)):
        return configs
    return checkpoint.resolve(model)


def check(model, transformer=None, transformer_2=None, vae=None, text_encoder=None, image_encoder=None,
          loras=None, loras_2=None) -> list[dict]:
    """Validate a checkpoint from its configs and safetensors headers alone; one summary dict per component.
    `transformer`, `transformer_2`, `vae`, `text_encoder`, `image_encoder`: a component's weights from a file of its
    own (as in load); their rows also say what the file is (format, names, model, precision, bytes, config).
    `loras`, `loras_2` (as in load): the transformer's rows list each LoRA (minialg.lora: format, keys, rank,
    matched and unmatched keys)."""
    files = dict(transformer=transformer, transformer_2=transformer_2, vae=vae, text_encoder=text_encoder,
                 image_encoder=image_encoder)
    folder = folder_of(model, files)
    cls = pipeline_class(folder)
    parts = components(folder, **files)  # first: a text encoder file may bring the tokenizer (Wan.weights_from)
    for file in cls.files_of(folder):
        if not (folder / file).is_file():
            raise checkpoint.CheckpointError(f"missing file: {folder / file}")
    summary = []
    lists = lora_lists(folder, parts, loras, loras_2)
    for sub, (model_cls, config_cls, source) in parts.items():
        module = checkpoint.build(model_cls, config_cls, source)
        files = checkpoint.plan(module, source)
        params = sum(t.numel() for t in module.state_dict().values())
        about = source.about if isinstance(source, checkpoint.Weights) else {}
        summary.append({"component": sub, "class": model_cls.__name__, "files": len(files),
                        "tensors": sum(len(names) for names in files.values()), "parameters": params, **about})
        if lists.get(sub):
            shapes = {name: tuple(t.shape) for name, t in module.state_dict().items()}
            summary[-1]["loras"] = [lora.LoRA.read(f, s, shapes).summary() for f, s in lists[sub]]
    return summary


def load(model, device="cuda", dtype=torch.bfloat16, *, transformer=None, transformer_2=None, vae=None,
         text_encoder=None, image_encoder=None, loras=None, loras_2=None, strict_loras: bool = True,
         offload_encoders: bool | None = None, compile: bool = False,
         stream_blocks: bool = False, cache_cross_attention: bool = True, sequence_parallel: int = 1,
         data_parallel: bool = False) -> Pipeline:
    """Load a checkpoint folder (diffusers' layout) or hub repo id into a ready-to-call pipeline.

    The denoiser runs in `dtype`; the other components as the authors run them (Pipeline.dtype_of): Wan's VAE and
    CLIP in float32, HunyuanVideo's VAE and text encoders in float16 beside a bfloat16 denoiser, the rest in
    `dtype`. With `offload_encoders`, the text and image encoders live on the CPU and visit `device` only to
    encode; None lets the family choose (Pipeline.offload_by_default: on for HunyuanVideo on small CUDA cards).
    `transformer`, `transformer_2` (Wan): the transformer's weights from a file or folder of their own instead
    of the folder's (minialg.single_file: official, ComfyUI or diffusers names; fp32, bf16, fp16, fp8, scaled
    fp8 as stored); `vae`, `text_encoder`, `image_encoder` (Wan) the same for those (minialg.component_files:
    official .pth, ComfyUI or diffusers/transformers names); `model` gives the rest. fp8 weights stay fp8 in
    memory (minialg.fp8). With every weight from a file, `model` may be a hub id whose configs minialg ships:
    nothing is downloaded but the UMT5 tokenizer, where the text encoder file does not carry it (folder_of).
    `loras`, `loras_2` (Wan): LoRAs merged into transformer and transformer_2 (Wan 2.2 A14B's low-noise expert) as
    they load, each a file (a hub file as `org/repo/file.safetensors`) or a (file, strength) pair, in the order
    given (minialg.lora: the formats, how each is scaled; merged fp8 layers load in `dtype`). A LoRA with keys
    that match nothing is refused, unless `strict_loras` is False: then a warning names them.
    `compile` compiles each transformer block (regional torch.compile); `stream_blocks` keeps the transformer's
    blocks in CPU memory and streams them to `device` one at a time (minialg.gpu), for small GPUs. Where a
    checkpoint has two denoisers (Wan 2.2 A14B), the one not in use waits in CPU memory.
    `cache_cross_attention` keeps what does not change between the steps of a run on the device (Wan: every
    block's cross-attention keys and values, 2 x (text + image tokens) x width per block and text: about 1 GB for
    Wan 14B in bf16 with CFG; rotary tables; CogVideoX: the projected text) instead of recomputing it every step;
    the video is the same either way.

    Under torchrun the pipeline joins the process group and shares each call's work among the ranks
    (minialg.parallel): the video tokens over `sequence_parallel` ranks, a step's guidance passes over the
    groups of them; every rank returns the same frames. With `data_parallel` the groups make separate videos.
    """
    device = gpu.check_device(device)  # fail in one line when the device is not usable here
    if not isinstance(cache_cross_attention, bool):
        raise ValueError(f"cache_cross_attention must be True or False, got {cache_cross_attention!r}")
    layout, device = parallel.setup(device, sequence_parallel, data_parallel)  # device: this rank's own
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype or its name, got {dtype!r}")
    device = torch.device(device)
    files = dict(transformer=transformer, transformer_2=transformer_2, vae=vae, text_encoder=text_encoder,
                 image_encoder=image_encoder)
    folder = folder_of(model, files)
    summary = check(folder, **files, loras=loras, loras_2=loras_2)  # names and shapes, before any data
    lora.refuse_unmatched(summary, strict_loras)
    cls = pipeline_class(folder)
    if offload_encoders is None:
        offload_encoders = cls.offload_by_default(device)
    parts = components(folder, **files)
    if layout.sequence > 1 and not cls.sequence_parallel:
        raise ValueError(f"sequence parallelism is not implemented for {cls.__name__}: use --sequence_parallel 1 "
                         "(the guidance passes are still shared out over the ranks)")
    lists = lora_lists(folder, parts, loras, loras_2)
    parallel.check_heads(layout, {sub: checkpoint.weights_in(source).config["num_attention_heads"]
                                  for sub, (_, _, source) in parts.items() if sub.startswith("transformer")})
    encoder_device = torch.device("cpu") if offload_encoders else device
    modules = {}
    for sub, (model_cls, config_cls, source) in parts.items():
        where = encoder_device if sub.startswith(("text_encoder", "image_encoder")) else device
        if sub.startswith("transformer") and (stream_blocks or sub != "transformer"):
            where = torch.device("cpu")  # streamed blocks start there; a second expert waits there
        if lists.get(sub):
            modules[sub] = lora.load(model_cls, config_cls, source, where, cls.dtype_of(sub, dtype), lists[sub])
        else:
            modules[sub] = checkpoint.load(model_cls, config_cls, source, where, cls.dtype_of(sub, dtype))
    for sub in [s for s in modules if s.startswith("transformer")]:
        if stream_blocks:
            gpu.stream_blocks(modules[sub], device)
        if compile:
            gpu.compile_blocks(modules[sub])
    pipe = cls(folder, modules, device, encoder_device, dtype, streamed=stream_blocks)
    pipe.cache_steps = cache_cross_attention
    return parallel.apply(pipe, layout)


