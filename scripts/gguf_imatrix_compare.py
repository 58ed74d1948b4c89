"""GGUF mixes with and without an importance matrix on a real model: qbench's quantization against llama.cpp's.

    python scripts/gguf_imatrix_compare.py --out /tmp/imatrix-cmp [--types Q4_K_M Q3_K_M] [--nsamples 32]

For each type, two qbench runs (method.imatrix null and auto, the matrix from calib=c4; the tied
embedding quantized as llama.cpp does, quantize_lm_head=true) with WikiText-2
perplexity and KLD on the same windows, each exported as GGUF. llama.cpp's side: every quantized tensor
of the F32 model quantized again by ggml_quantize_chunk with the run's importance matrix (what
llama-quantize --imatrix does per tensor; its C++ map argument cannot be passed from Python), compared
byte for byte with our file; then llama.cpp (llama-cpp-python) evaluates the file: perplexity and KLD to
the unquantized model's distributions (torch, float32) on the same windows. Prints a JSON summary.
"""

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch


def compose(out: Path, *overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from qbench.paths import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[f"results_dir={out / 'results'}", "wandb.mode=disabled",
                                                              "quiet=true", *overrides])


def ggml_file_check(ours: Path, f32: Path, imatrix_file: str | None) -> dict:
    """Quantize every quantized tensor of `ours` from the F32 file with ggml_quantize_chunk (the run's
    importance matrix as quant_weights where it has the tensor) and count the byte-identical ones."""
    import gguf

    from qbench.eval.llamacpp import ggml_quantize
    from qbench.quant import imatrix as imx
    from qbench.quant.gguf_quants import TYPES

    matrix = imx.read(imatrix_file) if imatrix_file else None
    source = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(f32)).tensors}
    same, differ, weighted = 0, [], 0
    for t in gguf.GGUFReader(str(ours)).tensors:
        if t.tensor_type.name not in TYPES:
            continue
        block = TYPES[t.tensor_type.name]
        values = None if matrix is None else matrix.values(t.name)
        weighted += values is not None
        theirs = ggml_quantize(source[t.name], block.ggml_type, block.block_elems, block.block_bytes, values)
        if np.array_equal(np.array(t.data).reshape(theirs.shape), theirs):
            same += 1
        else:
            differ.append(t.name)
    return {"tensors": same + len(differ), "identical": same, "differ": differ, "with_imatrix": weighted}


def llama_cpp_eval(path: str, ids: torch.Tensor, seqlen: int, windows: int, base_logprobs: list) -> dict:
    from qbench.eval.llamacpp import llama_cpp_logits

    nll, kl, agree, n = 0.0, 0.0, 0, 0
    for w, (tokens, logits) in enumerate(llama_cpp_logits(path, ids, seqlen, windows)):
        nll += torch.nn.functional.cross_entropy(logits[:-1], tokens[1:]).item()
        q = torch.log_softmax(logits[:-1].double(), dim=-1)
        p = base_logprobs[w].double()
        kl += (p.exp() * (p - q)).sum().item()
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        n += p.shape[0]
    return {"ppl": math.exp(nll / windows), "kld_mean": kl / n, "top1_agree": agree / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--types", nargs="+", default=["Q4_K_M", "Q3_K_M"])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=2)
    args = parser.parse_args()

    from qbench import runner
    from qbench.data import perplexity_text
    from qbench.eval.perplexity import tokenize
    from qbench.quant.gguf_export import write_gguf

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["method=gguf", "quantize_lm_head=true", "eval.ppl.datasets=[wikitext2]", f"eval.ppl.seqlen={args.seqlen}",
              f"eval.ppl.max_windows={args.windows}", "eval.kld=true", f"eval.kld_windows={args.windows}",
              f"calib.nsamples={args.nsamples}", f"calib.seqlen={args.calib_seqlen}"]
    summary = {"settings": vars(args), "runs": []}
    base_logprobs, ids, f32 = None, None, out / "f32.gguf"
    for qtype in args.types:
        for imatrix in (None, "auto"):
            label = f"{qtype}{'-imatrix' if imatrix else ''}"
            cfg = compose(out, *common, f"method.type={qtype}", f"export.path={out / label}.gguf",
                          *([f"method.imatrix={imatrix}"] if imatrix else []))
            record = runner.run(cfg)
            assert record["status"] == "ok", record.get("error")
            loaded = runner._loaded(cfg)
            if base_logprobs is None:
                write_gguf(loaded.model, str(f32), 0, float_only=True)
                ids = tokenize(loaded.tokenizer, perplexity_text("wikitext2", cfg.data_dir), key=f"wikitext2:{cfg.data_dir}")
                with torch.no_grad():
                    base_logprobs = [torch.log_softmax(loaded.model(ids[None, w * args.seqlen : (w + 1) * args.seqlen])
                                                       .logits[0, :-1], dim=-1) for w in range(args.windows)]
            im = record["quant_info"].get("imatrix")
            entry = {"label": label, "run_id": record["run_id"], "bits_per_weight": record["quant_info"]["bits_per_weight"],
                     "tensor_types": record["quant_info"]["tensor_types"], "quantize_s": record["timings"]["quantize_s"],
                     "qbench": {k: record["metrics"].get(k) for k in ("ppl_wikitext2", "kld_mean", "top1_agree")},
                     "imatrix": im,
                     "ggml_bytes": ggml_file_check(Path(record["export_path"]), f32, im["written_to"] if im else None),
                     "llama_cpp": llama_cpp_eval(record["export_path"], ids, args.seqlen, args.windows, base_logprobs)}
            summary["runs"].append(entry)
            print(json.dumps(entry, default=str), flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()
