"""A Hugging Face checkpoint directory: `config.json` plus one or many `.safetensors` files.

Tensors stay memory-mapped until a converter asks for one as float32; pickle checkpoints
(`pytorch_model.bin`, `*.pt`) are refused without being opened, since unpickling runs code.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .safetensors_reader import CheckpointError, SafetensorsFile, TensorInfo

INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class Checkpoint:
    """Config and tensor index of a checkpoint directory; `load(name)` reads one tensor as float32."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir} is not a directory; pass the folder holding config.json and *.safetensors")
        cfg = self.dir / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"{self.dir} has no config.json; is this a Hugging Face model folder?")
        try:
            self.config: dict[str, Any] = json.loads(cfg.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{cfg} is not valid JSON: {e}") from None
        self._files = [SafetensorsFile(p) for p in self._shards()]
        self._where: dict[str, SafetensorsFile] = {}
        for f in self._files:
            for name in f.tensors:
                if name in self._where:
                    raise CheckpointError(f"tensor {name} appears in both {self._where[name].path.name} and {f.path.name}")
                self._where[name] = f

    def _shards(self) -> list[Path]:
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
                raise CheckpointError(f"{index} is not a JSON object with a weight_map: {e}") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
            names = sorted(set(weight_map.values()))
            outside = [n for n in names if Path(n).name != n or n in ("", ".", "..")]
            if outside:   # a shard is a file of this folder, never a path elsewhere
                raise CheckpointError(f"{index} names shards outside {self.dir}: {', '.join(outside[:3])}")
            missing = [n for n in names if not (self.dir / n).is_file()]
            if missing:
                raise CheckpointError(f"{index.name} lists shards that are missing: {', '.join(missing)}")
            return [self.dir / n for n in names]
        shards = sorted(self.dir.glob("*.safetensors"))
        if shards:
            return shards
        pickles = sorted(p.name for p in self.dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{self.dir} holds only pickle checkpoints ({', '.join(pickles)}), which hotcold never unpickles; "
                "re-save the model with save_pretrained(..., safe_serialization=True)")
        raise CheckpointError(f"{self.dir} has no *.safetensors files")

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str) -> TensorInfo:
        return self._where[name].tensors[name]

    def load(self, name: str, index: int | None = None) -> np.ndarray:
        """The tensor (or its slice `index` along axis 0) as a fresh float32 array, bf16/f16 widened exactly."""
        if name not in self._where:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint in {self.dir}")
        return self._where[name].float32(name, index)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for f in self._files for t in f)
