"""LoRAs for Wan, merged into a transformer's weights as they load: `minialg.load(model, loras=[(FILE, strength)])`,
and for Wan 2.2 A14B's low-noise expert `loras_2=[...]` (diffusers' load_into_transformer_2).

A key of a LoRA file is a module path and a suffix. After a prefix (`transformer.`, `diffusion_model.`,
`model.diffusion_model.`, `lora_unet_`), the path is in diffusers' names or the official ones (minialg.single_file's
table), with dots or kohya's underscores:

    diffusers, PEFT          transformer.blocks.0.attn1.to_q.lora_A.weight, .lora_B.weight    scale 1, or the PEFT
                             metadata's lora_alpha / rank (what diffusers saves; alpha_pattern, rsLoRA)
    ComfyUI, diffusion-pipe  diffusion_model.blocks.0.self_attn.q.lora_A.weight, .lora_B      scale 1
    kohya, musubi-tuner      lora_unet_blocks_0_self_attn_q.lora_down.weight, .lora_up, .alpha scale alpha / rank
    full deltas              X.diff (X's weight, or the tensor X), X.diff_b (its bias), X.diff_m (its modulation)

An `.alpha` beside any pair scales it by alpha / rank, as diffusers and ComfyUI read it. Each tensor W the LoRAs
touch loads as W + sum over the LoRAs of strength * (scale * B @ A + diff), in float32, then in its dtype. An fp8
weight (minialg.fp8) is up-cast with its scale_weight first, and its layer becomes an ordinary Linear in the
compute dtype: a merged fp8 layer is no longer fp8 (2 bytes a weight in bf16, not 1; not re-quantized).
Where diffusers' loader differs, minialg applies what the file holds, as ComfyUI does: diffusers drops `.diff`
(but the head's), `.diff_m` and norm deltas, and reads a diffusers-format file's keys only with `transformer.`.

A key that names nothing in the transformer (another model's LoRA; Wan 2.1 I2V's image cross-attention k_img, v_img
on Wan 2.2) is listed by `check`; `load` refuses the file, naming the first few, unless strict_loras=False: then it
warns and merges the rest. A tensor whose shape does not fit its target is an error.
"""

import dataclasses
import json
import re
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from . import checkpoint, fp8, single_file
from .checkpoint import CheckpointError

PREFIXES = ("transformer.", single_file.PREFIX, "diffusion_model.", "lora_unet_")  # the first that matches goes
ROLES = {"lora_A.weight": "down", "lora_down.weight": "down", "lora_B.weight": "up", "lora_up.weight": "up",
         "alpha": "alpha", "diff": "diff", "diff_b": "diff", "diff_m": "diff"}
TENSOR = {"diff_b": "bias", "diff_m": "modulation"}  # the tensor of a module a suffix changes; the others: its weight


def spellings(names) -> dict[str, tuple[str, str]]:
    """Each way a file may spell a tensor of the module, dots as underscores -> (its name, "diffusers" | "official")."""
    official = {single_file.to_official(name).replace(".", "_"): (name, "official") for name in names}
    return official | {name.replace(".", "_"): (name, "diffusers") for name in names}


def split(key: str) -> tuple[str, str | None]:
    """A key's module path and suffix (None: not a LoRA tensor minialg knows)."""
    key = next((key[len(p):] for p in PREFIXES if key.startswith(p)), key)
    suffix = next((s for s in ROLES if key.endswith("." + s)), None)
    return (key[:-len(suffix) - 1], suffix) if suffix else (key, None)


def locate(file) -> Path:
    """A local .safetensors file, or a hub file written `org/repo/path/in/repo.safetensors`, fetched into
    weights/loras/ on first use."""
    path, name = Path(file).expanduser(), str(file)
    if not name.endswith(".safetensors"):
        raise CheckpointError(f"{name}: minialg reads LoRAs as .safetensors files")
    if path.is_file():
        return path
    parts = name.split("/")
    if path.exists() or len(parts) < 3 or not re.fullmatch(r"[\w.-]+/[\w.-]+", "/".join(parts[:2])):
        raise CheckpointError(f"LoRA file not found: {name}")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]),
                                    local_dir=checkpoint.WEIGHTS_DIR / "loras" / parts[1]))
    except Exception as e:  # network, auth, unknown repo or file: one line for the user
        raise CheckpointError(f"LoRA file not found here, nor on the hub: {name} ({type(e).__name__})")


@dataclasses.dataclass
class LoRA:
    """One LoRA file read against a transformer (tensor name -> shape): which of its keys change which tensor."""
    file: Path
    strength: float
    parts: dict[str, dict[str, str]]  # the module's tensor -> {"down" | "up" | "alpha" | "diff": key in the file}
    unmatched: list[str]
    format: str  # "diffusers", "official" or "kohya": how the file names the modules
    suffixes: list[str]
    ranks: list[int]
    peft: dict  # the PEFT config diffusers saves in the file's metadata ({} without)
    tensors: dict | None = None  # the file's tensors, read by load

    @classmethod
    def read(cls, file, strength: float, shapes: dict[str, tuple]) -> "LoRA":
        path = locate(file)
        header, table = checkpoint.read_header(path), spellings(shapes)
        parts, unmatched, namings, suffixes = {}, [], set(), set()
        for key in header:
            module, suffix = split(key)
            tried = [f"{module}.{TENSOR.get(suffix, 'weight')}"] + ([module] if suffix == "diff" else [])
            hit = next((table[t.replace(".", "_")] for t in tried if suffix and t.replace(".", "_") in table), None)
            if hit is None:
                unmatched.append(key)
                continue
            parts.setdefault(hit[0], {})[ROLES[suffix]] = key
            namings.add(hit[1])
            suffixes.add(suffix)
        for name, roles in list(parts.items()):  # pairs complete, shapes those of their tensors
            if ("down" in roles) != ("up" in roles) or set(roles) == {"alpha"}:
                unmatched += [f"{key} (incomplete: {', '.join(sorted(roles))})" for key in roles.values()]
                del parts[name]
                continue
            target, got = shapes[name], {role: header[key][1] for role, key in roles.items()}
            pair = "down" not in roles or (len(got["down"]) == 2 and got["up"] == (target[0], got["down"][0])
                                           and got["down"][1:] == target[1:])
            if not pair or got.get("diff", target) != target:
                raise CheckpointError(f"{path}: LoRA tensors {', '.join(roles.values())} do not fit '{name}' of "
                                      f"shape {list(target)} ({', '.join(f'{r} {list(s)}' for r, s in got.items())})")
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata") or "{}")
        peft = {k.removeprefix("transformer."): v for k, v in meta.items()}
        naming = "kohya" if any(k.startswith("lora_unet_") for k in header) else \
            "official" if "official" in namings else "diffusers"
        ranks = sorted({header[r["down"]][1][0] for r in parts.values() if "down" in r})
        return cls(path, strength, parts, unmatched, naming, sorted(suffixes), ranks, peft)

    def summary(self) -> dict:
        return {"file": str(self.file), "strength": self.strength, "format": self.format, "keys": self.suffixes,
                "rank": "-".join(str(r) for r in sorted({self.ranks[0], self.ranks[-1]})) if self.ranks else None,
                "matched": sum(len(r) for r in self.parts.values()), "unmatched": self.unmatched}

    def scale(self, name: str, roles: dict, rank: int) -> float:
        """alpha / rank from the file's `.alpha`, else from its PEFT metadata (lora_alpha, alpha_pattern, rsLoRA),
        else 1."""
        if "alpha" in roles:
            return self.tensors[roles["alpha"]].item() / rank
        module, patterns = name.rpartition(".")[0], self.peft.get("alpha_pattern") or {}
        key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), None)
        alpha = patterns[key] if key is not None else self.peft.get("lora_alpha", 8) if self.peft else rank
        return alpha / (rank ** 0.5 if self.peft.get("use_rslora") else rank)

    def delta(self, name: str, device) -> torch.Tensor:
        """strength * (scale * B @ A + diff) for one tensor, float32 on `device`."""
        roles = self.parts[name]
        get = lambda role: self.tensors[roles[role]].to(device, torch.float32)  # noqa: E731
        delta = get("diff") if "diff" in roles else 0.0
        if "down" in roles:
            down, up = get("down"), get("up")
            delta = delta + self.scale(name, roles, down.shape[0]) * (up @ down)
        return self.strength * delta


def entries(value) -> list[tuple[str, float]]:
    """[(file, strength)] from None, one file, or a list of files and (file, strength) pairs (strength 1 if none)."""
    items = [] if value is None else [value] if isinstance(value, (str, Path)) else list(value)
    pairs = [(item, 1.0) if isinstance(item, (str, Path)) else tuple(item) for item in items]
    for pair in pairs:
        if len(pair) != 2 or isinstance(pair[1], bool) or not isinstance(pair[1], (int, float)):
            raise ValueError(f"a LoRA is a file or a (file, strength) pair with a number for strength, got {pair!r}")
    return [(file, float(strength)) for file, strength in pairs]


def refuse_unmatched(summary: list[dict], strict: bool = True) -> None:
    """One error (strict) or warning per LoRA in check's summary with keys that name nothing in its transformer."""
    for row in [dict(lora, component=part["component"]) for part in summary for lora in part.get("loras", [])]:
        keys = row["unmatched"]
        if keys:
            message = (f"LoRA {row['file']}: {len(keys)} keys match nothing in {row['component']}: "
                       f"{', '.join(keys[:3])}{f' (and {len(keys) - 3} more)' if len(keys) > 3 else ''}")
            if strict:
                raise CheckpointError(message + "; strict_loras=False (--lora_skip_unmatched) merges the rest")
            warnings.warn(message + "; merging the rest")


def load(model_cls, config_cls, source, device, dtype: torch.dtype, entries: list[tuple]) -> torch.nn.Module:
    """checkpoint.load with the LoRAs `entries` [(file, strength)] merged into the tensors as they stream in."""
    source = checkpoint.weights_in(source)
    module = checkpoint.build(model_cls, config_cls, source)
    loras = [LoRA.read(file, strength, {n: tuple(t.shape) for n, t in module.state_dict().items()})
             for file, strength in entries]
    touched = {name for lora in loras for name in lora.parts}
    for lora in loras:
        lora.tensors = load_file(str(lora.file))
    scales, folded = {}, set()  # scaled fp8 weights the LoRAs touch: their scale_weight is folded in here
    for file, names in checkpoint.plan(module, source).items():
        wanted = {stored: name.removesuffix("scale_weight") + "weight" for stored, name in names
                  if name.endswith(".scale_weight") and name.removesuffix("scale_weight") + "weight" in touched}
        if wanted:
            with safe_open(str(file), framework="pt") as f:
                scales.update({weight: f.get_tensor(stored).float() for stored, weight in wanted.items()})
        folded.update(wanted)
    rename = source.rename
    source = dataclasses.replace(source, rename=lambda name: None if name in folded else rename(name))

    def merge(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name not in touched:
            return tensor
        merged = tensor.to(torch.float32, copy=True)
        if name in scales:
            merged *= scales[name].to(merged.device)
        for lora in loras:
            if name in lora.parts:
                merged += lora.delta(name, merged.device)
        return merged  # checkpoint.load gives a replaced tensor the dtype it loads in

    module = checkpoint.load(model_cls, config_cls, source, device, dtype, transform=merge)
    for layer in module.modules():  # merged fp8 layers: ordinary Linears in the compute dtype
        if isinstance(layer, fp8.Fp8Linear) and layer.weight.dtype not in fp8.FP8.values():
            layer.__class__ = torch.nn.Linear
            del layer.scale_weight
    return module
