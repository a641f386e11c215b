"""A `torch.distributed.checkpoint` reader that never runs pickled code from a file.

DCP's `FileSystemReader` reads the checkpoint's `.metadata` with `pickle.load`, which runs whatever
a crafted file asks for. `SafeFileSystemReader` reads it with an unpickler that only builds DCP's
own metadata classes, `torch.Size`, dtypes and layouts, and a few plain containers; anything else
raises `UnsafeCheckpointError`. moeflow checkpoints hold only tensors in DCP (every non-tensor value
lives in JSON beside them), so DCP's `torch.load(weights_only=False)` path for byte values is never
taken either (`check_tensor_only` makes sure). Paths in the metadata are confined to the checkpoint
directory and files are checked against the manifest (`moeflow.train.ckpt_integrity`).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.futures import Future

from moeflow.train.ckpt_integrity import confined, verify_file


class UnsafeCheckpointError(ValueError):
    pass


_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "ChunkStorageMetadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "TensorProperties",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "Path"},
    "collections": {"OrderedDict"},
}
_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()) or (module == "torch" and name in _DTYPES):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"checkpoint metadata asks for {module}.{name}, which is not a DCP metadata type; "
            "refusing to load it (the file is corrupt or was not written by moeflow)"
        )


class SafeFileSystemReader(FileSystemReader):
    """`FileSystemReader` whose metadata is read by an allow-list unpickler, whose paths stay in
    the checkpoint directory, and which checks each file against `manifest` (the `files` table of
    `moeflow.json`, `moeflow.train.ckpt_integrity`) before it reads from it."""

    def __init__(self, path: str | os.PathLike, manifest: dict | None = None) -> None:
        super().__init__(path)
        self.manifest = manifest
        self.verified: set[str] = set()

    def _verify(self, name: str) -> None:
        if name not in self.verified:
            verify_file(Path(self.path), name, self.manifest)
            self.verified.add(name)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        for item in plan.items:
            name = self.storage_data[item.storage_index].relative_path
            self._verify(name)
        return super().read_data(plan, planner)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        self._verify(Path(path).name)
        with self.fs.create_stream(path, "rb") as stream:
            try:
                metadata = _MetadataUnpickler(stream).load()
            except UnsafeCheckpointError:
                raise
            except Exception as exc:  # truncated or garbled file: say which one
                raise UnsafeCheckpointError(
                    f"checkpoint metadata {path} is unreadable ({type(exc).__name__}: {exc})"
                ) from exc
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(f"{path} does not hold DCP metadata")
        check_tensor_only(metadata, str(path))
        for info in (metadata.storage_data or {}).values():
            confined(getattr(info, "relative_path", None), Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def check_tensor_only(metadata: Metadata, where: str) -> None:
    for key, item in metadata.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            raise UnsafeCheckpointError(
                f"{where}: entry {key!r} is not a tensor; moeflow checkpoints hold only tensors "
                "in DCP (loading byte entries would unpickle them)"
            )
