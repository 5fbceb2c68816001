"""locllm_cpp's bad-input behaviour: one line on stderr, exit status 2, never a crash.

Run by ctest: python cli_errors.py PATH_TO_locllm_cpp (LOCLLM_TEST_ENGINE: the demo engine).
"""

import os
import subprocess
import sys
import tempfile

cli = sys.argv[1]
engine = os.environ.get("LOCLLM_TEST_ENGINE", "")
data = os.environ.get("LOCLLM_TEST_DATA", "")
image = os.path.join(data, "astronaut.jpg")
failures = []


def expect(args, code, needle):
    p = subprocess.run([cli, *args], capture_output=True, text=True, timeout=300)
    lines = p.stderr.strip().splitlines()
    ok = p.returncode == code and len(lines) == 1 and needle in lines[0]
    print(("ok   " if ok else "FAIL ") + " ".join(args[:4]) + f" -> {p.returncode}: {p.stderr.strip()}")
    if not ok:
        failures.append(args)


with tempfile.TemporaryDirectory() as tmp:
    cut = os.path.join(tmp, "cut.jpg")
    with open(image, "rb") as f, open(cut, "wb") as g:
        g.write(f.read()[:5000])
    expect(["locate"], 2, "needs an IMAGE")
    expect(["detect", image], 2, "unknown command")
    expect(["locate", image, "--frobnicate"], 2, "unknown option")
    expect(["locate", image], 2, "needs -m ENGINE_DIR")
    expect(["locate", image, "-m", engine or tmp, "--box", "1,2,3"], 2, "x,y,w,h")
    expect(["locate", os.path.join(tmp, "absent.jpg"), "-m", tmp], 2, "ImageError")
    expect(["locate", cut, "-m", tmp], 2, "damaged JPEG")
    expect(["locate", image, "-m", tmp], 2, "EngineError")
    if engine:
        expect(["locate", image, "-m", engine, "-k", "tail"], 2, "UnknownKeypointError")
        expect(["locate", image, "-m", engine, "-k", "neck", "--box", "0,0,1,1"], 2, "BoxError")
        expect(["locate", image, "-m", engine, "--skeleton", "octopus"], 2, "unknown skeleton")
    else:
        print("skipped the engine cases: LOCLLM_TEST_ENGINE is not set")
sys.exit(1 if failures else 0)
