"""Shared fixtures: the shipped trained model converted once per session."""
from __future__ import annotations

import os
import shutil

from hotcold.llama_amx import guard

guard()   # before anything imports llama_cpp: its AMX buffers fault on some VMs (hotcold/llama_amx.py)

# Without an NVIDIA GPU, run numba.cuda kernels (tests/test_cuda_kernels.py) on Numba's CPU simulator.
# Set before anything imports numba, which reads the variable once.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

from pathlib import Path

import pytest

import tiny_models

TRAINED = tiny_models.REPO / "models" / "mixtral-trained"


@pytest.fixture(scope="session")
def trained_q8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/mixtral-trained at Q8_0 with its Q4_K cold copies (trained-q8_0.cold.gguf beside it)."""
    from hotcold.convert import convert
    out = tmp_path_factory.mktemp("trained") / "trained-q8_0.gguf"
    return convert(TRAINED, out, type="q8_0", cold_type="q4_k", progress=False).path


@pytest.fixture(scope="session")
def trained_q4k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/mixtral-trained at Q4_K (every matrix 256 columns or more: the K-quants' blocks fit)."""
    from hotcold.convert import convert
    out = tmp_path_factory.mktemp("trained") / "trained-q4_k.gguf"
    return convert(TRAINED, out, type="q4_k", progress=False).path
