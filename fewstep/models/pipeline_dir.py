"""Read and write Qwen-Image style pipeline directories (diffusers layout) on any URI.

Layout: ``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``processor/`` (edit only), ``scheduler/``, and for directories fewstep wrote, ``fewstep_model.json``
(diffusers ignores it). S3 directories are downloaded per component into a local cache.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from fewstep import storage
from fewstep.storage import StorageOptions

FEWSTEP_META = "fewstep_model.json"
MODEL_COMPONENTS = ("transformer", "vae", "text_encoder")
ALL_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "processor", "scheduler")

# What model_index.json records for each component: the classes a plain diffusers install loads.
_LIBRARY_CLASS = {
    "transformer": ["diffusers", "QwenImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLQwenImage"],
    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "processor": ["transformers", "Qwen2VLProcessor"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
}


class NotAPipelineError(ValueError):
    """The path is not a Qwen-Image style pipeline directory."""


def default_cache_dir() -> Path:
    """Where S3 pipelines are cached unless ``cache_dir`` is passed (keyed by URI hash)."""
    return Path.home() / ".cache" / "fewstep" / "models"


class PipelineDir:
    """A pipeline directory addressed by URI, with S3 parts fetched into a local cache on demand."""

    def __init__(self, uri: str, storage_options: StorageOptions | None = None, cache_dir: str | Path | None = None):
        self.uri = storage.normalize(uri)
        self.options = storage_options
        if storage.is_s3(self.uri):
            digest = hashlib.sha256(self.uri.encode()).hexdigest()[:16]
            self.local = Path(cache_dir or default_cache_dir()) / digest
        else:
            self.local = Path(self.uri)
        self.model_index = self._read_index()

    def _read_index(self) -> dict[str, Any]:
        index_uri = storage.join(self.uri, "model_index.json")
        try:
            found = storage.exists(index_uri, self.options)
        except Exception as exc:  # e.g. S3 unreachable: say which URI
            raise NotAPipelineError(f"cannot read {index_uri}: {exc}") from exc
        if not found and not storage.exists(self.uri, self.options):
            raise NotAPipelineError(f"{self.uri} does not exist (so model_index.json is missing): give "
                                    "a pipeline directory, e.g. assets/teachers/base or a run's final/; "
                                    "create a tiny one with `fewstep models init-tiny --out DIR`")
        if not found:
            raise NotAPipelineError(
                f"{self.uri} is not a pipeline directory: model_index.json is missing. Expected a diffusers "
                "Qwen-Image layout (model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/); "
                "create a tiny one with `fewstep models init-tiny --out DIR`."
            )
        index = storage.read_json(index_uri, self.options)
        missing = [c for c in ("transformer", "vae", "scheduler") if c not in index]
        if missing:
            raise NotAPipelineError(f"{index_uri} lists no {missing}: not a Qwen-Image style pipeline")
        return index

    def require(self, components: tuple[str, ...]) -> None:
        """Fail now, naming the folder, if any of ``components`` is absent or empty (a loader
        would fail later, in a worker, after other models' work)."""
        for component in components:
            if not self.has(component):
                raise NotAPipelineError(f"{self.uri} has no {component!r} component (model_index.json)")
            if not storage.list_files(storage.join(self.uri, component), options=self.options):
                raise NotAPipelineError(f"{self.uri}/{component} is missing or empty: the pipeline "
                                        "directory is incomplete")

    def has(self, component: str) -> bool:
        entry = self.model_index.get(component)
        return bool(entry) and entry[0] is not None

    def read_json(self, relpath: str) -> dict[str, Any]:
        uri = storage.join(self.uri, *relpath.split("/"))
        if not storage.exists(uri, self.options):
            raise NotAPipelineError(f"{uri} is missing: the pipeline directory is incomplete")
        return storage.read_json(uri, self.options)

    def meta(self) -> dict[str, Any]:
        uri = storage.join(self.uri, FEWSTEP_META)
        if not storage.exists(uri, self.options):
            return {}
        try:
            return storage.read_json(uri, self.options)
        except ValueError as exc:
            raise NotAPipelineError(f"{uri} is not valid JSON ({exc}); fix or remove it (it records "
                                    "the model's role and sampling steps)") from None

    def _remote_listing(self, component: str) -> dict[str, list]:
        fs, path = storage.resolve(storage.join(self.uri, component), self.options)
        found = fs.find(path, detail=True)
        if not found:
            raise NotAPipelineError(f"{self.uri}/{component} is empty: the pipeline directory is incomplete")
        return {name[len(path):].lstrip("/"): _listing_entry(info) for name, info in sorted(found.items())}

    def component_path(self, component: str) -> Path:
        """Local folder of ``component``, downloading it first when the pipeline is on S3."""
        if not self.has(component):
            raise NotAPipelineError(f"{self.uri} has no {component!r} component (model_index.json)")
        local = self.local / component
        if storage.is_s3(self.uri):
            # One cache folder per remote version (names, sizes, ETags), filled in a temporary folder
            # and renamed: concurrent loaders on one machine never see a partial download.
            listing = json.dumps(self._remote_listing(component), sort_keys=True)
            local = self.local / f"{component}-{hashlib.sha256(listing.encode()).hexdigest()[:16]}"
            if not (local / ".complete").exists():
                tmp = self.local / f".{local.name}.tmp-{uuid.uuid4().hex}"
                storage.download_dir(storage.join(self.uri, component), tmp, self.options)
                (tmp / ".complete").write_text(listing)
                try:
                    tmp.rename(local)
                except OSError:  # another process finished first
                    shutil.rmtree(tmp, ignore_errors=True)
                    if not (local / ".complete").exists():
                        raise
        elif not local.is_dir():
            raise NotAPipelineError(f"{local} is missing: the pipeline directory is incomplete")
        return local


def _listing_entry(info: dict) -> list:
    return [int(info.get("size") or 0), str(info.get("ETag") or info.get("etag") or "")]


def _save_model(model, path: Path, dtype) -> None:
    if dtype is not None and next(model.parameters()).dtype != dtype:
        model = copy.deepcopy(model).to(dtype)  # never change the caller's model
    model.save_pretrained(str(path), safe_serialization=True)


def _fix_processor_class(path: Path) -> None:
    """Make the folder load with the stock ``Qwen2VLProcessor`` (where torchvision works).

    Records the stock class name and writes the video processor config a stock processor
    requires (it mirrors the image processor's settings; fewstep never processes video).
    """
    config = json.loads((path / "processor_config.json").read_text())
    image = config.get("image_processor", {})
    video = path / "video_preprocessor_config.json"
    if not video.exists():
        keys = ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean", "image_std",
                "merge_size", "patch_size", "resample", "rescale_factor", "size", "temporal_patch_size")
        payload = {k: image[k] for k in keys if k in image}
        payload.update(video_processor_type="Qwen2VLVideoProcessor", processor_class="Qwen2VLProcessor")
        video.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    for name in ("processor_config.json", "tokenizer_config.json", "preprocessor_config.json"):
        file = path / name
        if file.exists():
            data = json.loads(file.read_text())
            if data.get("processor_class") == "FewstepQwen2VLProcessor":
                data["processor_class"] = "Qwen2VLProcessor"
                file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_components(out: Path, components: dict[str, Any], meta: dict | None = None, dtype=None) -> None:
    """Write objects or existing local folders (``Path``) as one pipeline directory at ``out``."""
    import diffusers

    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {
        "_class_name": "QwenImageEditPipeline" if components.get("processor") is not None else "QwenImagePipeline",
        "_diffusers_version": diffusers.__version__,
    }
    for name in ALL_COMPONENTS:
        obj = components.get(name)
        if obj is None:
            continue
        target = out / name
        if isinstance(obj, Path):
            shutil.copytree(obj, target, ignore=shutil.ignore_patterns(".complete"))
        elif name in MODEL_COMPONENTS:
            _save_model(obj, target, dtype)
        else:
            obj.save_pretrained(str(target))
            if name == "processor":
                _fix_processor_class(target)
        index[name] = _LIBRARY_CLASS[name]
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if meta is not None:
        (out / FEWSTEP_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def publish_dir(local_dir: Path, out_uri: str, options: StorageOptions | None = None) -> str:
    """Move/upload a finished local directory to ``out_uri``; ``model_index.json`` goes last."""
    out_uri = storage.normalize(out_uri)
    if not storage.is_s3(out_uri):
        out = Path(out_uri)
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not empty; choose a new directory")
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()
        shutil.move(str(local_dir), str(out))
        return out_uri
    if storage.list_files(out_uri, options=options):  # as locally: never upload over another model
        shutil.rmtree(local_dir, ignore_errors=True)
        raise FileExistsError(f"{out_uri} exists and is not empty; choose a new directory")
    storage.upload_dir(local_dir, out_uri, options, last=("model_index.json",))  # readers look for the index
    shutil.rmtree(local_dir, ignore_errors=True)
    return out_uri


def staging_dir(out_uri: str) -> Path:
    """A temporary local directory to build ``out_uri`` in (next to it when local)."""
    out_uri = storage.normalize(out_uri)
    parent = None if storage.is_s3(out_uri) else Path(out_uri).parent
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".fewstep-pipeline-tmp-", dir=parent))
