"""notebooks/quickstart.ipynb: stored without outputs, and it runs top to bottom (reduced size) with nbclient.

The kernel is "python3": ipykernel's own kernel spec, which jupyter_client finds even when no
kernel spec is installed, and which it starts with this interpreter (sys.executable).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def reduced_parameters(tmp_path: Path) -> dict[str, object]:
    """A run small enough for the test suite (under a minute on 2 CPU cores)."""
    return {
        "ITERATIONS": 6,
        "WORK_DIR": str(tmp_path / "work"),
        "DATA_DIR": str(tmp_path / "demo_data"),
        "NUM_TRAIN": 12,
        "NUM_VAL": 3,
        "IMAGE_SIZE": 64,
        "CROP_SIZE": 64,
        "BATCH_SIZE": 2,
        "NUM_SHOWN": 1,
        "NUM_PANELS": 2,
        "DEVICE": "cpu",
        "EXTRA_OVERRIDES": ["data.num_workers=0", "train.val_interval=0", "cam.scales=[1.0,0.5]",
                            "afa.affinity_scale=1.0"],
    }


def parameter_cell(nb) -> tuple[int, object]:
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert "parameters" in cell.metadata.get("tags", []), "the first code cell must be tagged 'parameters'"
            return i, cell
    raise AssertionError("the notebook has no code cell")


def assigned_names(source: str) -> set[str]:
    return {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)}


def test_notebook_is_stored_without_outputs_and_starts_with_parameters():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.execution_count is None and cell.outputs == [], "strip the outputs before committing"
    _, cell = parameter_cell(nb)
    assert {"ITERATIONS", "WORK_DIR", "DATA_DIR"} <= assigned_names(cell.source)
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.slow
def test_notebook_runs_with_reduced_parameters(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    index, cell = parameter_cell(nb)
    params = reduced_parameters(tmp_path)
    # every parameter the notebook declares is overridden, so that the test run stays small
    assert assigned_names(cell.source) == set(params), "update reduced_parameters() to the notebook's parameters"
    nb.cells[index].source = "\n".join(f"{name} = {value!r}" for name, value in params.items())

    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError (with the cell's traceback) if a cell fails

    outputs = [out for c in nb.cells if c.cell_type == "code" for out in c.outputs]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert len(images) >= 4  # examples, the stages strip, one panel, the worst panel
    for target in ("cam", "afa", "seg"):
        assert f"{target}: mIoU" in text
    assert (tmp_path / "work" / "viz" / "index.html").is_file()
    assert len(list((tmp_path / "work" / "viz").glob("*.png"))) == params["NUM_PANELS"]
