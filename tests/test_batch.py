"""Issue 9: `python cli.py batch MANIFEST.jsonl --output_dir D`: one video per line, named by id and written
atomically; a failing line is logged to D/failures.jsonl and the batch goes on; a second run skips what is done.
The exit status says whether every line was made (0) or some failed (3); without --config the folder's own
variant's preset runs; HunyuanVideo's size buckets follow each line's image as in `python cli.py`; `--dry_run`
checks everything and loads no weights. (Lines shared out over torchrun ranks: tests/test_parallel.py.)"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import minialg
from minialg import checkpoint, media, parallel
from minialg.demo import demo_image, write_tiny

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("cli", ROOT / "cli.py")
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("batch") / "wan", "wan")


@pytest.fixture
def folder(tmp_path) -> Path:
    from PIL import Image

    Image.fromarray(demo_image().numpy()).save(tmp_path / "in.png")
    return tmp_path


def manifest(folder: Path, lines: list) -> Path:
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def argv(tiny, path, out) -> list[str]:
    return ["batch", str(path), "--output_dir", str(out), "--model", str(tiny), "--device", "cpu", "--dtype",
            "float32", "--height", "32", "--width", "48", "--num_frames", "5", "--num_inference_steps", "2"]


@pytest.fixture
def calls(monkeypatch) -> list:
    """The seeds and sizes of every pipeline call, and the files written (by media.write_video)."""
    record, call, write = [], minialg.Pipeline.__call__, media.write_video

    def counting_call(self, image, prompt, **kw):
        record.append(("call", prompt, kw["seed"], kw.get("num_inference_steps")))
        return call(self, image, prompt, **kw)

    def counting_write(frames, path, **kw):
        record.append(("write", Path(path).name))
        return write(frames, path, **kw)

    monkeypatch.setattr(minialg.Pipeline, "__call__", counting_call)
    monkeypatch.setattr(media, "write_video", counting_write)
    return record


def test_each_line_is_a_video_and_bad_lines_are_logged(tiny, folder, calls, capsys):
    path = manifest(folder, [
        {"id": "a", "image": "in.png", "prompt": "a ball"},
        {"id": "b", "image": str(folder / "in.png"), "prompt": "a cat", "seed": 5, "negative_prompt": "blur",
         "overrides": {"num_inference_steps": 3}},
        "{not json",
        {"id": "c", "image": "missing.png", "prompt": "a dog"},
        {"id": "a", "image": "in.png", "prompt": "again"},
        {"id": "d", "image": "in.png", "prompt": "a bird", "overrides": {"height": 30}},
        {"id": "../e", "image": "in.png", "prompt": "a fish"},
        "",
        {"id": "f", "image": "in.png", "prompt": "a fox", "overrides": {"steps": 3}},
    ])
    out = folder / "out"
    assert cli.main(argv(tiny, path, out)) == cli.LINES_FAILED == 3  # a script can tell that some lines failed
    assert sorted(p.name for p in out.iterdir()) == ["a.mp4", "b.mp4", "failures.jsonl"]
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [(f["line"], f["id"]) for f in failures] == [(3, None), (5, None), (7, None), (9, None), (4, "c"), (6, "d")]
    messages = [f["error"] for f in failures]
    assert messages[0].startswith("not JSON") and "already on line 1" in messages[1]
    assert "not a plain file name" in messages[2] and "unknown key 'steps'" in messages[3]
    assert "missing.png" in messages[4] and "height must be a positive multiple of 16" in messages[5]
    assert [c for c in calls if c[0] == "call"][:2] == [("call", "a ball", 42, 2), ("call", "a cat", 5, 3)]
    assert capsys.readouterr().out.strip().splitlines()[-1] == (f"batch: 2 written, 0 already there, 6 failed "
                                                                f"(see {out / 'failures.jsonl'}); exit status 3")


def test_an_interrupted_batch_resumes_and_writes_each_video_once(tiny, folder, calls, monkeypatch, capsys):
    path = manifest(folder, [{"id": name, "image": "in.png", "prompt": f"a {name}"} for name in ("x", "y", "z")])
    out = folder / "out"
    call = minialg.Pipeline.__call__

    def interrupt_the_second(self, image, prompt, **kw):
        if prompt == "a y":
            raise KeyboardInterrupt
        return call(self, image, prompt, **kw)

    monkeypatch.setattr(minialg.Pipeline, "__call__", interrupt_the_second)
    assert cli.main(argv(tiny, path, out)) == 130
    assert sorted(p.name for p in out.iterdir()) == ["x.mp4"]  # whole videos only, no temporary file
    monkeypatch.setattr(minialg.Pipeline, "__call__", call)
    capsys.readouterr()
    assert cli.main(argv(tiny, path, out)) == 0
    assert capsys.readouterr().out.strip().endswith("batch: 2 written, 1 already there, 0 failed")
    assert sorted(p.name for p in out.iterdir()) == ["x.mp4", "y.mp4", "z.mp4"]
    assert sorted(c[1] for c in calls if c[0] == "write") == ["x.mp4", "y.mp4", "z.mp4"]  # each written once


def test_batch_needs_a_model_and_a_readable_manifest(tiny, folder, capsys):
    assert cli.main(["batch", str(folder / "m.jsonl"), "--output_dir", str(folder / "o")]) == 1
    assert capsys.readouterr().err == "error: batch needs --config or --model\n"
    assert cli.main(argv(tiny, folder / "m.jsonl", folder / "o")) == 1
    assert capsys.readouterr().err.startswith("error: cannot read the manifest")
    assert not (folder / "o").exists()


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to load a model or read its tensors fails the test."""
    refuse = lambda *a, **k: pytest.fail("weights were loaded")  # noqa: E731
    monkeypatch.setattr(minialg, "load", refuse)
    monkeypatch.setattr(checkpoint, "load", refuse)


def test_dry_run_checks_every_line_and_loads_no_weights(tiny, folder, no_weights, capsys):
    (folder / "bad.png").write_bytes(b"not an image")
    path = manifest(folder, [
        {"id": "a", "image": "in.png", "prompt": "a ball"},
        {"id": "b", "image": "in.png", "prompt": "a cat", "seed": 5, "overrides": {"num_inference_steps": 3}},
        "{not json",
        {"id": "c", "image": "missing.png", "prompt": "a dog"},
        {"id": "d", "image": "bad.png", "prompt": "a bird"},
        {"id": "a", "image": "in.png", "prompt": "again"},
        {"id": "e", "image": "in.png", "prompt": "a fish", "overrides": {"height": 30}},
        {"id": "f", "image": "in.png", "prompt": "a fox", "overrides": {"guidance_scale_2": 3.0}},  # Wan 2.2 only
        {"id": "g", "image": "in.png", "prompt": "a goat"},
    ])
    out = folder / "out"
    out.mkdir()
    (out / "g.mp4").write_bytes(b"")  # made by an earlier run
    assert cli.main(argv(tiny, path, out) + ["--dry_run"]) == 3
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[:2] == [f"a: 48x32, 5 frames, 2 steps, seed 42 -> {out / 'a.mp4'}",
                         f"b: 48x32, 5 frames, 3 steps, seed 5 -> {out / 'b.mp4'}"]
    assert lines[2].startswith("line 3: fails: not JSON")
    assert lines[3].startswith("line 4 (c): fails: cannot load image") and "missing.png" in lines[3]
    assert lines[4].startswith("line 5 (d): fails: cannot load image") and "not a decodable image" in lines[4]
    assert lines[5] == "line 6: fails: id 'a' is already on line 1"
    assert lines[6] == "line 7 (e): fails: height must be a positive multiple of 16, got 30"
    assert lines[7].startswith("line 8 (f): fails: guidance_scale_2 is for checkpoints with two experts")
    assert lines[8] == f"g: already there ({out / 'g.mp4'})"
    assert lines[9] == (f"dry run of {tiny} with wan_alg: 2 would run, 1 already there, 6 would fail; exit status 3 "
                        "(no weights loaded, nothing written)")
    assert sorted(p.name for p in out.iterdir()) == ["g.mp4"]  # no video, no failures.jsonl

    good = manifest(folder, [{"id": "a", "image": "in.png", "prompt": "a ball"}])
    assert cli.main(argv(tiny, good, folder / "new") + ["--dry_run"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(
        "1 would run, 0 already there, 0 would fail (no weights loaded, nothing written)")
    assert not (folder / "new").exists()


def test_dry_run_checks_the_checkpoint_from_its_headers(tiny, folder, no_weights, tmp_path, capsys):
    import shutil

    broken = shutil.copytree(tiny, tmp_path / "broken")
    with open(broken / "transformer" / "diffusion_pytorch_model.safetensors", "r+b") as f:
        f.truncate(100)
    path = manifest(folder, [{"id": "a", "image": "in.png", "prompt": "a ball"}])
    assert cli.main(argv(broken, path, folder / "out") + ["--dry_run"]) == 1
    assert capsys.readouterr().err.startswith(f"error: {broken}/transformer/diffusion_pytorch_model.safetensors: "
                                              "not a safetensors file or truncated")


VARIANTS = {  # write_tiny family -> its ALG preset, and what that preset asks for (size, frames, steps)
    "wan": ("wan_alg", "832x480, 81 frames, 50 steps"),
    "wan22": ("wan22_alg", "1280x720, 81 frames, 40 steps"),
    "wan22_ti2v": ("wan22_ti2v_alg", "1280x704, 121 frames, 50 steps"),
}


@pytest.mark.parametrize("family", list(VARIANTS))
def test_without_config_the_folders_own_variant_runs(family, folder, tmp_path, no_weights, monkeypatch, capsys):
    model = write_tiny(tmp_path / family, family)
    loaded, load_config = [], cli.load_config
    monkeypatch.setattr(cli, "load_config", lambda name: loaded.append(name) or load_config(name))
    path = manifest(folder, [{"id": "a", "image": "in.png", "prompt": "a ball"}])
    assert cli.main(["batch", str(path), "--output_dir", str(folder / "out"), "--model", str(model), "--dry_run"]) == 0
    preset, plan = VARIANTS[family]
    assert loaded == [preset]
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"a: {plan}, seed 42") and f" with {preset}: 1 would run" in lines[-1]


class Recorder:
    """A pipeline stand-in for `batch`: records each call's size and returns a small video, computing nothing."""
    layout = parallel.Layout()

    def __init__(self):
        self.sizes = {}

    def __call__(self, image, prompt, **kw):
        self.sizes[prompt] = (kw.get("height"), kw.get("width"))
        return torch.zeros(1, 16, 16, 3)


@pytest.mark.parametrize("flags", [[], ["--width", "128"]])
def test_hunyuan_buckets_follow_each_lines_image_as_in_a_single_run(flags, tmp_path, monkeypatch, capsys):
    from PIL import Image

    model = write_tiny(tmp_path / "hunyuan", "hunyuan_video")
    images = {"wide": demo_image(40, 56), "tall": demo_image(56, 40), "square": demo_image(48, 48)}
    for name, pixels in images.items():
        Image.fromarray(pixels.numpy()).save(tmp_path / f"{name}.png")
    lines = [{"id": name, "image": f"{name}.png", "prompt": name} for name in images]
    lines.append({"id": "own", "image": "wide.png", "prompt": "own", "overrides": {"height": 64, "width": 96}})
    path = manifest(tmp_path, lines)
    common = ["--config", "hunyuan_video_alg", "--model", str(model), *flags]

    expected = {}  # what `python cli.py --image_path ...` would run each image at
    for name in images:
        args = cli.top_parser().parse_args([*common, "--image_path", str(tmp_path / f"{name}.png"), "--prompt", name,
                                            "--output_path", "x.mp4"])
        generation = cli.run_settings(args)[3]
        expected[name] = (generation["height"], generation["width"])
    expected["own"] = (64, 96)  # a line's own size wins over the bucket and the flags
    buckets = {"wide": (416, 544), "tall": (544, 416), "square": (480, 480)}  # minialg.config.bucket_size, 360p
    width = 128 if flags else None
    assert expected == {**{n: (h, width or w) for n, (h, w) in buckets.items()}, "own": (64, 96)}

    out = tmp_path / "out"
    assert cli.main(["batch", str(path), "--output_dir", str(out), *common, "--dry_run"]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in plan[:4]] == [f"{n}: {w}x{h}" for n, (h, w) in expected.items()]
    pipe = Recorder()
    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pipe)
    assert cli.main(["batch", str(path), "--output_dir", str(out), *common]) == 0
    assert pipe.sizes == expected
