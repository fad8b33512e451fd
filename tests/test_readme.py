"""The README's commands run as written, so the documentation cannot rot. The install steps run in CI (the test
command is the README's); here the generation commands run against the installed package."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tritonsd import loader

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
ROOT = Path(__file__).resolve().parent.parent


def block(tag: str) -> str:
    match = re.search(rf"<!-- run: {tag} -->\n```[a-z]*\n(.*?)```", README, re.S)
    assert match, f"README has no block tagged {tag!r}"
    return match.group(1)


needs_demo = pytest.mark.skipif(not loader.DEMO_MODEL.is_file(), reason="the demo model is not installed")


@needs_demo
def test_quickstart_command_draws_the_image(tmp_path):
    install, generate = block("quickstart").strip().split(" && ")
    assert install.startswith("python -m pip install")
    argv = shlex.split(generate)
    assert argv[0] == "tritonsd"
    done = subprocess.run([sys.executable, "-m", "tritonsd.cli", *argv[1:]], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert done.returncode == 0, f"quickstart failed: {done.stderr}"
    output = tmp_path / argv[argv.index("-o") + 1]
    assert Image.open(output).size[0] > 0


@needs_demo
def test_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(block("python"), "README.md", "exec"), {})
    assert (tmp_path / "square.png").is_file()


@needs_demo
def test_lora_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(block("lora"), "README.md", "exec"), {})
    assert (tmp_path / "noise.safetensors").is_file()


@needs_demo
def test_prompts_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block("prompts"), "README.md", "exec"), scope)
    assert (tmp_path / "redcircle.png").is_file() and scope["name"] == "redcircle"
    assert tuple(scope["context"].shape[:2]) == (2, 154), scope["context"].shape
