"""Checkpoints in diffusers' folder layout: find or download, check from headers, stream tensors in.

A checkpoint is a folder with `model_index.json` and one sub-folder per component (`transformer/`, `vae/`,
`text_encoder/`, ...). Each model component holds a `config.json` and its weights as safetensors, in one file or
sharded with a `*.safetensors.index.json` naming the file of every tensor.

Loading never materialises a module on the CPU first: the module is built on the meta device from its config,
every tensor name and shape is checked against the safetensors headers (no tensor data read), and only then
are the tensors streamed one by one to the target device and dtype.

The same path loads weights from elsewhere: `Weights` names a component's config, its files and a renaming of
their tensors (minialg.single_file: a Wan transformer as one file, or in the official layout; minialg.
component_files: the VAE and the encoders), and `load` takes a per-tensor `transform`, where a step such as
merging a LoRA hooks in. Tensors are kept as the file stores them where a module says so (minialg.fp8: fp8 block
weights stay fp8). Besides safetensors, `.pth` files are read, as plain dicts of tensors only: torch.load with
weights_only (no pickled code runs) and mmap (tensor data is read when used, as from safetensors).
"""

import dataclasses
import json
import os
import pickle
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from . import fp8

WEIGHTS_DIR = Path(os.environ.get("MINIALG_WEIGHTS", Path(__file__).resolve().parent.parent / "weights"))
# what a run needs from a hub checkpoint; legacy .bin/.pth files and other variants are never fetched
HUB_PATTERNS = ["model_index.json", "*/config.json", "*/*.safetensors", "*/*.safetensors.index.json",
                "tokenizer/*", "tokenizer_2/*", "image_processor/*", "scheduler/*"]
WEIGHT_NAMES = ("diffusion_pytorch_model", "model")  # diffusers' and transformers' file stems
SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
         torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
         torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}  # torch -> safetensors


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem in one line."""


def resolve(model: str | os.PathLike) -> Path:
    """A local checkpoint folder, or a hub repo id (`org/name`), downloaded into weights/ on first use."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    name = str(model)
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise CheckpointError(f"model folder not found: {name}")
    local = WEIGHTS_DIR / name.split("/")[1]
    if (local / "model_index.json").is_file():
        return local
    return download(name, local)


def download(repo_id: str, dest: Path | None = None) -> Path:
    """Fetch the files a run needs (configs, safetensors, tokenizer, processor) with progress bars."""
    from huggingface_hub import snapshot_download

    dest = Path(dest) if dest else WEIGHTS_DIR / repo_id.split("/")[-1]
    try:
        snapshot_download(repo_id, local_dir=dest, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # network, auth, unknown repo: one line for the user
        raise CheckpointError(f"could not download {repo_id}: {type(e).__name__}: {str(e).splitlines()[0]}")
    return dest


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})")


def read_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) from a safetensors header; checks the file is long enough for its data."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else 0
        if n <= 0 or 8 + n > size:
            raise CheckpointError(f"{file}: not a safetensors file or truncated (bad header)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{file}: corrupt safetensors header")
    header.pop("__metadata__", None)
    tensors, data_end = {}, 0
    for name, info in header.items():
        dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        numel = 1
        for d in shape:
            numel *= d
        if dtype in SAFETENSORS_DTYPES and end - begin != numel * SAFETENSORS_DTYPES[dtype]:
            raise CheckpointError(f"{file}: corrupt header entry for tensor '{name}'")
        tensors[name] = (dtype, shape)
        data_end = max(data_end, end)
    if 8 + n + data_end > size:
        raise CheckpointError(f"{file}: truncated ({size} bytes, its header needs {8 + n + data_end})")
    return tensors


def read_pth(file: Path) -> dict[str, torch.Tensor]:
    """A .pth file's tensors: torch.load(weights_only=True, mmap=True) of a plain {name: tensor} dict. A file
    that pickles anything else (a class, a module, code) is refused by weights_only before it runs."""
    try:
        state = torch.load(file, weights_only=True, map_location="cpu", mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{file}: not a plain dict of tensors; torch.load(weights_only=True) refused it "
                              f"({str(e).splitlines()[0]})")
    except (RuntimeError, OSError, EOFError) as e:  # an old-style (non-zip) torch.save file, truncated, not torch
        raise CheckpointError(f"{file}: not readable as a torch.save zip file ({str(e).splitlines()[0]})")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{file}: not a plain dict of tensors (holds {type(state).__name__} of other things)")
    return state


def header_of(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (safetensors dtype, shape) of a .safetensors or .pth file, reading no tensor data."""
    if file.suffix == ".pth":
        return {name: (CODES.get(t.dtype, str(t.dtype)), tuple(t.shape)) for name, t in read_pth(file).items()}
    return read_header(file)


@contextmanager
def tensors_of(file: Path, device):
    """`get(name)`: one tensor of a .safetensors or .pth file, on `device`."""
    if file.suffix == ".pth":
        tensors = read_pth(file)
        yield lambda name: tensors[name].to(device)
        return
    with safe_open(str(file), framework="pt", device=str(device)) as f:
        yield f.get_tensor


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of one component, from its index when sharded."""
    for stem in WEIGHT_NAMES:
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            names = sorted(set(read_json(index).get("weight_map", {}).values()))
            missing = [n for n in names if not (folder / n).is_file()]
            if not names or missing:
                raise CheckpointError(f"{index}: shard {missing[0] if missing else '(none)'} not found")
            return [folder / n for n in names]
        if (folder / f"{stem}.safetensors").is_file():
            return [folder / f"{stem}.safetensors"]
    raise CheckpointError(f"no safetensors weights in {folder}")


def config_from(config_cls, values: dict):
    """A model's config dataclass from a config.json dict: its own fields taken, the rest (`_class_name`,
    `_diffusers_version`, `architectures`, `torch_dtype`, ...) ignored."""
    known = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in values.items() if k in known})


@dataclasses.dataclass
class Weights:
    """Where one component's weights come from: its config (a config.json's dict), its files (safetensors or
    .pth), and how their tensor names become the module's. `rename` maps a name in the files to the module's
    (None: skip the tensor), or to a list of module names where one stored tensor holds several, one after
    another along its first dimension (a fused q/k/v projection; a list of one: the same tensor with extra
    leading 1s, as official CLIP's (1, 1, C) class embedding); `file_name` maps back, for messages; `about` says
    what the files are (check's summary)."""
    config: dict
    files: list[Path]
    where: Path  # the folder or file, in messages
    rename: Callable[[str], str | None] = lambda name: name
    file_name: Callable[[str], str] = lambda name: name
    about: dict = dataclasses.field(default_factory=dict)


def weights_in(source: Path | Weights) -> Weights:
    """A component folder in diffusers' layout (config.json and its safetensors) as Weights; Weights as they are."""
    if isinstance(source, Weights):
        return source
    return Weights(read_json(source / "config.json"), weight_files(source), source)


def build(model_cls, config_cls, source: Path | Weights):
    """The component's module on the meta device, from its config (no weight file is needed for that)."""
    values = source.config if isinstance(source, Weights) else read_json(source / "config.json")
    config = config_from(config_cls, values)
    with torch.device("meta"):
        return model_cls(config)


def plan(module: torch.nn.Module, source: Path | Weights) -> dict[Path, list[tuple[str, str]]]:
    """Check a component's tensors against its module from the headers alone.

    Returns file -> [(name in the file, name in the module)]. Raises on a missing, unexpected or mis-shaped
    tensor, naming it and its file. Block Linear layers whose weights the files hold in fp8 first become fp8
    layers (minialg.fp8), so that what is checked, and then loaded, is the precision as stored.
    """
    source = weights_in(source)
    entries = []  # (file, name in the file, name in the module, dtype, shape)
    for file in source.files:
        for name, (dtype, shape) in header_of(file).items():
            entries += [(file, name, target, dtype, part) for target, part in held(module, source, name, shape)]
    fp8.keep_fp8(module, {target: (dtype, shape) for _, _, target, dtype, shape in entries})
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    by_file, found, problems = {}, {}, []
    for file, name, target, _, shape in entries:
        if target not in expected:
            problems.append(f"unexpected tensor '{name}' in {file}")
        elif shape != expected[target]:
            problems.append(f"tensor '{name}' in {file} has shape {list(shape)}, "
                            f"the config says {list(expected[target])}")
        elif target in found:
            problems.append(f"tensor '{name}' in {file} is also in {found[target]}")
        else:
            found[target] = file
            by_file.setdefault(file, []).append((name, target))
    problems += [f"tensor '{source.file_name(name)}' missing from {source.where}"
                 for name in expected if name not in found]
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise CheckpointError(problems[0] + more)
    return by_file


def held(module: torch.nn.Module, source: Weights, name: str, shape: tuple) -> list[tuple[str, tuple]]:
    """[(module name, shape)] of what one stored tensor holds: the tensor, renamed (by the source, then by the
    module's own `checkpoint_name`), or, where the source renames it to a list, its equal parts along the first
    dimension, leading 1s dropped (a shape that does not split evenly is reported as stored)."""
    target = source.rename(name)
    if isinstance(target, list):
        if shape[0] % len(target):
            return [(t, shape) for t in target]
        part = (shape[0] // len(target),) + tuple(shape[1:])
        while len(part) > 1 and part[0] == 1:
            part = part[1:]
        return [(t, part) for t in target]
    target = None if target is None else getattr(module, "checkpoint_name", lambda n: n)(target)
    return [] if target is None else [(target, shape)]


def load(model_cls, config_cls, source: Path | Weights, device="cpu", dtype=torch.float32,
         transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> torch.nn.Module:
    """Build on meta, check the headers, then stream each tensor straight to `device` in `dtype`.

    Floating tensors with a dotted name part in the module's `fp32_params` stay float32 (diffusers' rule); the
    tensors a layer names in its `stored` (minialg.fp8: fp8 weights and their scales) stay as the file stores
    them. `transform(name in the module, tensor)`, if given, sees every tensor as read, before its dtype is set,
    and returns the tensor to keep: the place for a per-tensor step such as merging a LoRA (minialg.lora). A tensor
    it replaces is no longer as stored: it gets the dtype of any other (a merged fp8 weight, the compute dtype).
    """
    module = build(model_cls, config_cls, source)
    keep_fp32 = getattr(module, "fp32_params", ())
    source = weights_in(source)
    for file, names in plan(module, source).items():
        with tensors_of(file, device) as get:
            for file_name, module_name in names:
                read = get(file_name)
                owner, _, leaf = module_name.rpartition(".")
                sub = module.get_submodule(owner)
                parts = source.rename(file_name)
                if isinstance(parts, list):  # one of several module tensors stored as one
                    read = read.chunk(len(parts))[parts.index(module_name)].reshape(getattr(sub, leaf).shape)
                tensor = read if transform is None else transform(module_name, read)
                if tensor.is_floating_point() and (leaf not in getattr(sub, "stored", ()) or tensor is not read):
                    fp32 = any(part in keep_fp32 for part in module_name.split("."))
                    tensor = tensor.to(torch.float32 if fp32 else dtype)
                if leaf in sub._buffers:  # a persistent buffer (LTX-Video's latents_mean / latents_std)
                    sub._buffers[leaf] = tensor
                else:
                    sub._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    return module.eval()
