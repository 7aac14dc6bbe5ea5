"""Scale-out on torch.distributed: guidance-parallel and sequence-parallel sampling under torchrun.

    torchrun --nproc_per_node 4 cli.py --config wan_alg ... --sequence_parallel 2

Under torchrun (WORLD_SIZE > 1) `minialg.load` joins the process group (NCCL for CUDA tensors, gloo for CPU
ones; each rank on the device LOCAL_RANK names) and lays the world out as G x K ranks, rank = g * K + s:

  sequence parallel (Ulysses; K = `sequence_parallel`): the K ranks of sequence group g run the same denoiser
      passes together. Each holds the video tokens of 1/K of the patch rows of every frame (rows, not a flat
      cut of the token list, so per-frame modulation still sees whole frames). Around self-attention one
      all-to-all turns (my tokens, all heads) into (all tokens, my N/K heads) and a second one turns the
      output back; positions are computed for the whole grid before the split, so they stay global.
      Cross-attention needs no exchange (the queries are local, the text is whole on every rank). In joint
      attention ([text ; video], CogVideoX, HunyuanVideo) the text tokens are whole on every rank: each rank
      takes its heads' slice of them, and their outputs are all-gathered over the heads.
  guidance parallel (G = world / K, at most 3): the passes of a step (three for an ALG step, two for CFG) are
      dealt out to the G sequence groups; each runs its share as one batch, and an all_gather over the guidance
      group (the G ranks with the same s) gives every rank every pass's output. Every rank then combines the
      same bits the same way, so all ranks stay identical.
  data parallel (`cli.py batch`): the G sequence groups make different videos instead.

Everything else (encoders, noise, ALG filtering, solver, decode) runs on every rank: same seed, same kind of
device, same bits, so nothing else is exchanged. Only torch.distributed collectives are used.

Failures: a collective that fails because another rank stopped (gloo notices a closed connection at once; NCCL
waits for the process group timeout, MINIALG_DIST_TIMEOUT seconds, default 600) raises PeerError, one line that
names the rank that failed and its message when that rank could leave it in the rendezvous store. `leave()`
ends the process group: after a barrier when the run went well, without one (abort) when it did not, so a rank
that fails never waits for the others.
"""

import atexit
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from . import gpu
from .models.wan import WholeSequence, attend

MAX_PASSES = 3  # denoiser passes of one step: an ALG step (uncond, cond_lp, uncond_lp)
ERROR_KEY = "minialg/error"  # where a failing rank leaves its message in the rendezvous store


class PeerError(RuntimeError):
    """A collective failed: another rank stopped, or did not answer within the timeout."""


class Layout:
    """Where this rank sits: `world` = G x K ranks, sequence group g = rank // K, position s = rank % K."""

    def __init__(self, rank: int = 0, world: int = 1, sequence: int = 1, data: bool = False,
                 sequence_group=None, guidance_group=None):
        self.rank, self.world, self.sequence, self.data = rank, world, sequence, data
        self.groups = world // sequence  # G sequence groups
        self.group = rank // sequence  # g, this rank's sequence group
        self.sequence_group, self.guidance_group = sequence_group, guidance_group

    @property
    def guidance(self) -> int:
        """How many sequence groups share a step's passes (1 when they make different videos)."""
        return 1 if self.data else self.groups

    @property
    def writes(self) -> bool:
        """Whether this rank writes files and shows progress: rank 0, or each group's first rank (data parallel)."""
        return self.rank % self.sequence == 0 if self.data else self.rank == 0


def launched() -> bool:
    """Whether this process is one rank of several (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    """This process's rank (0 on a single process), known before the process group is joined."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """How many ranks this run has (1 on a single process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get("MINIALG_DIST_TIMEOUT", "600")))


def join(device: torch.device) -> torch.device:
    """Join the process group once (no-op on a single process); returns the device of this rank: a CUDA device
    without an index becomes cuda:LOCAL_RANK."""
    device = torch.device(device)
    if not launched():
        return device
    device = gpu.check_device(device)
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"distributed runs work on CUDA or the CPU, not {device.type}")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"rank {os.environ.get('RANK')}: there is no {device} here (LOCAL_RANK too large?)")
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # gloo beside NCCL: CPU-side agreement (`together`) never touches the GPU's streams
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo", timeout=timeout())
        atexit.register(leave, ok=False)
    return device


_groups = {}  # (K, data) -> (sequence groups, guidance groups): new_group is collective, make each layout once


def setup(device: torch.device, sequence_parallel: int = 1, data_parallel: bool = False) -> tuple[Layout, torch.device]:
    """Join the process group (under torchrun) and lay the world out; one-line errors for what cannot work."""
    K = sequence_parallel
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"sequence_parallel must be a positive integer, got {K!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % K:
        raise ValueError(f"sequence_parallel={K} needs a world size that is a multiple of {K}, got {world} "
                         f"(run under torchrun --nproc_per_node {K})")
    if not data_parallel and world // K > MAX_PASSES:
        raise ValueError(f"world size {world} with sequence_parallel={K} makes {world // K} guidance groups, but a "
                         f"step has at most {MAX_PASSES} passes: use {K}, {2 * K} or {3 * K} ranks")
    device = join(device)
    if world == 1:
        return Layout(), device
    if (K, data_parallel) not in _groups:
        G = world // K
        sequence = [dist.new_group(list(range(g * K, g * K + K))) for g in range(G)] if K > 1 else [None] * G
        guidance = [dist.new_group(list(range(s, world, K))) for s in range(K)] if G > 1 and not data_parallel \
            else [None] * K
        _groups[K, data_parallel] = sequence, guidance
    sequence, guidance = _groups[K, data_parallel]
    rank = dist.get_rank()
    return Layout(rank, world, K, data_parallel, sequence[rank // K], guidance[rank % K]), device


def check_heads(layout: Layout, heads: dict[str, int]) -> None:
    """Ulysses deals whole heads out to the K ranks: K must divide each denoiser's head count."""
    for name, n in heads.items():
        if n % layout.sequence:
            raise ValueError(f"sequence_parallel={layout.sequence} does not divide the {n} attention heads of "
                             f"{name}: choose a divisor of {n}")


def check_passes(layout: Layout, cfg: bool, alg: bool) -> None:
    """A world whose guidance groups outnumber the run's passes per step cannot be used."""
    passes, why = (3, "ALG") if cfg and alg else (2, "CFG") if cfg else (1, "no CFG")
    if layout.guidance > passes:
        raise ValueError(f"{layout.world} ranks with sequence_parallel={layout.sequence} make {layout.guidance} "
                         f"guidance groups, but this run has at most {passes} pass(es) per step ({why}): run with "
                         f"{layout.sequence * passes} ranks")


def apply(pipe, layout: Layout):
    """Fit a loaded pipeline to the layout: passes dealt out over the guidance groups, tokens over the ranks."""
    pipe.layout = layout
    if layout.guidance > 1:
        pipe.denoise = spread(pipe.denoise, layout)
    if layout.sequence > 1:
        for name in ("transformer", "transformer_2"):
            model = getattr(pipe, name, None)
            if model is not None:
                hook = Ulysses(layout.sequence_group, layout.sequence, layout.rank % layout.sequence)
                for module in model.modules():
                    if isinstance(getattr(module, "sequence", None), WholeSequence):
                        module.sequence = hook
    return pipe


# ----------------------------------------------------------------------------------------------------------------
# Guidance parallel: a step's passes dealt out to the sequence groups


def owners(passes: int, groups: int) -> list[int]:
    """The group that runs each pass: consecutive passes, ceil(passes / groups) per group."""
    per = -(-passes // groups)
    return [j // per for j in range(passes)]


def spread(denoise, layout: Layout):
    """Wrap a family's `denoise(model, x, t, conditions, texts) -> one output per pass` so that each sequence
    group runs its share of the passes and every rank gets all outputs (all_gather over the guidance group).
    A group with no pass of its own (fewer passes than groups) runs a spare copy: it would idle anyway."""

    def spread_denoise(model, x, t, conditions: list, texts: list) -> tuple[torch.Tensor, ...]:
        n = len(conditions)
        owner = owners(n, layout.guidance)
        mine = [j for j in range(n) if owner[j] == layout.group] or [layout.group % n]
        outputs = list(denoise(model, x, t, [conditions[j] for j in mine], [texts[j] for j in mine]))
        per = owner.count(0)  # the most passes any group runs
        stacked = torch.stack(outputs + outputs[-1:] * (per - len(outputs)))  # (per, ...) on every group
        gathered = [torch.empty_like(stacked) for _ in range(layout.guidance)]
        with collective("gathering the guidance passes"):
            dist.all_gather(gathered, stacked, group=layout.guidance_group)
        return tuple(gathered[owner[j]][owner[:j].count(owner[j])] for j in range(n))

    return spread_denoise


# ----------------------------------------------------------------------------------------------------------------
# Sequence parallel (Ulysses): each rank holds some patch rows of every frame, attention sees all of them


class Ulysses(WholeSequence):
    """The hooks of a transformer whose video tokens are split over the K ranks of a sequence group.

    The transformer calls `split` once its per-token tensors exist (tokens on dim -2, in (f, h, w) order),
    `attend` in self-attention, and `join` on its output tokens; `split` records the grid and each rank's rows,
    which the all-to-alls of the forward pass then use. After the first all-to-all the tokens are put back in
    (f, h, w) order, so attention sees the sequence exactly as a single process does."""

    def __init__(self, group, ranks: int, index: int):
        self.group, self.ranks, self.index = group, ranks, index
        self.grid, self.spans = None, None  # the current forward pass's (f, h, w) and every rank's rows

    def rows(self, h: int) -> list[tuple[int, int]]:
        """The patch rows [start, stop) of every rank: as even as can be."""
        if h < self.ranks:
            raise ValueError(f"sequence_parallel={self.ranks} splits the patch rows of each frame, but the latent "
                             f"has only {h}: use a larger height or a smaller sequence_parallel")
        return [(r * h // self.ranks, (r + 1) * h // self.ranks) for r in range(self.ranks)]

    def split(self, grid: tuple[int, int, int], *tensors):
        self.grid, self.spans = grid, self.rows(grid[1])
        a, b = self.spans[self.index]
        return tuple(None if t is None else t.unflatten(-2, grid)[..., a:b, :, :].flatten(-4, -2) for t in tensors)

    def join(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, this rank's tokens, C) -> (B, L, C) on every rank, in (f, h, w) order."""
        f, h, w = grid
        rows = self.rows(h)
        most = max(b - a for a, b in rows)
        mine = x.unflatten(1, (f, -1, w))  # (B, f, rows, w, C)
        padded = torch.cat([mine, mine.new_zeros(*mine.shape[:2], most - mine.shape[2], *mine.shape[3:])], dim=2)
        parts = [torch.empty_like(padded) for _ in range(self.ranks)]
        with collective("gathering the sequence-parallel output"):
            dist.all_gather(parts, padded.contiguous(), group=self.group)
        return torch.cat([p[:, :, :b - a] for p, (a, b) in zip(parts, rows)], dim=2).flatten(1, 3)

    def attend(self, q, k, v, mask=None, text: slice | None = None) -> torch.Tensor:
        """q, k, v (B, N, S, Dh): this rank's video tokens and, at `text` (a slice at the start or the end of S),
        the text tokens every rank holds whole. mask: keys as the whole sequence orders them ([text ; video] or
        [video ; text]; every video key is visible). -> (B, S, N*Dh), as `attend`."""
        S = q.shape[2]
        t0, t1 = (S, S) if text is None else text.indices(S)[:2]
        T, first = t1 - t0, t0 == 0 and t1 > 0  # text tokens, and whether they lead
        if T and not first and t1 != S:
            raise ValueError("the text tokens of a joint attention must lead or trail the sequence")
        joint = self.to_heads([x[:, :, T:] if first else x[:, :, :t0] for x in (q, k, v)])  # (3, B, N/K, L, Dh)
        if T:
            n = q.shape[1] // self.ranks  # my heads of the text tokens: (3, B, N/K, T, Dh)
            words = torch.stack([x[:, self.index * n:(self.index + 1) * n, t0:t1] for x in (q, k, v)])
            joint = torch.cat([words, joint] if first else [joint, words], dim=3)
        out = attend(*joint, mask)  # (B, T+L or L+T, N/K*Dh)
        L = out.shape[1] - T
        out_words, out_video = (out[:, :T], out[:, T:]) if first else (out[:, L:], out[:, :L])
        out_video = self.to_tokens(out_video)  # (B, this rank's tokens, N*Dh)
        if T == 0:
            return out_video
        heads = [torch.empty_like(out_words) for _ in range(self.ranks)]
        with collective("gathering the text tokens' attention heads"):
            dist.all_gather(heads, out_words.contiguous(), group=self.group)
        out_words = torch.cat(heads, dim=-1)  # (B, T, N*Dh)
        return torch.cat([out_words, out_video] if first else [out_video, out_words], dim=1)

    def to_heads(self, qkv: list[torch.Tensor]) -> torch.Tensor:
        """q, k, v (B, N, my tokens, Dh) -> (3, B, N/K, L, Dh), L in (f, h, w) order: all-to-all, heads for
        tokens."""
        (f, _, w), K = self.grid, self.ranks
        counts = [f * (b - a) * w for a, b in self.spans]
        send = torch.stack([x.unflatten(1, (K, -1)).movedim(1, 0) for x in qkv], dim=1)  # (K, 3, B, N/K, mine, Dh)
        per_token = send[0, ..., :1, :].numel()
        received = send.new_empty(per_token * sum(counts))
        with collective("the sequence-parallel all-to-all"):
            dist.all_to_all_single(received, send.flatten(), [per_token * c for c in counts],
                                   [send[0].numel()] * K, group=self.group)
        parts = [p.view(*send.shape[1:4], f, -1, w, send.shape[-1])
                 for p in received.split([per_token * c for c in counts])]
        return torch.cat(parts, dim=4).flatten(3, 5)  # rank r's rows in their place

    def to_tokens(self, out: torch.Tensor) -> torch.Tensor:
        """(B, L, N/K*Dh) in (f, h, w) order -> (B, my tokens, N*Dh): all-to-all back, tokens for heads."""
        f, h, w = self.grid
        a, b = self.spans[self.index]
        mine = f * (b - a) * w
        send = torch.cat([out.unflatten(1, (f, h, w))[:, :, a_r:b_r].flatten() for a_r, b_r in self.spans])
        per_token = out.shape[0] * out.shape[2]
        received = out.new_empty(self.ranks * per_token * mine)
        with collective("the sequence-parallel all-to-all"):
            dist.all_to_all_single(received, send, [per_token * mine] * self.ranks,
                                   [per_token * f * (b_r - a_r) * w for a_r, b_r in self.spans], group=self.group)
        # (K, B, mine, N/K*Dh): rank r's heads in block r -> (B, mine, N*Dh)
        return received.view(self.ranks, out.shape[0], mine, out.shape[2]).movedim(0, 2).flatten(2)


# ----------------------------------------------------------------------------------------------------------------
# Agreement and failure


class collective:
    """Context of a collective call: a failure there becomes a one-line PeerError naming the rank at fault."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if kind is None or not isinstance(error, RuntimeError) or isinstance(error, PeerError):
            return False
        raise PeerError(f"rank {dist.get_rank()} stopped in {self.what}: {cause()}") from None


def cause() -> str:
    """The message a failed rank left in the store, else a generic one."""
    try:
        store = dist.distributed_c10d._get_default_store()
        if store.check([ERROR_KEY]):
            return store.get(ERROR_KEY).decode()
    except Exception:  # the store lived in the process that failed
        pass
    return "another rank failed or did not answer in time (see its own message)"


def together(fn, *args, group=None):
    """Run fn(*args) on every rank of `group` (default: all) and agree: if it raised anywhere, every rank
    raises a ValueError with the first failing rank's message. For input checks before any other collective."""
    if not dist.is_initialized():
        return fn(*args)
    result, error = None, None
    try:
        result = fn(*args)
    except (ValueError, OSError, RuntimeError) as e:
        error = str(e)
    errors = [None] * dist.get_world_size(group)
    with collective("checking the inputs with the other ranks"):
        dist.all_gather_object(errors, error, group=group)
    for index, message in enumerate(errors):
        if message is not None:
            who = dist.get_global_rank(group or dist.group.WORLD, index)
            raise ValueError(message if message == error else f"rank {who}: {message}")
    return result


TALLY = "minialg/tally/"  # store keys of `tally`


def tally(counts: dict, poll_s: float = 0.5) -> dict | None:
    """The sums of every rank's `counts`, on rank 0 (None on the others; `counts` itself on a single process).

    Data-parallel ranks (`batch`) finish at their own pace, so this is no collective, which would time out on a
    rank with more lines: each rank adds its counts to the rendezvous store, rank 0 polls it until every rank
    has. A rank that failed meanwhile (its message in the store, `leave`) ends the wait with a PeerError."""
    if not dist.is_initialized():
        return counts
    store = dist.distributed_c10d._get_default_store()
    for name, value in counts.items():
        store.add(TALLY + name, value)
    store.add(TALLY + "ranks", 1)  # after the counts: a rank counted here has added them all
    if dist.get_rank() != 0:
        return None
    while store.add(TALLY + "ranks", 0) < dist.get_world_size():
        if store.check([ERROR_KEY]):
            raise PeerError(f"rank 0 stopped waiting for the other ranks' counts: {store.get(ERROR_KEY).decode()}")
        time.sleep(poll_s)
    return {name: store.add(TALLY + name, 0) for name in counts}


def leave(ok: bool = True, error: str | None = None, barrier: bool = True) -> None:
    """End this rank's part: on success wait for the others (barrier) and destroy the process group; on failure
    leave `error` in the store for the others' messages and abort at once (waiting could hang)."""
    if not dist.is_initialized():
        return
    if ok:
        try:
            if barrier:
                with collective("the final barrier"):
                    dist.barrier()
        finally:
            dist.destroy_process_group()
        return
    if error is not None:
        try:
            dist.distributed_c10d._get_default_store().set(ERROR_KEY, f"rank {dist.get_rank()} failed: {error}")
        except Exception:
            pass
    dist.distributed_c10d._abort_process_group()
