"""README "Train on your own data": the three commands, read from the README, on a folder this test generates."""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parent.parent
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 40)}
# Test-only additions to the train command: a short run (the README's default is 1,000 steps).
SHORT_RUN = ["--config.train.steps=30", "--config.evals.retrieval.every_steps=30", "--config.train.log_every=10",
             "--config.train.batch_size=32", "--config.evals.retrieval.batch_size=8"]


def readme_commands() -> list[list[str]]:
    """The `python -m ...` lines of the README's "Train on your own data" section, split into argv lists."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Train on your own data", 1)[1].split("\n## ", 1)[0]
    section = section.split("### ", 1)[0]
    lines = [line.strip() for line in section.splitlines() if re.match(r"^ {4}python -m ", line)]
    return [shlex.split(line) for line in lines]


def make_folder(root: pathlib.Path, n: int = 40) -> None:
    """my_data/images/<colour>/NN.png (a coloured square on grey, nested folders) and my_data/captions.jsonl."""
    # 40 images: the README's 5% holdout is 2, so R@1 means something (24 would hold out 1, whose R@1 is dropped).
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        img = np.full((40, 56, 3), 128, np.uint8)
        y, x = rng.integers(0, 20), rng.integers(0, 36)
        img[y: y + 20, x: x + 20] = COLOURS[colour]
        path = root / "my_data" / "images" / colour / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
        rows += [{"image": f"{colour}/{i:02d}.png", "caption": f"a {colour} square on grey"},
                 {"image": f"{colour}/{i:02d}.png", "caption": f"grey picture with a {colour} box  "}]
    (root / "my_data" / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_readme_walkthrough(tmp_path):
    commands = readme_commands()
    assert [c[2] for c in commands] == ["mmjax.data.build", "mmjax.train", "mmjax.evaluate"], commands
    make_folder(tmp_path)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
    outputs = []
    for argv in commands:
        argv = [sys.executable] + argv[1:]
        # Paths in the README are relative to the repository root; the data and runs live in tmp_path here.
        argv = [a.replace("configs/", f"{REPO}/configs/") for a in argv]
        if "mmjax.train" in argv:
            argv += SHORT_RUN
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{' '.join(argv)}\n{result.stderr[-3000:]}"
        outputs.append(result.stdout)

    assert "prepared dataset:" in outputs[0] and "train: 38 examples" in outputs[0] and "validation: 2" in outputs[0]
    assert "warning: validation split has 2 images: retrieval metrics on it mean little" in outputs[0]
    run = tmp_path / "runs" / "my_clip"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(train_losses) == 3 and all(np.isfinite(train_losses))
    final_eval = [r for r in records if r["kind"] == "eval"][-1]
    evaluated = json.loads(outputs[2].strip().splitlines()[-1])
    assert evaluated["retrieval/num_images"] == final_eval["retrieval/num_images"] >= 1
    np.testing.assert_allclose(evaluated["retrieval/i2t_r@1"], final_eval["retrieval/i2t_r@1"], atol=1e-6)
    assert "retrieval/i2t_r@5" not in evaluated  # 2 candidates: R@5 would always be 1.0
    table = outputs[2].split("| evaluator | metric | value |", 1)[1]
    assert "| retrieval | num_images | 2 |" in table  # a count, printed as one
    assert json.loads((run / "eval.json").read_text()) == evaluated
