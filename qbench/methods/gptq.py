"""GPTQ (Frantar et al., 2022), written from the paper and the IST-DASLab/gptq reference (gptq.py, llama.py).

Block by block: the calibration inputs of block 0 are captured (qbench.calib), each block's linears
are quantized from the Hessian of their inputs, and the block's outputs, computed with the already
quantized weights, become the next block's inputs. With `method.true_sequential` the linears of a
block go in the reference order k/v/q, o, up/gate, down, each set's inputs recomputed after the
previous sets were quantized; without it, all Hessians come from the unquantized block.

Per linear (`gptq_quantize`), as the reference `fasterquant`:
- H = 2/n * sum X X^T over the calibration tokens, n = number of samples (batched updates);
- per-channel grid (group_size=-1) fitted on the whole weight before dead columns are touched;
  dead inputs (H_jj = 0): H_jj = 1, W[:, j] = 0;
- static_groups: each group's grid fitted once on the (dead-zeroed) weight, in the original order;
- act_order: columns in decreasing H_jj; non-static group grids are refitted whenever
  (i1 + i) % group_size == 0 in that permuted order, on columns W[:, col:col+group_size] of the
  lazily-updated weight (the current 128-block's own updates not yet applied, as the reference);
  g_idx maps every input channel to its group;
- damping damp_percent * mean(diag H), H^-1 = Cholesky factor (upper) of the inverse;
- columns in blocks of 128 with the lazy batch update of the rest; loss sum (w-q)^2 / [H^-1]_jj^2 / 2.
Linears that read the same input (q/k/v, gate/up) share one Hessian, so their rows are solved as one
matrix: rows are independent given H, so this is the reference result with fewer column loops.
The grid is qbench.quant.grid (the reference quantizer, scales rounded to float16); `method.zero_in_range`
false swaps in llm-awq's grid (each group's own [min, max], 0 not forced in).
"""

import functools
import time
from dataclasses import dataclass

import torch

from qbench.calib import each_block, start_blockwise
from qbench.config import resolved_bits, resolved_group_size
from qbench.quant.blocks import record_inputs, run_block, synchronize
from qbench.quant.grid import QuantizedWeight, default_g_idx, find_params
from qbench.quant.qlinear import replace_with_quantized

BLOCKSIZE = 128


@dataclass
class Hessian:
    """H = 2/n * sum over samples of X X^T, updated batch by batch as the reference's add_batch."""

    H: torch.Tensor
    nsamples: int = 0

    @classmethod
    def zeros(cls, columns: int, device) -> "Hessian":
        return cls(torch.zeros(columns, columns, device=device, dtype=torch.float32))

    def add(self, x: torch.Tensor) -> None:
        batch = x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1]).float()
        self.H *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        x = x * (2 / self.nsamples) ** 0.5
        self.H.addmm_(x.T, x)


def _one_cpu_thread(fn):
    """On a CPU, run fn on one thread: its steps are small ops and LAPACK calls where OpenMP barriers
    between 2+ threads of a busy machine cost far more than the work (measured on a shared 2-core
    machine: cholesky_inverse of a 1536^2 matrix 0.09 s on one thread, 2-3 s on two)."""

    @functools.wraps(fn)
    def wrapped(weight, *args, **kwargs):
        if weight.device.type != "cpu":
            return fn(weight, *args, **kwargs)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(weight, *args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapped


@_one_cpu_thread
@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, sym: bool,
                  damp_percent: float = 0.01, act_order: bool = False, static_groups: bool = False,
                  blocksize: int = BLOCKSIZE, zero_in_range: bool = True) -> tuple[QuantizedWeight, torch.Tensor]:
    """GPTQ of one [rows, cols] weight given its input Hessian. Returns the codes and the loss per row."""
    W = weight.float().clone()
    H = H.float().clone()
    rows, cols = W.shape
    maxq = 2**bits - 1
    scale, zero = find_params(W, bits, sym, zero_in_range)  # the per-channel grid (group_size=-1)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = None
    if static_groups and group_size != -1:
        static = [find_params(W[:, i : i + group_size], bits, sym, zero_in_range) for i in range(0, cols, group_size)]
    perm = torch.arange(cols, device=W.device)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    static_group_of = (perm // group_size).tolist() if static is not None else None
    diag = torch.arange(cols, device=W.device)
    H[diag, diag] += damp_percent * torch.mean(torch.diag(H))
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:
        raise FloatingPointError(f"GPTQ: Hessian not positive definite after damping {damp_percent}; raise "
                                 "method.damp_percent or calib.nsamples") from None

    WT = W.T.contiguous()  # column j of W is row j here: contiguous column steps
    codes, err_t = torch.empty_like(WT), torch.empty_like(WT)
    grids = [] if group_size != -1 and static is None else None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = WT[i1:i2].clone()
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):  # the only loop over single columns, inside one 128-column block
            col = i1 + i
            if static is not None:
                scale, zero = static[static_group_of[col]]
            elif grids is not None and col % group_size == 0:
                scale, zero = find_params(WT[col : col + group_size].T, bits, sym, zero_in_range)
                grids.append((scale, zero))
            w, q, err = W1[i], codes[col], err_t[col]  # views: results are written in place (fewer kernels)
            torch.clamp(torch.round(w / scale) + zero, 0, maxq, out=q)
            torch.div(w - scale * (q - zero), Hinv1[i, i], out=err)
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
        WT[i2:] -= Hinv[i1:i2, i2:].T @ err_t[i1:i2]  # lazy batch update of the later columns
    row_loss = err_t.pow(2).sum(dim=0) / 2

    invperm = torch.argsort(perm)
    grids = static if static is not None else grids if grids is not None else [(scale, zero)]
    if group_size == -1 or static is not None:
        g_idx = default_g_idx(cols, group_size, W.device)
    else:
        g_idx = default_g_idx(cols, group_size, W.device)[invperm]  # group = position in the permuted order
    qw = QuantizedWeight(
        codes=codes.T[:, invperm].to(torch.uint8).contiguous(),
        scales=torch.stack([s for s, _ in grids]).half(),
        zeros=torch.stack([z for _, z in grids]).to(torch.uint8),
        g_idx=g_idx.to(torch.int32),
        bits=bits, group_size=group_size, sym=sym,
    )
    return qw, row_loss


def split_rows(qw: QuantizedWeight, sizes: list[int]) -> list[QuantizedWeight]:
    """The QuantizedWeights of linears whose rows were stacked into one GPTQ problem."""
    parts, start = [], 0
    for n in sizes:
        parts.append(QuantizedWeight(qw.codes[start : start + n], qw.scales[:, start : start + n].contiguous(),
                                     qw.zeros[:, start : start + n].contiguous(), qw.g_idx, qw.bits, qw.group_size, qw.sym))
        start += n
    return parts


def _settings(cfg) -> dict:
    m = cfg.method
    damp = float(m.damp_percent)
    if not 0 < damp <= 1:
        raise ValueError(f"method.damp_percent must be in (0, 1], got {damp}")
    return {"bits": resolved_bits(cfg), "group_size": resolved_group_size(cfg), "sym": bool(m.sym),
            "zero_in_range": bool(m.zero_in_range), "damp_percent": damp, "act_order": bool(m.act_order),
            "static_groups": bool(m.static_groups), "true_sequential": bool(m.true_sequential), "blocksize": BLOCKSIZE,
            "block_inputs": "from the already quantized blocks"}


def _solve_set(layer, names: list[str], hessian: Hessian, s: dict) -> tuple[list[QuantizedWeight], list[float]]:
    linears = [layer.get_submodule(n) for n in names]
    W = torch.cat([lin.weight.data for lin in linears])
    qw, row_loss = gptq_quantize(W, hessian.H, s["bits"], s["group_size"], s["sym"], s["damp_percent"],
                                 s["act_order"], s["static_groups"], zero_in_range=s["zero_in_range"])
    sizes = [lin.out_features for lin in linears]
    parts = split_rows(qw, sizes)
    losses = [chunk.sum().item() for chunk in row_loss.split(sizes)]
    for lin, part in zip(linears, parts):
        lin.weight.data = part.dequantize().to(lin.weight.dtype)  # the block's next passes see Q(W)
    return parts, losses


@torch.no_grad()
def quantize(model, cfg, ctx) -> dict:
    s = _settings(cfg)
    start = start_blockwise(model, cfg, ctx)
    arch, targets, batches = start.arch, start.targets, start.batches
    timings = {"capture_s": start.capture_s, "forward_s": 0.0, "solve_s": 0.0}
    steps = [[names] for names in arch["sequential"]] if s["true_sequential"] else [arch["sequential"]]
    layer_loss, done = {}, set()
    for prefix, layer in each_block(model, arch, ctx, "gptq"):
        quantized = {}
        for step in steps:
            t = time.perf_counter()
            hessians = {}

            def on_input(name, x):
                hessians.setdefault(name, Hessian.zeros(x.shape[-1], x.device)).add(x)

            record_inputs(layer, batches, [names[0] for names in step], on_input, outputs=False)
            synchronize(ctx.device)
            timings["forward_s"] += time.perf_counter() - t
            t = time.perf_counter()
            for names in step:
                parts, losses = _solve_set(layer, names, hessians.pop(names[0]), s)
                for name, part, loss in zip(names, parts, losses):
                    quantized[name], layer_loss[prefix + name] = part, loss
            timings["solve_s"] += time.perf_counter() - t
        t = time.perf_counter()
        batches = run_block(layer, batches)  # inputs of the next block, through the quantized one
        synchronize(ctx.device)
        timings["forward_s"] += time.perf_counter() - t
        for name, qw in quantized.items():
            replace_with_quantized(layer, name, qw, cfg.kernel)
            done.add(prefix + name)
    head = model.get_output_embeddings()
    head_name = next((n for n, mod in targets.items() if mod is head), None)
    if head_name is not None:
        t = time.perf_counter()
        layer_loss[head_name] = _quantize_head(model, head_name, batches, arch, s, cfg.kernel)
        done.add(head_name)
        timings["solve_s"] += time.perf_counter() - t
    missing = sorted(set(targets) - done)
    if missing:
        raise ValueError(f"GPTQ left linears unquantized (not in the block description): {', '.join(missing[:5])}")
    return {"quantized_layers": len(done), "settings": s, "calib": start.info, "timings": timings,
            "loss_total": sum(layer_loss.values()), "layer_loss": layer_loss}


def _quantize_head(model, name: str, batches: list[tuple], arch: dict, s: dict, kernel: str) -> float:
    """lm_head (quantize_lm_head=true): GPTQ on the final norm's outputs of the quantized model."""
    norm, head = model.get_submodule(arch["final_norm"]), model.get_submodule(name)
    hessian = Hessian.zeros(head.in_features, head.weight.device)
    for hidden, _ in batches:
        hessian.add(norm(hidden))
    qw, row_loss = gptq_quantize(head.weight.data, hessian.H, s["bits"], s["group_size"], s["sym"],
                                 s["damp_percent"], s["act_order"], s["static_groups"], zero_in_range=s["zero_in_range"])
    replace_with_quantized(model, name, qw, kernel)
    return row_loss.sum().item()


def export(model, cfg, ctx, path: str) -> None:
    """The GPTQ checkpoint layout (qbench.quant.gptq_format): desc_act = act_order."""
    from qbench.quant.gptq_format import save_checkpoint

    s = _settings(cfg)
    extra = {k: s[k] for k in ("damp_percent", "static_groups", "true_sequential")}
    extra["lm_head"] = bool(cfg.quantize_lm_head)
    save_checkpoint(model, ctx.tokenizer, path, "gptq", s["act_order"], extra)
