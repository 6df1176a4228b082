"""The README's quickstart runs as written, MoE's docstring shows the same code, and help(MoE)
shows the real constructor arguments."""

from __future__ import annotations

import inspect
import pydoc
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import sonic_learn

ROOT = Path(__file__).resolve().parents[1]


def _readme_quickstart() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Quickstart\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert section, "README has no '## Quickstart' section"
    blocks = re.findall(r"^```python\n(.*?)^```", section.group(1), flags=re.S | re.M)
    assert len(blocks) == 1, "the quickstart is one python block"
    return blocks[0]


def _docstring_quickstart() -> str:
    doc = sonic_learn.MoE.__doc__
    body = doc[doc.index("Quickstart"):doc.index("Args:")].split("::", 1)[1]
    return textwrap.dedent(body).strip() + "\n"


def test_readme_quickstart_runs_and_takes_a_step(tmp_path):
    code = _readme_quickstart()
    assert len(code.strip().splitlines()) <= 6
    # run it as a user would (a fresh interpreter, this checkout first on the path), then check the step
    probe = code + "print('W1_CHANGED', bool((moe.w1.grad is None) and opt.state))\n"
    script = tmp_path / "quickstart.py"
    script.write_text(probe, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    counts, changed = done.stdout.strip().splitlines()[-2:]
    assert sum(eval(counts)) == 4 * 16 * 2  # every token's K=2 pairs, counted once
    assert changed == "W1_CHANGED True"


def test_docstring_shows_the_readme_quickstart():
    assert _docstring_quickstart() == _readme_quickstart()


def test_help_shows_the_real_arguments():
    params = inspect.signature(sonic_learn.MoE.__init__).parameters
    assert not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values())
    for name in ("d_model", "d_expert", "num_experts", "top_k", "routing", "tile_m", "backward", "backend",
                 "scoring", "normalize", "device", "dtype"):
        assert name in params, name
    page = pydoc.render_doc(sonic_learn.MoE, renderer=pydoc.plaintext)
    assert "device: where the parameters are created" in " ".join(page.split())
    assert re.search(r"d_model: '?int'?", page) and re.search(r"dtype: '?torch.dtype \| None'? = None", page)
    assert "Create the parameters on ``device``" in page  # __init__'s own docstring, not nn.Module's
