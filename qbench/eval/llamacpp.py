"""Perplexity of a GGUF file under llama.cpp (llama-cpp-python), with qbench's windows and tokens.

    python -m qbench.eval.llamacpp FILE.gguf [--seqlen 512] [--windows 2] [--dataset wikitext2]

The text is tokenized by the default model's Hugging Face tokenizer exactly as qbench's perplexity does;
llama.cpp evaluates each non-overlapping window from an empty cache, and the mean next-token NLL over
windows gives the perplexity (qbench's convention). The KV cache is F32: llama.cpp's default F16 cache
is a rounding that qbench does not do. What remains differs by design: llama.cpp's CPU matmuls
quantize the activations (to Q8_0/Q8_K) for quantized weights. A build with ggml's AMX kernels runs
without weight repacking (no_weight_repacking: its AMX matmul crashes), which moves llama.cpp's
figure slightly (reports/gguf.md).
"""

import argparse
import contextlib
import math

import numpy as np
import torch

GGML_TYPE_F32 = 0


def has_amx(llama_cpp) -> bool:
    """Whether this llama.cpp build has ggml's AMX kernels (an x86 -march=native build on an AMX CPU)."""
    return "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode(errors="replace")


@contextlib.contextmanager
def no_weight_repacking(llama_cpp):
    """Load without llama.cpp's extra buffer types (the CLI's --no-repack). ggml's AMX matmul, one of
    them, segfaults in llama-cpp-python 0.3.36 built natively on an AMX CPU (seen on this project's
    CPU machine: SIGSEGV in ggml_backend_amx_mul_mat on SmolLM2's first batch). Llama() takes no such
    argument, so the defaults it starts from are patched while it loads."""
    module = llama_cpp.llama_cpp
    original = module.llama_model_default_params

    def defaults():
        params = original()
        if hasattr(params, "use_extra_bufts"):
            params.use_extra_bufts = False
        return params

    module.llama_model_default_params = defaults
    try:
        yield
    finally:
        module.llama_model_default_params = original


def ggml_quantize(weight: np.ndarray, ggml_type: int, block_elems: int, block_bytes: int,
                  imatrix: np.ndarray | None = None) -> np.ndarray:
    """ggml's own quantizer on [rows, cols] float32 rows: ggml_quantize_chunk from the libggml-base that
    llama-cpp-python ships (the call llama.cpp's quantize makes per tensor, with the importance matrix
    as quant_weights). Returns uint8 [rows, cols // block_elems * block_bytes]."""
    import ctypes
    from pathlib import Path

    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    src = np.ascontiguousarray(weight, dtype=np.float32)
    rows, cols = src.shape
    out = np.zeros((rows, cols // block_elems * block_bytes), dtype=np.uint8)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    if qw is not None and qw.size != cols:
        raise ValueError(f"an importance matrix of {qw.size} values for rows of {cols}")
    written = fn(ggml_type, src.ctypes.data, out.ctypes.data, 0, rows, cols, None if qw is None else qw.ctypes.data)
    assert written == out.nbytes, (written, out.nbytes)
    return out


def llama_cpp_logits(path: str, ids: torch.Tensor, seqlen: int, windows: int, threads: int = 2):
    """(tokens, float32 logits [seqlen, vocab]) of llama.cpp for each of the first `windows`
    non-overlapping windows, each from an empty (F32) cache."""
    import llama_cpp

    with no_weight_repacking(llama_cpp) if has_amx(llama_cpp) else contextlib.nullcontext():
        llm = llama_cpp.Llama(path, n_ctx=seqlen, n_batch=seqlen, n_ubatch=seqlen, logits_all=True, n_threads=threads,
                              type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)
    try:
        for w in range(windows):
            tokens = ids[w * seqlen : (w + 1) * seqlen]
            llm.reset()
            llm.eval(tokens.tolist())
            yield tokens, torch.from_numpy(np.array(llm.scores[:seqlen], dtype=np.float32))
    finally:
        llm.close()


def llama_cpp_perplexity(path: str, ids: torch.Tensor, seqlen: int, windows: int, threads: int = 2) -> float:
    nll = 0.0
    for tokens, logits in llama_cpp_logits(path, ids, seqlen, windows, threads):
        nll += torch.nn.functional.cross_entropy(logits[:-1], tokens[1:]).item()
    return math.exp(nll / windows)


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    from qbench.data import perplexity_text
    from qbench.eval.perplexity import tokenize
    from qbench.models import _load_gguf, resolve_source

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--model", default="smollm2-135m", help="whose tokenizer makes the tokens (qbench model name)")
    parser.add_argument("--dataset", default="wikitext2")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    source = resolve_source(args.model)
    tokenizer = AutoTokenizer.from_pretrained(_load_gguf(source.path, False) if source.kind == "gguf" else source.path)
    ids = tokenize(tokenizer, perplexity_text(args.dataset, args.data_dir))
    windows = min(args.windows, ids.numel() // args.seqlen)
    ppl = llama_cpp_perplexity(args.path, ids, args.seqlen, windows, args.threads)
    print(f"llama.cpp ppl_{args.dataset} = {ppl:.4f} ({windows} windows of {args.seqlen} tokens)")


if __name__ == "__main__":
    main()
