"""Many videos from one manifest: `python cli.py batch MANIFEST.jsonl --output_dir D [--config C] [run flags]`.

The manifest holds one JSON object per line:

    {"id": "cat-01", "image": "cat.png", "prompt": "a cat jumps", "seed": 7, "negative_prompt": "...",
     "overrides": {"num_inference_steps": 30, "guidance_scale": 4.0}}

`id`, `image` (relative paths are relative to the manifest's folder) and `prompt` are required; `seed`,
`negative_prompt` and `overrides` (generation settings, as the config's `generation:` section) replace the run's
for that line. Each video is written atomically to D/<id>.mp4 (media.write_video renames a finished file into
place), so an interrupted batch leaves only whole videos and a second run skips every id whose video exists.
A line that fails (not JSON, a missing field, an unreadable image, a bad override, an error while generating)
is appended to D/failures.jsonl and the batch goes on; a later run tries it again. A line's size is the run's
(config, then command line), its overrides over it; with a HunyuanVideo `video.resolution` it is the bucket of
the line's own image, as `python cli.py` would pick it (config.sized), unless the command line or the line sets it.

Exit status (cli.py): 0 when every line was written or already there; 3 when any line failed (the last line says
so); 1 for an error before any video (bad arguments, config, manifest file or checkpoint). `--dry_run` (`plan`)
reads every image and checks every line's settings as the run would, and the checkpoint from its headers, then
prints one line per video without loading weights or writing anything: 0 when every line would run, 3 if not.

Under torchrun the sequence groups (minialg.parallel; every rank when sequence_parallel is 1) share the lines out:
group g takes the manifest's valid lines g, g + G, g + 2G, ... and its first rank writes them. Each rank prints
its own counts; rank 0 then waits for every rank's (parallel.tally) and exits with the whole batch's status, the
others with 0 (torchrun stops every rank when one exits non-zero, so none may while others still work).
"""

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from . import media, parallel
from .config import parse_config, sized

ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")  # a plain file name
FIELDS = ("id", "image", "prompt", "seed", "negative_prompt", "overrides")


@dataclass
class Item:
    line: int  # 1-based line number in the manifest
    id: str
    image: Path
    prompt: str
    seed: int | None = None
    negative_prompt: str | None = None
    overrides: dict = field(default_factory=dict)


def read_manifest(path: "str | Path") -> tuple[list[Item], list[dict]]:
    """The manifest's valid lines as Items, and a failure record for each invalid one (blank lines are skipped)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the manifest {path}: {e}") from None
    items, failures, seen = [], [], {}
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            item = parse_line(text, number, path.parent)
            if item.id in seen:
                raise ValueError(f"id '{item.id}' is already on line {seen[item.id]}")
            seen[item.id] = number
            items.append(item)
        except ValueError as e:
            failures.append(failure(number, None, e))
    return items, failures


def parse_line(text: str, number: int, folder: Path) -> Item:
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(entry, dict):
        raise ValueError("a line must be a JSON object")
    unknown = sorted(set(entry) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field '{unknown[0]}' (fields: {', '.join(FIELDS)})")
    for name in ("id", "image", "prompt"):
        if not isinstance(entry.get(name), str) or not entry[name]:
            raise ValueError(f"'{name}' must be a non-empty string")
    if not ID.fullmatch(entry["id"]):
        raise ValueError(f"id '{entry['id']}' is not a plain file name (letters, digits, '.', '_', '-')")
    seed = entry.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    negative = entry.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise ValueError(f"negative_prompt must be a string, got {negative!r}")
    overrides = entry.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ValueError(f"overrides must be an object, got {overrides!r}")
    for name in ("seed", "negative_prompt"):
        if name in overrides:
            raise ValueError(f"'{name}' belongs at the top of the line, not in overrides")
    overrides = parse_config({"generation": overrides}, "overrides").generation  # names and types checked
    image = Path(entry["image"]).expanduser()
    return Item(number, entry["id"], image if image.is_absolute() else folder / image, entry["prompt"], seed,
                negative, overrides)


def failure(line: int, id: str | None, error: BaseException) -> dict:
    return {"id": id, "line": line, "error": str(error) or type(error).__name__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def log_failure(output_dir: Path, record: dict) -> None:
    """Append one record to failures.jsonl (one write of one line: ranks may append at the same time)."""
    with open(output_dir / "failures.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def line_settings(item: Item, pixels, generation: dict, seed: int, resolution: str | None = None,
                  fixed=()) -> tuple[dict, int]:
    """A line's pipeline keywords and seed: the run's `generation`, the line's overrides and negative prompt over
    them, the size bucket of its image (`resolution`) where neither the line nor the command line (`fixed`: the
    keys set by flags) names a size."""
    settings = dict(generation, **item.overrides)
    if item.negative_prompt is not None:
        settings["negative_prompt"] = item.negative_prompt
    settings = sized(resolution, settings, pixels, keep={*fixed, *item.overrides})
    return settings, seed if item.seed is None else item.seed


def run(pipe, items: list[Item], output_dir: Path, *, generation: dict, seed: int, alg, fps: float,
        extension: str = ".mp4", status=None, resolution: str | None = None, fixed=()) -> dict:
    """Generate this rank's share of `items` into output_dir, skipping those already there; returns counts.

    `generation` holds the run's pipeline keywords (the lines' overrides go over them), `seed` the default seed,
    `resolution` and `fixed` size each line's image (line_settings). A PeerError (another rank of this sequence
    group stopped) ends the batch; any other error fails the line."""
    layout = pipe.layout
    mine = items[layout.group::layout.groups] if layout.data else items
    counts = {"written": 0, "done": 0, "failed": 0}
    bar = tqdm(mine, desc="batch", unit="video", disable=layout.rank != 0, dynamic_ncols=True)
    for item in bar:
        target = output_dir / f"{item.id}{extension}"
        if target.exists():
            counts["done"] += 1
            continue
        if status is not None:
            status.run = item.id
        try:
            pixels = parallel.together(media.load_image, item.image, group=layout.sequence_group) \
                if layout.sequence > 1 else media.load_image(item.image)  # a group agrees before it computes
            settings, line_seed = line_settings(item, pixels, generation, seed, resolution, fixed)
            frames = pipe(pixels, item.prompt, seed=line_seed, alg=alg, progress=False, **settings)
            if layout.writes:
                media.write_video(frames, target, fps=fps)
                if status is not None:
                    status.written.append(str(target))
            counts["written"] += 1
        except parallel.PeerError:
            raise
        except (ValueError, TypeError, OSError, RuntimeError) as e:
            counts["failed"] += 1
            if layout.writes:
                log_failure(output_dir, failure(item.line, item.id, e))
        bar.set_postfix(failed=counts["failed"], refresh=False)
    return counts


def plan(items: list[Item], bad: list[dict], output_dir: Path, *, generation: dict, seed: int, check,
         extension: str = ".mp4", resolution: str | None = None, fixed=()) -> tuple[list[str], dict]:
    """What `run` would do, without a model: each line's image read and its settings checked by `check`
    (settings -> the settled run, raising as the run would). Returns one line of text per manifest line, in the
    manifest's order, and the counts (would run, already there, failing); `bad`: read_manifest's failures."""
    rows = [(record["line"], f"line {record['line']}: fails: {record['error']}") for record in bad]
    counts = {"run": 0, "done": 0, "failed": len(bad)}
    for item in items:
        target = output_dir / f"{item.id}{extension}"
        if target.exists():
            counts["done"] += 1
            rows.append((item.line, f"{item.id}: already there ({target})"))
            continue
        try:
            settings, line_seed = line_settings(item, media.load_image(item.image), generation, seed, resolution,
                                                fixed)
            settled = check(settings)
        except (ValueError, TypeError, OSError, RuntimeError) as e:
            counts["failed"] += 1
            rows.append((item.line, f"line {item.line} ({item.id}): fails: {e}"))
            continue
        counts["run"] += 1
        steps = settings.get("num_inference_steps", 50)  # the pipeline's default
        rows.append((item.line, f"{item.id}: {settled['width']}x{settled['height']}, {settled['num_frames']} "
                                f"frames, {steps} steps, seed {line_seed} -> {target}"))
    return [text for _, text in sorted(rows, key=lambda row: row[0])], counts
