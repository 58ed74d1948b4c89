"""Where LLM.int8()'s perplexity loss on a model comes from: `python -m research.int8_study`.

Perplexity on the first WikiText-2 windows (float32, CPU by default; `--device cuda --dtype float16
--windows 0` for the whole test set on the GPU, `--datasets wikitext2,c4`) of the model with every
decoder linear replaced by one variant at a time:
    baseline        the model itself (in --dtype)
    llm_int8        qbench's Int8Linear (int8 weights and activations, outlier columns in 16 bit)
    weights_only    int8 weights (per-row absmax), activations untouched
    acts_only       int8 activations (per-token absmax, outlier columns kept), weights untouched
    eq3             both, but the outlier columns multiply the original weights (the paper's eq. 3,
                    which needs a 16-bit copy of the weights; bitsandbytes and qbench keep only int8)
    bitsandbytes    bitsandbytes' Linear8bitLt in eval mode (skipped when it is not installed); on CUDA
                    its int8 matmul, as `load_in_8bit` runs it
`--thresholds 6,3` repeats llm_int8 and bitsandbytes at each outlier threshold.
Numbers for SmolLM2-135M are in reports/formats.md.
"""

import argparse
import copy

import torch
from torch import nn

from qbench.quant.int8 import Int8Linear, quantize_rows
from qbench.quant.modules import quantizable_linears, set_module


class Int8Variant(nn.Module):
    """LLM.int8() with each half switchable: int8 weights, int8 activations, outlier-column weights."""

    def __init__(self, linear: nn.Linear, int8_weights: bool, int8_acts: bool, threshold: float = 6.0):
        super().__init__()
        self.weight = linear.weight.data.float()
        codes, scale = quantize_rows(self.weight)
        self.int8_weight = codes.float() * scale[:, None]
        self.int8_weights, self.int8_acts, self.threshold = int8_weights, int8_acts, threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).float()
        w = self.int8_weight if self.int8_weights else self.weight
        if not self.int8_acts:
            y = x2 @ w.t()
        else:
            outliers = x2.abs().amax(0) > self.threshold
            codes, scale = quantize_rows(x2.masked_fill(outliers, 0))
            y = (codes.float() * scale[:, None]) @ w.t() + x2[:, outliers] @ self.weight[:, outliers].t()
        return y.view(*x.shape[:-1], -1).to(x.dtype)


def bitsandbytes_int8(linear: nn.Linear, threshold: float = 6.0) -> nn.Module:
    import bitsandbytes as bnb

    peer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                               has_fp16_weights=False, threshold=threshold)
    # A CPU tensor: Int8Params quantizes when it is moved to a device (.to in main)
    peer.weight = bnb.nn.Int8Params(linear.weight.data.cpu().clone(), requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        peer.bias = nn.Parameter(linear.bias.data.cpu().clone(), requires_grad=False)
    return peer.eval()  # training mode takes a weight-only path on the CPU


VARIANTS = {  # name -> (linear, threshold) -> module; kernel "auto": the Triton kernels on CUDA
    "baseline": lambda lin, t: lin,
    "llm_int8": lambda lin, t: Int8Linear(lin.weight.data, lin.bias, t, "auto"),
    "weights_only": lambda lin, t: Int8Variant(lin, True, False, t),
    "acts_only": lambda lin, t: Int8Variant(lin, False, True, t),
    "eq3": lambda lin, t: Int8Variant(lin, True, True, t),
    "bitsandbytes": bitsandbytes_int8,
}
THRESHOLDED = ("llm_int8", "bitsandbytes")


def main(argv=None) -> None:
    from qbench.data import perplexity_text
    from qbench.eval.perplexity import perplexity, tokenize
    from qbench.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=2, help="windows per dataset; 0 = all")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--thresholds", default="6", help="outlier thresholds of llm_int8 and bitsandbytes")
    ap.add_argument("--datasets", default="wikitext2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    texts = {name: tokenize(lm.tokenizer, perplexity_text(name)) for name in args.datasets.split(",")}
    print(f"{args.model} {args.dtype} on {args.device}, windows of {args.seqlen}: " + ", ".join(
        f"{name} {ids.numel() // args.seqlen if args.windows == 0 else args.windows}" for name, ids in texts.items()))
    runs = []
    for name in args.variants.split(","):
        if name == "bitsandbytes":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                print("bitsandbytes: not installed, skipped")
                continue
        for t in (float(v) for v in args.thresholds.split(",")) if name in THRESHOLDED else (6.0,):
            runs.append((name, t))
    for name, threshold in runs:
        model = copy.deepcopy(lm.model)
        for lname, lin in quantizable_linears(model, False).items():
            set_module(model, lname, VARIANTS[name](lin, threshold).to(args.device))
        label = f"{name} t={threshold:g}" if name in THRESHOLDED else name
        figures = []
        for ids in texts.values():
            with torch.no_grad():
                result = perplexity(model, ids, args.seqlen, max_windows=args.windows or None)
            figures.append(f"{result['ppl']:.4f}")
        print(f"{label:18} " + "  ".join(figures), flush=True)
        del model


if __name__ == "__main__":
    main()
