"""notebooks/precision_alignment.ipynb runs top to bottom (nbclient, a fresh Python kernel), draws
its figures, and finds the hardware golden bit-exact with the emulator (error exactly 0) while
the fp32 golden drifts. The notebook is stored without outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "precision_alignment.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_precision_alignment_notebook_executes(monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO / "notebooks")}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= 2  # error per stage, error per layer
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    line = next(ln for ln in text.splitlines() if ln.startswith("SUMMARY "))
    summary = json.loads(line[len("SUMMARY "):])
    assert summary["layers"] >= 2
    assert summary["hw_bit_exact_pct"] == 100.0 and summary["hw_max_abs"] == 0.0
    assert summary["hw_first_divergence"] is None
    fin = summary["fp32_final"]
    assert 0 < fin["mae"] <= fin["max_abs"] and 0 < fin["rel_l2"] < 0.2
    assert "emulator vs hardware golden" in text and "emulator vs fp32 golden" in text
