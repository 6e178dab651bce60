"""The README's quickstart runs as written, and the README names the commands CI relies on."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quickstart_runs_as_written(capsys):
    quickstart = [block for block in python_blocks() if "import torch" in block]
    assert quickstart, "README has no runnable quickstart block"
    exec(compile(quickstart[0], "README quickstart", "exec"), {})
    printed = capsys.readouterr().out
    assert "torch.Size([3, 32, 32])" in printed


def test_readme_gives_install_test_and_main_commands():
    text = README.read_text()
    assert "pip install" in text
    assert "python -m pytest" in text
    assert "mpsdata build fashion-mnist" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python -m pytest" in ci
