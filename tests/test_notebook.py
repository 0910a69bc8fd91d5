"""experiments/notebooks/quickstart.ipynb runs top to bottom (nbclient, CPU, SmolLM2); its outputs show the chat
answer, a parsed and executed tool call, the loss plot (an image) and a perplexity figure."""

import os

import pytest

from tests.conftest import REPO

NOTEBOOK = os.path.join(REPO, "experiments", "notebooks", "quickstart.ipynb")


def test_quickstart_notebook_executes(smollm2_checkpoint):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}
    )
    client.execute()
    texts, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", out
            if out.get("output_type") == "stream":
                texts.append(out["text"])
            data = out.get("data", {})
            texts.append(data.get("text/plain", ""))
            images += "image/png" in data
    text = "".join(texts)
    assert "assistant:" in text and "Paris" in text.split("assistant:", 1)[1]
    assert images >= 1  # the loss plot
    assert "tool calls: [('get_weather'" in text and "tool result:" in text
    assert "step 5: loss" in text
    assert "perplexity float32:" in text
