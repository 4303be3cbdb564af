"""Execute the notebooks end to end (real SmolLM2, real text, CPU); any cell error fails.

The kernel is this interpreter: jupyter_client replaces a kernelspec's leading
`python` with `sys.executable`, and a spec is written into a temporary
JUPYTER_PATH so a fresh clone needs nothing registered beforehand.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory, monkeypatch_module):
    spec_dir = tmp_path_factory.mktemp("jupyter") / "kernels" / "cacheblend-venv"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "cacheblend (venv)", "language": "python"}))
    monkeypatch_module.setenv("JUPYTER_PATH", str(spec_dir.parent.parent))
    return "cacheblend-venv"


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deviation.ipynb", "tuning.ipynb"])
def test_notebook_executes(name, kernel_name, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    figs = tmp_path / "figures"  # not notebooks/figures: a test run leaves the tree clean
    monkeypatch.setenv("CACHEBLEND_FIGURES", str(figs))

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    start = time.time()
    NotebookClient(nb, timeout=900, kernel_name=kernel_name,
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    saved = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
             if o.get("output_type") == "error"]
    assert not saved  # execute() raises on an error; this guards allow_errors drift
    figures = {p.name for p in figs.glob("*.png") if p.stat().st_mtime >= start - 1}
    sources = "\n".join(c.source for c in nb.cells)
    for png in [s.split('"')[1] for s in sources.split("FIGS / ")[1:]]:
        assert png in figures, f"{name} did not save {png}"


@pytest.mark.parametrize("name", ["deviation.ipynb", "tuning.ipynb"])
def test_committed_notebook_has_outputs(name):
    """The repo's copy is the executed one: every figure it saves is shown, as an image/png output.

    Cheap (reads JSON only) and not marked slow: a notebook committed without its outputs
    fails here even where the slow execution test is deselected.
    """
    nb = json.loads((NOTEBOOKS / name).read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    unrun = [i for i, c in enumerate(code) if c.get("execution_count") is None]
    assert not unrun, f"{name}: code cells {unrun} were never executed"
    pngs = sum("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", []))
    saved = sum("".join(c["source"]).count("FIGS / ") for c in code)
    assert saved and pngs >= saved, f"{name}: {pngs} image/png outputs for {saved} saved figures"
