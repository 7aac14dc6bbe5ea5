"""Issue 9: `python cli.py batch MANIFEST.jsonl --output_dir D`: one video per line, named by id and written
atomically; a failing line is logged to D/failures.jsonl and the batch goes on; a second run skips what is done.
(Lines shared out over torchrun ranks: tests/test_parallel.py.)"""

import importlib.util
import json
from pathlib import Path

import pytest

import minialg
from minialg import media
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
    assert cli.main(argv(tiny, path, out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.mp4", "b.mp4", "failures.jsonl"]
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [(f["line"], f["id"]) for f in failures] == [(3, None), (5, None), (7, None), (9, None), (4, "c"), (6, "d")]
    messages = [f["error"] for f in failures]
    assert messages[0].startswith("not JSON") and "already on line 1" in messages[1]
    assert "not a plain file name" in messages[2] and "unknown key 'steps'" in messages[3]
    assert "missing.png" in messages[4] and "height must be a positive multiple of 16" in messages[5]
    assert [c for c in calls if c[0] == "call"][:2] == [("call", "a ball", 42, 2), ("call", "a cat", 5, 3)]
    assert capsys.readouterr().out.strip().endswith(f"batch: 2 written, 0 already there, 6 failed "
                                                    f"(see {out / 'failures.jsonl'})")


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
