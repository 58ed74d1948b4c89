"""Where the host time of an eager decode step goes, per weight format (run on the GPU machine).

A SmolLM2-135M-shaped Llama with random fp16 weights; each format's layers are built directly (no
calibration). For each format: ms per eager decode token (batch 1, dynamic KV cache) and the Python
functions with the most own time over the timed steps (cProfile), with their call counts per token.

    python -m research.host_profile --formats fp16,w4a16,int8,fp8,nf4,q5_0 --steps 32 --top 18
"""

import argparse
import cProfile
import pstats
import time

import torch

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=4096)


def build_layer(fmt: str, linear: torch.nn.Linear) -> torch.nn.Module:
    if fmt == "w4a16":
        from qbench.quant.grid import rtn_quantize
        from qbench.quant.qlinear import QuantLinear
        return QuantLinear.from_quantized(rtn_quantize(linear.weight.data, 4, 128, False), linear.bias, kernel="triton")
    if fmt == "int8":
        from qbench.quant.int8 import Int8Linear
        return Int8Linear(linear.weight.data, linear.bias, 6.0, kernel="triton")
    if fmt == "fp8":
        from qbench.quant.fp8 import FP8Linear
        return FP8Linear(linear.weight.data, linear.bias, kernel="triton")
    if fmt in ("nf4", "fp4"):
        from qbench.quant.nf4 import Linear4bit
        return Linear4bit.from_linear(linear, fmt, 64, True, kernel="triton")
    from qbench.quant.gguf_linear import GGUFLinear
    return GGUFLinear.from_linear(linear, fmt.upper(), kernel="triton")


def decode_steps(model, steps: int, prof: cProfile.Profile | None = None) -> float:
    """ms per token of `steps` eager decode steps after a 16-token prompt."""
    from qbench.eval.speed import no_cudnn_attention
    from qbench.models import cache_keyword, output_cache

    kv = cache_keyword(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 16), device="cuda")
    with torch.no_grad(), no_cudnn_attention("cuda"):
        out = model(ids, use_cache=True)
        cache, tok = output_cache(out), out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if prof is not None:
            prof.enable()
        for _ in range(steps):
            out = model(tok, **{kv: cache}, use_cache=True)
            cache, tok = output_cache(out), out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        if prof is not None:
            prof.disable()
    return 1000 * (time.perf_counter() - t0) / steps


def main(argv=None) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from qbench.quant.modules import quantizable_linears, set_module

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="fp16,w4a16,int8,fp8,nf4,q5_0")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--top", type=int, default=18)
    args = ap.parse_args(argv)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for fmt in args.formats.split(","):
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).half().eval()
        if fmt != "fp16":
            for name, lin in quantizable_linears(model).items():
                set_module(model, name, build_layer(fmt, lin).cuda())
        decode_steps(model, 4)  # warm-up: tuning, compilation
        plain = decode_steps(model, args.steps)
        prof = cProfile.Profile()
        profiled = decode_steps(model, args.steps, prof)
        stats = pstats.Stats(prof)
        print(f"\n== {fmt}: {plain:.2f} ms/token eager ({profiled:.2f} under cProfile); top own time per token:")
        rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:args.top]
        for (path, line, func), (_, calls, own, cum, _) in rows:
            where = path.split("site-packages/")[-1].split("/work/main/")[-1]
            print(f"  {1000 * own / args.steps:7.3f} ms own {1000 * cum / args.steps:7.3f} cum "
                  f"{calls / args.steps:7.1f} calls  {func} ({where}:{line})")
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
