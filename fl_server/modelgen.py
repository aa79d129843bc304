"""The initial model of a job: generated chunk by chunk, or taken from a file (blocking)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np

from common.config import MIB, FileModel, GeneratedModel
from common.modelio import ModelWriter, compute_manifest, read_layout
from common.tensorfile import Manifest, st_dtype

# Small on purpose: the server's memory must not depend on how large a tensor is.
GENERATE_CHUNK_BYTES = 1024 * 1024


def tensor_shape(spec: GeneratedModel) -> tuple[int, ...]:
    if spec.tensor_shape is not None:
        return tuple(spec.tensor_shape)
    assert spec.tensor_mib is not None
    itemsize = np.dtype(spec.dtype).itemsize
    return (max(1, int(spec.tensor_mib * MIB) // itemsize),)


def generate(spec: GeneratedModel, path: Path, segment_bytes: int) -> Manifest:
    dtype = np.dtype(spec.dtype)
    shape = tensor_shape(spec)
    numel = math.prod(shape)
    tensors = [(f"layer{i:05d}", st_dtype(dtype), shape) for i in range(spec.num_tensors)]
    step = max(1, GENERATE_CHUNK_BYTES // dtype.itemsize)
    # numpy draws normals in float32 or float64 only; float16 is drawn in float32
    draw = dtype if dtype in (np.float32, np.float64) else np.dtype(np.float32)
    with ModelWriter(path, tensors, segment_bytes=segment_bytes) as writer:
        for i in range(spec.num_tensors):
            rng = np.random.default_rng([spec.seed, i])
            for first in range(0, numel, step):
                n = min(step, numel - first)
                if spec.init == "normal":
                    chunk = rng.standard_normal(n, dtype=draw).astype(dtype, copy=False)
                elif spec.init == "zeros":
                    chunk = np.zeros(n, dtype=dtype)
                else:
                    chunk = np.arange(first, first + n, dtype=np.float64).astype(dtype)
                writer.write(chunk)
        return writer.finish()


def from_file(spec: FileModel, path: Path, segment_bytes: int) -> Manifest:
    read_layout(spec.path)  # fail early, with the format error, before copying
    tmp = path.with_name(path.name + ".part")
    shutil.copyfile(spec.path, tmp)
    tmp.replace(path)
    return compute_manifest(path, segment_bytes)


def prepare_initial(spec: GeneratedModel | FileModel, path: Path, segment_bytes: int) -> Manifest:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(spec, GeneratedModel):
        return generate(spec, path, segment_bytes)
    return from_file(spec, path, segment_bytes)
