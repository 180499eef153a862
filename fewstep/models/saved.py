"""A saved diffusers model read lazily: its skeleton from config, its tensors one at a time.

Loading with ``from_pretrained`` materialises the whole model in every process. Under ZeRO-3
that full copy is exactly what partitioning is meant to avoid, so the training runtime instead
builds the skeleton under ``deepspeed.zero.Init`` (each parameter is partitioned as it is
created) and copies the saved tensors in one by one (``trainer/runtime/engines.py``).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from fewstep.models.pipeline_dir import PipelineDir
from fewstep.storage import StorageOptions

__all__ = ["SavedModel", "TensorReader"]

_SINGLE = "diffusion_pytorch_model.safetensors"
_INDEX = "diffusion_pytorch_model.safetensors.index.json"


class TensorReader:
    """Names, shapes and values of the tensors in a model folder's safetensors file(s)."""

    def __init__(self, files: dict[str, Path]):
        from safetensors import safe_open

        self._where = files  # tensor name -> file
        self._handles = {path: safe_open(str(path), framework="pt") for path in set(files.values())}

    def names(self) -> list[str]:
        return sorted(self._where)

    def num_elements(self) -> int:
        return sum(math.prod(self._handles[path].get_slice(name).get_shape())
                   for name, path in self._where.items())

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)


class SavedModel:
    """One component (e.g. ``transformer``) of a pipeline directory, local or ``s3://``."""

    def __init__(self, pipeline_uri: str, component: str = "transformer",
                 storage: StorageOptions | None = None):
        self.pipeline_uri, self.component, self.storage = pipeline_uri, component, storage
        self._path: Path | None = None

    def __repr__(self) -> str:
        return f"SavedModel({self.pipeline_uri!r}, {self.component!r})"

    @property
    def path(self) -> Path:
        """The component's local folder (downloaded once when the pipeline is on S3)."""
        if self._path is None:
            self._path = PipelineDir(self.pipeline_uri, self.storage).component_path(self.component)
        return self._path

    def model_class(self) -> type[torch.nn.Module]:
        import diffusers

        config = json.loads((self.path / "config.json").read_text())
        name = config.get("_class_name")
        cls = getattr(diffusers, str(name), None)
        if cls is None:
            raise ValueError(f"{self.path}/config.json: _class_name {name!r} is not a diffusers model class")
        return cls

    def load(self) -> torch.nn.Module:
        """The whole model in fp32 (every parameter in this process)."""
        return self.model_class().from_pretrained(str(self.path), torch_dtype=torch.float32).float()

    def skeleton_factory(self) -> Callable[[], torch.nn.Module]:
        """A call that builds the model from its config alone (weights randomly initialised).

        Imports and config reading happen here, not in the call: ``deepspeed.zero.Init`` patches
        tensor construction, and importing diffusers (which imports ``torch._dynamo``) inside it
        fails.
        """
        cls = self.model_class()
        config = cls.load_config(str(self.path))
        return lambda: cls.from_config(config)

    @contextlib.contextmanager
    def tensors(self) -> Iterator[TensorReader]:
        """The saved tensors, their files open (memory-mapped) until the block ends."""
        reader = TensorReader(self._files())
        try:
            yield reader
        finally:
            reader.close()

    def _files(self) -> dict[str, Path]:
        index = self.path / _INDEX
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: self.path / file for name, file in weight_map.items()}
        single = self.path / _SINGLE
        if not single.exists():
            raise FileNotFoundError(f"{self.path}: neither {_SINGLE} nor {_INDEX} (save it with safetensors)")
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as handle:
            return {name: single for name in handle.keys()}

