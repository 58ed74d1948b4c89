"""Importance matrices for the GGUF quantizers, as llama.cpp's llama-imatrix makes and llama-quantize reads them.

For each linear weight W of a decoder block (llama.cpp collects only `blk.*` matmuls by default, so
token_embd, and a tied output that is token_embd, get none), over the calibration tokens t:

    in_sum2[j] = sum_t x_t[j]^2        counts = number of tokens        imatrix[j] = in_sum2[j] / counts

where x_t is the input row of that matmul (llama-imatrix's IMatrixCollector::collect_imatrix: one count
per token row of src1; a merged-expert tensor keeps one row of sums and one count per expert). The
quantizers use imatrix[j] as ggml's quant_weights (qbench/quant/gguf_quants.py).

Files (both read; ours are written in the first, so one file feeds qbench and llama-quantize --imatrix):
- GGUF imatrix (llama.cpp's current format): general.type = "imatrix", imatrix.datasets (strings),
  imatrix.chunk_count and imatrix.chunk_size (u32); per weight `<name>.in_sum2` F32 [n_mat, cols],
  `<name>.counts` F32 [n_mat, 1] and optionally `<name>.in_sum` (sum of x, unused by quantize).
  Loading divides in_sum2 by its count; a matrix with count 0 gets ones (llama-quantize's load_imatrix).
- legacy .dat: int32 n_entries; per entry int32 name length, name, int32 ncall, int32 nval,
  float32[nval] (mean x^2 times ncall); then int32 chunk count, int32 length, dataset name. Loading
  divides by ncall (llama-quantize's load_legacy_imatrix).
"""

import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SUMS, COUNTS, MEANS = ".in_sum2", ".counts", ".in_sum"


@dataclass
class ImportanceMatrix:
    """Per weight name (GGUF tensor name, "blk.0.attn_q.weight"): the sums of squared inputs and the counts."""

    sums: dict[str, np.ndarray]  # float64 [n_mat, cols]
    counts: dict[str, np.ndarray]  # float64 [n_mat]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def values(self, name: str) -> np.ndarray | None:
        """float32 [cols] (the [n_mat * cols] of a merged-expert tensor) of `name`, or None without data."""
        if name not in self.sums:
            return None
        # float32 / float32 as llama-quantize divides what the file holds: the values of a computed
        # matrix are those of its file
        sums, counts = self.sums[name].astype(np.float32), self.counts[name].astype(np.float32)
        out = np.ones_like(sums)
        seen = counts > 0
        out[seen] = sums[seen] / counts[seen, None]
        return out.reshape(-1)

    def info(self) -> dict:
        tokens = max((int(c.max()) for c in self.counts.values()), default=0)
        return {"entries": len(self.sums), "tokens": tokens, "datasets": list(self.datasets),
                "chunk_count": self.chunk_count, "chunk_size": self.chunk_size}


# ---------------------------------------------------------------- computing one

def collect(model, ids, names: dict[str, str], batch_size: int = 1, progress=None) -> ImportanceMatrix:
    """Run the calibration windows ids [n, seqlen] through the model and sum the squared inputs of each
    linear in `names` (module name -> GGUF tensor name), in float64, one count per token."""
    import torch

    modules = dict(model.named_modules())
    sums = {gguf: torch.zeros(modules[name].in_features, dtype=torch.float64) for name, gguf in names.items()}
    counts = dict.fromkeys(names.values(), 0)

    def hook_for(gguf_name):
        def hook(module, inputs):
            x = inputs[0].detach().reshape(-1, module.in_features).double()
            sums[gguf_name] += (x * x).sum(dim=0).cpu()
            counts[gguf_name] += x.shape[0]
        return hook

    handles = [modules[name].register_forward_pre_hook(hook_for(gguf)) for name, gguf in names.items()]
    device = next(model.parameters()).device
    starts = range(0, ids.shape[0], batch_size)
    try:
        with torch.no_grad():
            for start in (progress(starts, "imatrix", total=len(starts)) if progress else starts):
                model(ids[start : start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return ImportanceMatrix({n: s.numpy()[None, :] for n, s in sums.items()},
                            {n: np.array([float(c)]) for n, c in counts.items()},
                            chunk_count=int(ids.shape[0]), chunk_size=int(ids.shape[1]))


# ---------------------------------------------------------------- files

def write_gguf(imatrix: ImportanceMatrix, path: str) -> None:
    """llama.cpp's GGUF imatrix file (what llama-imatrix writes; llama-quantize --imatrix reads it)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "imatrix")  # no general.architecture: llama-imatrix writes none
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", list(imatrix.datasets))
    writer.add_uint32("imatrix.chunk_count", int(imatrix.chunk_count))
    writer.add_uint32("imatrix.chunk_size", int(imatrix.chunk_size))
    for name in sorted(imatrix.sums):  # llama-imatrix's deterministic order
        sums = imatrix.sums[name].astype(np.float32)
        writer.add_tensor(name + SUMS, sums)
        writer.add_tensor(name + COUNTS, imatrix.counts[name].astype(np.float32).reshape(-1, 1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _read_gguf(path: str) -> ImportanceMatrix:
    import gguf

    reader = gguf.GGUFReader(path)
    tensors = {t.name: np.array(t.data, dtype=np.float64) for t in reader.tensors}
    sums, counts = {}, {}
    for name, data in tensors.items():
        if name.endswith(SUMS):
            base = name[: -len(SUMS)]
            if base + COUNTS not in tensors:
                raise ValueError(f"imatrix {path}: {name} has no {base + COUNTS}")
            count = tensors[base + COUNTS].reshape(-1)
            sums[base], counts[base] = data.reshape(count.size, -1), count

    def field_value(key, default):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    return ImportanceMatrix(sums, counts, list(field_value("imatrix.datasets", [])),
                            int(field_value("imatrix.chunk_count", 0)), int(field_value("imatrix.chunk_size", 0)))


def _read_dat(path: str) -> ImportanceMatrix:
    """The legacy format. Its values are means x ncall; they become sums with count ncall (ncall 0: the
    values as they are, count 1), so that values() gives what llama-quantize loads."""
    data = Path(path).read_bytes()
    pos = 0

    def take(fmt):
        nonlocal pos
        out = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return out

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise ValueError(f"imatrix {path}: no entries")
    sums, counts = {}, {}
    for _ in range(n_entries):
        (length,) = take("<i")
        name = data[pos : pos + length].decode()
        pos += length
        ncall, nval = take("<ii")
        values = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float64)
        pos += 4 * nval
        sums[name], counts[name] = values[None, :], np.array([float(ncall if ncall > 0 else 1)])
    chunks, datasets = 0, []
    if pos < len(data):
        (chunks,) = take("<i")
        (length,) = take("<i")
        datasets = [data[pos : pos + length].decode(errors="replace")]
    return ImportanceMatrix(sums, counts, datasets, chunks, 0)


def is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def read(path: str) -> ImportanceMatrix:
    """An imatrix file of either format (GGUF by its magic, else legacy .dat), ours or llama.cpp's."""
    return _read_gguf(path) if is_gguf(path) else _read_dat(path)


def file_info(path: str) -> dict:
    """What the record says about a file: its format and digest."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    return {"path": str(path), "format": "gguf" if is_gguf(path) else "dat", "sha256_16": digest}
