"""GGUF: llama.cpp's block formats and mixes, quantized by our own code, run and exported as GGUF.

Each linear becomes a GGUFLinear holding the raw GGML blocks of its type; the type of each tensor
comes from qbench.quant.gguf_mix (llama.cpp's choice for the mix, including its shape fallbacks).
With quantize_lm_head=true a tied lm_head/embedding is quantized as llama.cpp does (one tensor,
token_embd, used for the input lookup and the output), so the whole file matches llama.cpp's.

method.imatrix (null: none) gives the quantizers an importance matrix as llama-quantize --imatrix
does: `auto` computes it from the run's calibration set (calib=, method.calib_seqlen tokens per window)
the way llama-imatrix does (qbench/quant/imatrix.py) and writes it under <results_dir>/imatrix/ in
llama.cpp's GGUF imatrix format; a path reads a file of either llama.cpp format, ours or llama-imatrix's. Tensors without data in it (token_embd) are quantized without, as llama.cpp does.
"""

import time
from collections import Counter

from qbench.quant import gguf_export, gguf_mix
from qbench.quant import imatrix as imx
from qbench.quant.gguf_linear import GGUFLinear
from qbench.quant.modules import quantizable_linears, replace_linears


def _types(model, linears: dict, choice: str) -> dict[str, str]:
    names = gguf_export.gguf_names(model)
    cfg = model.config
    row_lens = {names[n]: lin.in_features for n, lin in linears.items()}
    is_70b = cfg.num_hidden_layers == 80 and cfg.num_attention_heads != cfg.num_key_value_heads
    types = gguf_mix.tensor_types(choice, row_lens, cfg.num_hidden_layers, gguf_export.is_tied(model), is_70b)
    return {n: types[names[n]] for n in linears}


def importance_matrix(model, cfg, ctx) -> tuple[imx.ImportanceMatrix | None, dict | None]:
    """The run's importance matrix (method.imatrix) and what the record says about it."""
    source = cfg.method.get("imatrix")
    if source is None:
        return None, None
    if str(source) != "auto":
        matrix = imx.read(str(source))
        return matrix, {"source": "file", **imx.file_info(str(source)), **matrix.info()}
    from qbench.calib import calibration_ids
    from qbench.quant.blocks import batch_size_for

    ids, calib = calibration_ids(cfg, ctx.tokenizer, ctx.cache)
    key = ("imatrix", str(cfg.model), str(ctx.device), str(ctx.dtype), str(cfg.data_dir),
           *(str(calib[k]) for k in ("name", "nsamples", "seqlen", "seed")))
    started = time.perf_counter()
    if key not in ctx.cache:  # the runs of one process (a sweep over types) share one matrix
        linears = quantizable_linears(model, True)
        names = {n: g for n, g in gguf_export.gguf_names(model).items() if n in linears and g.startswith("blk.")}
        # only blk.* matmuls, as llama-imatrix without --process-output
        matrix = imx.collect(model, ids, names, batch_size_for(int(calib["seqlen"])), ctx.progress)
        matrix.datasets = [f"qbench calib={calib['name']} ({calib['source']}) nsamples={calib['nsamples']} "
                           f"seqlen={calib['seqlen']} seed={calib['seed']}"]
        ctx.cache[key] = matrix
    matrix = ctx.cache[key]
    info = {"source": "auto", "calib": calib, **matrix.info(), "imatrix_s": time.perf_counter() - started}
    out = imatrix_path(cfg, calib)
    out.parent.mkdir(parents=True, exist_ok=True)
    imx.write_gguf(matrix, str(out))  # for llama-quantize --imatrix, or method.imatrix=<it> in a later run
    info["written_to"] = str(out)
    return matrix, info


def imatrix_path(cfg, calib: dict):
    """Where a computed matrix is written: <results_dir>/imatrix/<model>-<calib>-n<N>-s<seqlen>-seed<S>.gguf."""
    from pathlib import Path

    model = Path(str(cfg.model)).name.replace(".gguf", "")
    return Path(str(cfg.results_dir)) / "imatrix" / (
        f"{model}-{calib['name']}-n{calib['nsamples']}-s{calib['seqlen']}-seed{calib['seed']}.gguf")


def quantize(model, cfg, ctx) -> dict:
    choice = str(cfg.method.type)
    matrix, matrix_info = importance_matrix(model, cfg, ctx)
    linears = quantizable_linears(model, cfg.quantize_lm_head)
    types = _types(model, linears, choice)
    names = gguf_export.gguf_names(model)
    del linears  # the walk below holds the only references, so each float weight goes once replaced
    head = model.get_output_embeddings()
    size = {"elements": 0, "bytes": 0}
    weighted, unweighted = [], []

    def make_layer(name, linear):
        values = None if matrix is None else matrix.values(names[name])
        if matrix is not None:
            (weighted if values is not None else unweighted).append(names[name])
        if values is not None and values.size != linear.in_features:
            raise ValueError(f"imatrix has {values.size} values for {names[name]}, whose rows have {linear.in_features}")
        layer = GGUFLinear.from_linear(linear, types[name], kernel=cfg.kernel, imatrix=values)
        size["elements"] += linear.in_features * linear.out_features
        size["bytes"] += layer.qweight.numel()
        if linear is head and gguf_export.is_tied(model):
            # llama.cpp looks the input embeddings up in the same quantized tensor
            model.get_input_embeddings().weight.data = layer.dequantize(linear.weight.dtype)
        return layer

    count = replace_linears(model, cfg, ctx, make_layer, f"gguf {choice}")
    info = {"type": choice, "bits_per_weight": 8 * size["bytes"] / max(size["elements"], 1),
            "tensor_types": dict(Counter(types.values())), "quantized_layers": count}
    if matrix is not None:
        info["imatrix"] = {**matrix_info, "weighted_tensors": len(weighted), "tensors_without_data": sorted(unweighted)}
        ctx.cache[("gguf imatrix metadata", id(model))] = {  # what llama-quantize --imatrix writes into the file
            "quantize.imatrix.file": matrix_info.get("path") or matrix_info.get("written_to"),
            "quantize.imatrix.dataset": (matrix.datasets or [""])[0],
            "quantize.imatrix.entries_count": len(matrix.sums), "quantize.imatrix.chunks_count": matrix.chunk_count}
    return info


def export(model, cfg, ctx, path) -> None:
    from qbench.models import resolve_source

    source = resolve_source(str(cfg.model))
    gguf_export.write_gguf(model, path, gguf_mix.file_type(str(cfg.method.type)),
                           source_gguf=source.path if source.kind == "gguf" else None, tokenizer=ctx.tokenizer,
                           extra=ctx.cache.get(("gguf imatrix metadata", id(model))))
