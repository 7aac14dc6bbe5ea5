"""GPU speed and memory for the transformers: regional compilation, and blocks streamed from CPU memory.

`compile_blocks(model)` compiles each block's forward with torch.compile; every block of a kind runs the same
code, so one graph per input shape serves them all (HunyuanVideo has two kinds: double- and single-stream
blocks), and the code around the blocks stays eager (cheap, and free of graph breaks).


`stream_blocks(model, device)` puts everything but the blocks on `device` and leaves the blocks' weights on the
CPU (pinned when CUDA is available, so copies run asynchronously). Forward hooks on each block then do:

    before block k:  wait until block k's copy has arrived (it was started while block k-1 ran; block 0 is
                     copied on the spot), point the block's parameters at the copy, and start copying block
                     k+1 on a side CUDA stream, so that copy overlaps block k's compute;
    after block k:   point the parameters back at the CPU tensors; the device copy is freed.

The device so holds the non-block weights, at most two blocks (the one computing and the one arriving) and the
activations: peak = non-block weights + 2 blocks + activations. On a CPU device the same bookkeeping runs with
plain copies and no streams (what the tests exercise). Works with `compile_blocks`: the hooks run outside the
compiled block graphs, which see device parameters on every call.
"""

import torch
import torch.nn as nn


BACKENDS = {"cuda": "CUDA", "mps": "Apple MPS", "xpu": "Intel XPU"}  # device type -> its name in messages


def available_devices() -> list[str]:
    """The devices this torch build can run on here: cpu, then each CUDA / MPS / XPU device that answers."""
    names = ["cpu"]
    for kind in BACKENDS:
        backend = torch.backends.mps if kind == "mps" else getattr(torch, kind, None)
        if backend is not None and backend.is_available():
            count = torch.cuda.device_count() if kind == "cuda" else getattr(backend, "device_count", lambda: 1)()
            names += [kind] if count == 1 else [f"{kind}:{i}" for i in range(count)]
    return names


def check_device(device: "str | torch.device") -> torch.device:
    """`device` as a torch.device, or a one-line ValueError saying why it cannot be used here and which devices
    can (instead of a deep error from the first tensor that lands on it)."""
    available = available_devices()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; available devices here: {', '.join(available)}") from None
    if device.type == "cpu":
        return device
    if device.type not in BACKENDS:
        raise ValueError(f"minialg does not run on {device.type!r} devices; available devices here: "
                         f"{', '.join(available)}")
    present = [name for name in available if name.split(":")[0] == device.type]
    if not present:
        build = " (this torch is a CPU-only build)" if device.type == "cuda" and not (
            torch.version.cuda or torch.version.hip) else ""
        raise ValueError(f"{BACKENDS[device.type]} is not available here{build}; available devices: "
                         f"{', '.join(available)}")
    if device.index is not None and device.index >= len(present):
        raise ValueError(f"there is no {device} here; available devices: {', '.join(available)}")
    return device


BLOCK_LISTS = ("blocks", "transformer_blocks", "single_transformer_blocks", "encoder.block")  # checkpoint names


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model in the order they run: Wan's `blocks`, CogVideoX's `transformer_blocks`,
    HunyuanVideo's `transformer_blocks` (double stream) then `single_transformer_blocks`, T5's `encoder.block`."""
    found = []
    for name in BLOCK_LISTS:
        owner, _, leaf = name.rpartition(".")
        found += getattr(getattr(model, owner, None) if owner else model, leaf, None) or []
    return found


def compile_blocks(model: nn.Module, **compile_kwargs) -> None:
    """Regional compilation: `torch.compile` each block's forward (static shapes unless `dynamic` is given).
    Forward hooks on the blocks (stream_blocks) run outside the compiled graphs."""
    compile_kwargs.setdefault("dynamic", False)
    for block in blocks_of(model):
        block.forward = torch.compile(block.forward, **compile_kwargs)


class BlockStreamer:
    """The hooks and state of one streamed model; `remove()` takes the hooks off (the blocks stay on the CPU).

    Each block's weights live in one flat CPU buffer per dtype (the parameters are views of it), so a block
    travels in one or two large copies, and its device copy is one allocation per dtype.
    """

    def __init__(self, blocks: list[nn.Module], device: torch.device):
        self.device = device
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.host = [pack(block) for block in blocks]  # per block: [(flat CPU buffer, [(param, offset)])]
        self.arriving = {}  # block index -> (device buffers, copy-done event or None): copies under way
        self.handles = []
        for k, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(lambda module, args, k=k: self.before(k)))
            self.handles.append(block.register_forward_hook(lambda module, args, out, k=k: self.after(k)))

    def fetch(self, k: int) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
        """Start copying block k's buffers to the device: on the side stream on CUDA, at once elsewhere."""
        if self.copy_stream is None:
            return [flat.to(self.device, copy=True) for flat, _ in self.host[k]], None
        with torch.cuda.stream(self.copy_stream):
            copies = [flat.to(self.device, non_blocking=True) for flat, _ in self.host[k]]
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        return copies, done

    def before(self, k: int) -> None:
        copies, done = self.arriving.pop(k, None) or self.fetch(k)
        if done is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(done)  # a device-side wait: the host does not block
            for flat in copies:  # allocated on the side stream, used on this one: not reused before it is done
                flat.record_stream(compute)
        for flat, (_, params) in zip(copies, self.host[k]):
            point(params, flat)
        if k + 1 < len(self.host) and k + 1 not in self.arriving:
            self.arriving[k + 1] = self.fetch(k + 1)

    def after(self, k: int) -> None:
        for flat, params in self.host[k]:
            point(params, flat)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.arriving.clear()


def pack(block: nn.Module) -> list[tuple[torch.Tensor, list[tuple[nn.Parameter, int]]]]:
    """Copy a block's parameters into one flat CPU buffer per dtype (pinned when CUDA is available), each
    parameter at an offset aligned to 64 elements, and point the parameters at their views of it."""
    by_dtype = {}
    for p in block.parameters():
        by_dtype.setdefault(p.dtype, []).append(p)
    packed = []
    for dtype, params in by_dtype.items():
        offsets, size = [], 0
        for p in params:
            offsets.append(size)
            size += -(-p.numel() // 64) * 64
        flat = torch.empty(size, dtype=dtype, pin_memory=torch.cuda.is_available())
        for p, offset in zip(params, offsets):
            flat[offset:offset + p.numel()].copy_(p.data.flatten())
        packed.append((flat, list(zip(params, offsets))))
        point(packed[-1][1], flat)
    return packed


def point(params: list[tuple[nn.Parameter, int]], flat: torch.Tensor) -> None:
    """Make each parameter's data its view of `flat` (a packed buffer, on the CPU or a device copy)."""
    for p, offset in params:
        p.data = flat[offset:offset + p.numel()].view(p.shape)


def stream_blocks(model: nn.Module, device: torch.device | str) -> BlockStreamer:
    """Move `model` to `device` except its blocks (`blocks_of`), which stay on the CPU and visit `device` one at
    a time during forward, in the order they run (see the module docstring)."""
    device = torch.device(device)
    blocks = blocks_of(model)
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    for p in model.parameters():
        if id(p) not in in_blocks:
            p.data = p.data.to(device)
    return BlockStreamer(blocks, device)
