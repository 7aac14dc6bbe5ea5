"""Run configs in the authors' YAML format -> a validated RunConfig.

    model:      {path, dtype, flow_shift, flow_reverse, lora, lora_2}
    generation: keyword arguments of the pipeline call (height, width, num_frames, guidance_scale, ...)
    alg:        the ALG settings (minialg.alg.ALGConfig)
    video:      {fps, resolution}

The HunyuanVideo-I2V configs keep two settings where the authors' run.py reads them: `model.flow_shift` (a
generation flow_shift) and `video.resolution` ("360p", "540p", "720p": the size is the resolution's bucket closest
to the image's aspect ratio, `bucket_size`); `model.flow_reverse` must be false (no reversed schedule).
`model.lora` and `model.lora_2` name LoRAs (minialg.lora) for the transformer and, on Wan 2.2 A14B, the low-noise
expert: one entry or a list of them, each a file (a hub file as `org/repo/file.safetensors`), `FILE:STRENGTH`, or a
mapping {path, strength}; the strength defaults to 1.
Presets ship inside the package (minialg/configs/NAME.yaml) and can be named instead of a path.
"""

import difflib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .alg import ALGConfig

PRESETS = Path(__file__).parent / "configs"
DTYPES = ("float32", "bfloat16", "float16")
# generation key -> accepted Python types (None is accepted everywhere: it means "the model's default")
GENERATION = {"height": int, "width": int, "num_frames": int, "num_inference_steps": int,
              "guidance_scale": (int, float), "guidance_scale_2": (int, float), "negative_prompt": str, "max_sequence_length": int,
              "use_dynamic_cfg": bool, "flow_shift": (int, float), "solver": str, "seed": int,
              "true_cfg_scale": (int, float), "i2v_stable": bool,
              # LTX-Video (diffusers' names)
              "frame_rate": (int, float), "guidance_rescale": (int, float), "decode_timestep": (int, float),
              "decode_noise_scale": (int, float), "image_cond_noise_scale": (int, float), "timesteps": list,
              "upsampler": str, "downscale_factor": (int, float), "adain_factor": (int, float),
              "tone_map_compression_ratio": (int, float), "refine_steps": int, "refine_strength": (int, float),
              "refine_timesteps": list,
              "sigmas": list}  # sigmas: Wan's given noise levels (step-distilled LoRAs)
SECTIONS = {"model": ("path", "dtype", "flow_shift", "flow_reverse", "lora", "lora_2"),
            "generation": tuple(GENERATION), "alg": None, "video": ("fps", "resolution")}
RESOLUTIONS = {"360p": 480, "540p": 720, "720p": 960}  # HunyuanVideo's buckets: the side of the square one


@dataclass
class RunConfig:
    model: str = ""
    dtype: str = "bfloat16"
    generation: dict = field(default_factory=dict)
    alg: ALGConfig = field(default_factory=ALGConfig)
    fps: float = 16
    resolution: str | None = None  # a key of RESOLUTIONS: the size comes from the image (bucket_size)
    loras: list = field(default_factory=list)  # [(file, strength)] for the transformer
    loras_2: list = field(default_factory=list)  # [(file, strength)] for transformer_2 (Wan 2.2 A14B)


def lora_entry(text: str) -> tuple[str, float]:
    """`FILE` or `FILE:STRENGTH` -> (file, strength); a last `:` part that is no number belongs to the file."""
    file, _, strength = text.rpartition(":")
    try:
        return (file, float(strength)) if file else (text, 1.0)
    except ValueError:
        return text, 1.0


def loras_of(value, where: str) -> list[tuple[str, float]]:
    """A config's `model.lora` / `model.lora_2`: one entry or a list; each a string or a {path, strength} mapping."""
    items = [] if value is None else value if isinstance(value, list) else [value]
    entries = []
    for item in items:
        if isinstance(item, dict) and set(item) <= {"path", "strength"} and isinstance(item.get("path"), str) and \
                isinstance(item.get("strength", 1.0), (int, float)) and not isinstance(item.get("strength"), bool):
            entries.append((item["path"], float(item.get("strength", 1.0))))
        elif isinstance(item, str) and item:
            entries.append(lora_entry(item))
        else:
            raise ValueError(f"{where}: a LoRA is a file, 'FILE:STRENGTH' or {{path, strength}}, got {item!r}")
    return entries


def bucket_size(resolution: str, height: int, width: int) -> tuple[int, int]:
    """(height, width) for an image of height x width at a HunyuanVideo resolution, as the authors' run.py picks
    it: among the 32-pixel grids of about side^2 pixels with aspect at most 4:1, the one whose height/width ratio
    (rounded to 5 places) is closest to the image's, taken from the wider-than-or-as-wide side for a portrait or
    square image and from the taller side for a landscape one."""
    cells = round((RESOLUTIONS[resolution] / 32) ** 2)
    buckets, rows, cols = [], cells, 1
    while rows > 0:  # every (rows, cols) with rows * cols <= cells, walked as the reference walks them
        if max(rows, cols) / min(rows, cols) <= 4:
            buckets.append((rows * 32, cols * 32))
        if (cols + 1) * rows <= cells:
            cols += 1
        else:
            rows -= 1
    aspect = height / width
    gaps = [(abs(round(h / w, 5) - aspect), i) for i, (h, w) in enumerate(buckets)
            if (round(h / w, 5) - aspect <= 0 if aspect >= 1 else round(h / w, 5) - aspect > 0)]
    return buckets[min(gaps)[1]]


def sized(resolution: str | None, generation: dict, image, keep=()) -> dict:
    """`generation` for one image: with a HunyuanVideo `video.resolution`, height and width become the bucket
    closest to the image's aspect ratio (bucket_size), except those named in `keep` (set on the command line or
    by a batch line's overrides: they win). The single run and every batch line size their image here."""
    if not resolution:
        return generation
    size = dict(zip(("height", "width"), bucket_size(resolution, *image.shape[:2])))
    return dict(generation, **{k: v for k, v in size.items() if k not in keep})


def _unknown(key: str, known, where: str) -> ValueError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ValueError(f"unknown key '{key}' in {where}{hint}")


def preset_path(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if (PRESETS / f"{name_or_path}.yaml").is_file():
        return PRESETS / f"{name_or_path}.yaml"
    names = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
    raise ValueError(f"config not found: {name_or_path} (not a file, nor a preset: {names})")


def load_config(name_or_path: str) -> RunConfig:
    """Read and validate a YAML run config (a path or a preset name); errors name the key and value."""
    path = preset_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})")
    return parse_config(raw, str(path))


def parse_config(raw: dict, where: str = "config") -> RunConfig:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping of sections {', '.join(SECTIONS)}")
    for section, value in raw.items():
        if section not in SECTIONS:
            raise _unknown(section, SECTIONS, where)
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{where}: section '{section}' must be a mapping, got {value!r}")
        for key in (value or {}) if SECTIONS[section] else ():
            if key not in SECTIONS[section]:
                raise _unknown(key, SECTIONS[section], f"{where} section '{section}'")
    model, video = raw.get("model") or {}, raw.get("video") or {}
    if model.get("flow_reverse"):
        raise ValueError(f"{where}: model.flow_reverse: true (a reversed sigma schedule) is not supported")
    config = RunConfig(alg=ALGConfig.from_dict(raw.get("alg")))
    if model.get("path") is not None:
        if not isinstance(model["path"], str) or not model["path"]:
            raise ValueError(f"{where}: model.path must be a folder or hub repo id, got {model['path']!r}")
        config.model = model["path"]
    if model.get("dtype") is not None:
        if model["dtype"] not in DTYPES:
            raise ValueError(f"{where}: model.dtype must be one of {', '.join(DTYPES)}, got {model['dtype']!r}")
        config.dtype = model["dtype"]
    config.loras = loras_of(model.get("lora"), f"{where}: model.lora")
    config.loras_2 = loras_of(model.get("lora_2"), f"{where}: model.lora_2")
    if video.get("fps") is not None:
        fps = video["fps"]
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 240:
            raise ValueError(f"{where}: video.fps must be a number in (0, 240], got {fps!r}")
        config.fps = fps
    if video.get("resolution") is not None:
        if video["resolution"] not in RESOLUTIONS:
            raise ValueError(f"{where}: video.resolution must be one of {', '.join(RESOLUTIONS)}, "
                             f"got {video['resolution']!r}")
        config.resolution = video["resolution"]
    for key, value in (raw.get("generation") or {}).items():
        if value is None:
            continue
        types = GENERATION[key]
        wrong_bool = isinstance(value, bool) and types is not bool
        if wrong_bool or not isinstance(value, types):
            raise ValueError(f"{where}: generation.{key} has the wrong type: {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ValueError(f"{where}: generation.{key} must not be negative, got {value!r}")
        config.generation[key] = value
    if model.get("flow_shift") is not None:  # the authors' place for it; generation.flow_shift says the same
        shift = model["flow_shift"]
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or shift <= 0:
            raise ValueError(f"{where}: model.flow_shift must be a number > 0, got {shift!r}")
        if config.generation.setdefault("flow_shift", shift) != shift:
            raise ValueError(f"{where}: model.flow_shift {shift} and generation.flow_shift "
                             f"{config.generation['flow_shift']} disagree")
    return config
