"""The control-flow claims of docs/reading-cute-dsl.md, checked on the generated IR (CPU, sm_90a).

``tutorials/cute_control_flow.py`` compiles one tiny kernel twice and asserts that ``range`` and a
plain ``if`` become ``scf.for`` / ``scf.if`` in the traced kernel while ``cutlass.range_constexpr``
and ``cutlass.const_expr`` leave four unrolled loads and no branch. It must run in its own process:
the IR dump is switched on by environment variables read when ``cutlass`` is first imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sonic_learn.fast._cute import cutlass_available  # noqa: E402  (never import cutlass unpinned here)

_ok, _why = cutlass_available()
if not _ok:
    pytest.skip(_why, allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tutorials" / "cute_control_flow.py"

pytestmark = pytest.mark.compile


def test_range_and_if_become_kernel_control_flow_unless_marked_for_trace_time() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("CUTE_DSL_ARCH", None)  # the script pins sm_90a itself, through import_cutlass
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "--- dynamic: {'scf.for': 1, 'scf.if': 1, 'cute.memref.load': 1}" in out
    assert "--- trace_time: {'scf.for': 0, 'scf.if': 0, 'cute.memref.load': 4}" in out
    # The page shows this output: keep it in step with what the script prints.
    page = (REPO / "docs" / "reading-cute-dsl.md").read_text()
    for line in out.splitlines():
        if line.startswith("---") or line.startswith("    %"):
            assert line.rstrip() in page, f"docs/reading-cute-dsl.md no longer shows: {line!r}"
