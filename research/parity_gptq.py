"""RTN and GPTQ parity: qbench's quantizers against the IST-DASLab/gptq reference code on the same model,
calibration samples and perplexity windows.

    python -m research.parity_gptq --ref /path/to/IST-DASLab-gptq --out parity.json [--device cpu]
        [--configs rtn:4:128 gptq:4:128 gptq:4:128:act ...] [--nsamples 128] [--calib-seqlen 2048]
        [--seqlen 2048] [--windows N]

The reference checkout is imported from --ref for the run only (its gptq.py and quant.py; never copied
here). Both sides start from one qbench config: the model, `calib=c4` windows (qbench.calib) and the
block inputs are qbench's, so what differs is the quantization alone:
- reference RTN: quant.Quantizer(bits, perchannel=True, sym=False) fitted on each group's columns and
  applied with quant.quantize, float32 scales (the reference's `--nearest`, per group as its GPTQ fits groups);
- reference GPTQ: gptq.GPTQ per linear, add_batch on the inputs of the linear (hooks, as llama.py's
  llama_sequential), fasterquant(percdamp, groupsize, actorder, static_groups); true-sequential sets
  k/v/q, o, up/gate, down as llama.py; the block's outputs through its quantized weights feed the next block;
- qbench: `qbench.runner.run` of method=rtn|gptq (zero_in_range=true: the reference's grid) with the
  same settings.
Perplexity is qbench's (WikiText-2 test, non-overlapping windows). Prints and writes JSON.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from qbench.paths import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def parse_config(text: str) -> dict:
    """method:bits:group[:act] -> settings; `act` = act-order (GPTQ)."""
    parts = text.split(":")
    return {"method": parts[0], "bits": int(parts[1]), "group_size": int(parts[2]), "act_order": "act" in parts[3:]}


@torch.no_grad()
def reference_rtn(model, bits: int, group_size: int, targets: dict) -> None:
    from quant import Quantizer, quantize  # the reference checkout (sys.path)

    for linear in targets.values():
        W = linear.weight.data.float()
        size = W.shape[1] if group_size == -1 else group_size
        out = torch.empty_like(W)
        for i in range(0, W.shape[1], size):
            q = Quantizer()
            q.configure(bits, perchannel=True, sym=False, mse=False)
            q.find_params(W[:, i : i + size], weight=True)
            out[:, i : i + size] = quantize(W[:, i : i + size], q.scale, q.zero, q.maxq)
        linear.weight.data = out.to(linear.weight.dtype)


@torch.no_grad()
def reference_gptq(model, cfg, ctx, bits: int, group_size: int, act_order: bool) -> None:
    from gptq import GPTQ  # the reference checkout (sys.path)
    from quant import Quantizer

    from qbench.calib import each_block, start_blockwise
    from qbench.quant.blocks import record_inputs, run_block

    start = start_blockwise(model, cfg, ctx)
    batches = start.batches
    for _, layer in each_block(model, start.arch, ctx, "reference gptq"):
        for names in start.arch["sequential"]:  # true-sequential: one set of linears sharing an input
            solvers = {}
            for name in names:
                solvers[name] = GPTQ(layer.get_submodule(name))
                solvers[name].quantizer = Quantizer()
                solvers[name].quantizer.configure(bits, perchannel=True, sym=False, mse=False)

            def on_input(_, x, names=names):
                for name in names:
                    solvers[name].add_batch(x, None)  # [batch, tokens, in]: the reference's 3-D case

            record_inputs(layer, batches, [names[0]], on_input, outputs=False)
            for name in names:
                solvers[name].fasterquant(percdamp=float(cfg.method.damp_percent), groupsize=group_size,
                                          actorder=act_order, static_groups=False)
                solvers[name].free()
        batches = run_block(layer, batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", required=True, help="a checkout of github.com/IST-DASLab/gptq")
    parser.add_argument("--out", required=True)
    parser.add_argument("--configs", nargs="+", default=["rtn:4:128", "rtn:3:128", "gptq:4:128", "gptq:3:128"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--calib-seqlen", type=int, default=2048)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=None, help="perplexity windows (default: the whole test set)")
    parser.add_argument("--results", default=None, help="qbench results dir (default: <out>.results)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.ref).resolve()))
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None  # the reference syncs after each solve

    from qbench import runner
    from qbench.data import perplexity_text
    from qbench.eval.perplexity import perplexity, tokenize
    from qbench.methods import RunContext
    from qbench.models import load_model
    from qbench.quant.modules import quantizable_linears

    results = args.results or f"{args.out}.results"
    common = [f"model={args.model}", f"device={args.device}", f"dtype={args.dtype}", "eval.ppl.datasets=[wikitext2]",
              f"eval.ppl.seqlen={args.seqlen}", f"eval.ppl.max_windows={'null' if args.windows is None else args.windows}",
              "calib=c4", f"calib.nsamples={args.nsamples}", f"calib.seqlen={args.calib_seqlen}", "calib.seed=0",
              "quiet=true", "wandb.mode=disabled", f"results_dir={results}"]
    rows = []
    for text in args.configs:
        c = parse_config(text)
        cfg = compose(*common, f"method={c['method']}", f"bits={c['bits']}", f"group_size={c['group_size']}",
                      "method.zero_in_range=true", "method.sym=false",
                      *([f"method.act_order={str(c['act_order']).lower()}", "method.static_groups=false",
                         "method.true_sequential=true"]
                        if c["method"] == "gptq" else []))
        ours = runner.run(cfg)
        assert ours["status"] == "ok", ours.get("error")
        loaded = load_model(args.model, args.device, args.dtype)
        model, tokenizer = loaded.model, loaded.tokenizer
        ctx = RunContext(tokenizer, args.device, next(model.parameters()).dtype, cfg.data_dir, True)
        t0 = time.perf_counter()
        if c["method"] == "rtn":
            reference_rtn(model, c["bits"], c["group_size"], quantizable_linears(model, False))
        else:
            reference_gptq(model, cfg, ctx, c["bits"], c["group_size"], c["act_order"])
        ref_s = time.perf_counter() - t0
        ids = tokenize(tokenizer, perplexity_text("wikitext2", cfg.data_dir), key=f"wikitext2:{cfg.data_dir}")
        ref_ppl = perplexity(model, ids, args.seqlen, args.windows)["ppl"]
        row = {"config": text, **c, "qbench_ppl": ours["metrics"]["ppl_wikitext2"], "reference_ppl": ref_ppl,
               "diff_pct": 100 * (ours["metrics"]["ppl_wikitext2"] / ref_ppl - 1),
               "qbench_quantize_s": ours["timings"]["quantize_s"], "reference_quantize_s": ref_s,
               "qbench_run_id": ours["run_id"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model, loaded
    fp16 = [r for r in runner_records(results) if r.get("method") == "fp16"]
    summary = {"settings": vars(args), "fp16_ppl": fp16[-1]["metrics"]["ppl_wikitext2"] if fp16 else None,
               "env": {"torch": torch.__version__}, "rows": rows}
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")


def runner_records(results: str) -> list[dict]:
    from qbench.records import read_records

    return read_records(results)


if __name__ == "__main__":
    main()
