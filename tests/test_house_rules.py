"""What the design card promises about the runtime: no diffusers, transformers, Pillow, torchvision or OpenCV."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"diffusers", "transformers", "PIL", "torchvision", "cv2", "imageio"}


def test_runtime_code_imports_no_reference_library():
    for file in [ROOT / "cli.py", *sorted((ROOT / "minialg").rglob("*.py"))]:
        for node in ast.walk(ast.parse(file.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            imported = {name.split(".")[0] for name in names} & FORBIDDEN
            # the benchmark's --compare-diffusers imports diffusers on purpose, inside that option only (bench.py,
            # and bench_models.py, which builds diffusers' transformers)
            if imported and not (file.name in ("bench.py", "bench_models.py") and imported <= {"diffusers", "PIL"}):
                raise AssertionError(f"{file.relative_to(ROOT)} imports {imported}")


def test_a_whole_run_loads_none_of_them(tmp_path):
    code = f"""
import sys, torch, minialg
from minialg.demo import write_tiny, demo_image
for family in ("wan", "cogvideox"):
    pipe = minialg.load(write_tiny({str(tmp_path)!r} + "/" + family, family), device="cpu", dtype=torch.float32)
    pipe(demo_image(), "a ball", num_frames=5, height=64, width=96, num_inference_steps=1, progress=False)
print(sorted(m for m in {sorted(FORBIDDEN)!r} if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_no_file_over_500_lines():
    long = {str(f.relative_to(ROOT)): n for f in [ROOT / "cli.py", *sorted((ROOT / "minialg").rglob("*.py"))]
            if (n := len(f.read_text().splitlines())) > 500}
    assert not long, f"files over 500 lines: {long}"
