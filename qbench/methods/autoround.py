"""AutoRound (Cheng et al., 2023, "Optimize Weight Rounding via Signed Gradient Descent for the
Quantization of LLMs"), written from the paper and the intel/auto-round reference (wrapper.py,
data_type/int.py int_asym, sign_round/quantizer.py quantize_block, sign_sgd.py).

Block by block, every linear of the block gets three learnable tensors:
- V, one rounding offset per weight, in [-0.5, 0.5], starting at 0;
- alpha, beta, one per (output row, group), in [0.5, 1], starting at 1: the group's range
  [min(w, 0), max(w, 0)] shrinks to [alpha * min, beta * max] (min/max tuning).
The weight seen by the block is fake-quantized with straight-through rounding (the grid of
qbench.quant.grid, 0 always in range, scales rounded to float16, the rule of the reference's int_asym):
    scale = (beta * max - alpha * min) / maxq,  zero = round(-alpha * min / scale)
    W_q = scale * (clamp(round(W / scale + V) + zero, 0, maxq) - zero)
and the three tensors minimise the block output MSE
    || block_q(X_q) - block(X_fp) ||^2 / n      (mean over all output elements, float32)
where X_fp are the float model's inputs of the block (the float chain, as GPTQ never keeps it) and
X_q the outputs of the already quantized blocks before it (the reference's enable_quanted_input=True;
block 0 gets the same inputs in both). Per iteration: a batch of `batch_size` calibration samples
(cyclic: a shuffled order, reshuffled once fewer than a batch remain, the reference's IndexSampler),
one forward and backward, then signed gradient descent p -= lr_i * sign(grad) with the learning
rate decaying linearly to 0 over `iters` (lr_i = lr * (1 - i / iters)). The parameters of the
iterate with the lowest batch loss are kept (iterate 0 is plain RTN; the loss is taken before the
step, as the reference). iters=0 is RTN on the same grid.

Where this differs from the reference (recorded in the run's settings):
- the ranges are clamped: the reference clamps alpha/beta to [0, 1] and V not at all, and relies on
  the learning-rate budget (the linear decay sums to lr * (iters + 1) / 2, 0.5025 at the defaults) to
  stay inside the paper's [-0.5, 0.5] and [0.5, 1]; here those are hard bounds, so a larger lr cannot
  leave them;
- the loss is scaled by 1000 before backward as the reference does (float16 gradients would
  underflow; the sign is unchanged), but the block runs in the model's dtype without autocast;
- sym=true uses qbench's symmetric grid (absmax range, zero (maxq+1)/2: the reference's int_sym_gptq),
  not the reference's default full-range int_sym, which GPTQ checkpoints cannot hold;
- lm_head (quantize_lm_head=true) is plain RTN; no gradient accumulation, one block at a time
  (the reference's nblocks=1, gradient_accumulate_steps=1 defaults), no loss mask (calibration
  windows have no padding), lr=null is 1/iters (the reference also doubles it for <= 3 bits when
  iters >= 1000, a later heuristic not in the paper).
"""

import time

import torch
from torch import nn
from torch.nn import functional as F

from qbench.calib import each_block, start_blockwise
from qbench.config import resolved_bits, resolved_group_size
from qbench.quant.blocks import block_output, synchronize
from qbench.quant.grid import QuantizedWeight, default_g_idx, rtn_quantize
from qbench.quant.qlinear import replace_with_quantized
from qbench.quant.modules import set_module

V_RANGE = (-0.5, 0.5)
MINMAX_RANGE = (0.5, 1.0)
LOSS_SCALE = 1000.0


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


class TunedLinear(nn.Module):
    """A linear during tuning: its weight fake-quantized from the learnable V, alpha, beta.

    The weight is kept in float32 as [out, groups, size], the last group padded with zeros: the range
    always contains 0, so the padding changes no group's min or max, and it is cut off again."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: int, sym: bool, minmax: bool):
        super().__init__()
        out_f, in_f = linear.weight.shape
        self.in_features, self.bits, self.group_size, self.sym = in_f, bits, group_size, sym
        self.size = in_f if group_size == -1 else group_size
        groups = -(-in_f // self.size)
        w = F.pad(linear.weight.detach().float(), (0, groups * self.size - in_f))
        self.register_buffer("w", w.view(out_f, groups, self.size))
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.v = nn.Parameter(torch.zeros_like(self.w))
        self.alpha = nn.Parameter(torch.ones(out_f, groups, 1, device=w.device), requires_grad=minmax)
        self.beta = nn.Parameter(torch.ones(out_f, groups, 1, device=w.device), requires_grad=minmax)

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """scale, zero [out, groups, 1], differentiable in alpha and beta (round of the zero by STE)."""
        maxq = 2**self.bits - 1
        xmin = self.w.amin(dim=-1, keepdim=True).clamp(max=0) * self.alpha
        xmax = self.w.amax(dim=-1, keepdim=True).clamp(min=0) * self.beta
        if self.sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = torch.where(xmin < 0, -xmax, xmin)
        dead = (xmin == 0) & (xmax == 0)  # an all-zero group: range [-1, 1], as grid.find_params
        xmin, xmax = torch.where(dead, -1.0, xmin), torch.where(dead, 1.0, xmax)
        scale = ((xmax - xmin) / maxq).half().float()  # float16 scales, as stored (grid._stored_scale)
        scale = torch.where(scale == 0, torch.full_like(scale, 2.0**-24), scale)
        if self.sym:
            return scale, torch.full_like(scale, (maxq + 1) / 2)
        return scale, round_ste(-xmin / scale).clamp(0, maxq)

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale, zero = self.grid()
        q = torch.clamp(round_ste(self.w / scale + self.v) + zero, 0, 2**self.bits - 1)
        return q, scale, zero

    def weight_q(self) -> torch.Tensor:
        """[out, in] fake-quantized weight, float32."""
        q, scale, zero = self.codes()
        return (scale * (q - zero)).flatten(1)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight_q().to(x.dtype), bias)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.v.clamp_(*V_RANGE)
        self.alpha.clamp_(*MINMAX_RANGE)
        self.beta.clamp_(*MINMAX_RANGE)

    @torch.no_grad()
    def quantized(self) -> QuantizedWeight:
        q, scale, zero = self.codes()
        return QuantizedWeight(
            codes=q.flatten(1)[:, : self.in_features].to(torch.uint8),
            scales=scale[..., 0].T.contiguous().half(),  # [groups, out]
            zeros=zero[..., 0].T.contiguous().to(torch.uint8),
            g_idx=default_g_idx(self.in_features, self.group_size, self.w.device),
            bits=self.bits, group_size=self.group_size, sym=self.sym,
        )


class CyclicSampler:
    """Batches of sample indices from a shuffled order; a fresh shuffle once fewer than a batch remain
    (the reference's IndexSampler: every sample is seen once per pass)."""

    def __init__(self, n: int, batch: int, generator: torch.Generator):
        self.n, self.batch, self.generator = n, batch, generator
        self.order, self.pos = self._shuffle(), 0

    def _shuffle(self) -> list[int]:
        return torch.randperm(self.n, generator=self.generator).tolist()

    def next(self) -> list[int]:
        if self.pos + self.batch > self.n:
            self.order, self.pos = self._shuffle(), 0
        self.pos += self.batch
        return self.order[self.pos - self.batch : self.pos]


def kwargs_for(kwargs: dict, n: int, captured: int) -> dict:
    """The block kwargs for a batch of n samples. The captured kwargs are those of the first capture
    batch (`captured` samples); calibration windows share positions and have no padding, so a tensor
    with one entry per sample is cut to n entries and broadcast ones ([1, ...]) are kept."""

    def cut(v):
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        if torch.is_tensor(v) and v.dim() and captured > 1 and v.shape[0] == captured:
            if n > captured:
                raise ValueError(f"AutoRound: a batch of {n} samples but block kwargs for {captured}; lower method.batch_size")
            return v[:n]
        return v

    return {k: cut(v) for k, v in kwargs.items()}


@torch.no_grad()
def forward_all(block: nn.Module, x: torch.Tensor, kwargs: dict, captured: int) -> torch.Tensor:
    """The block's outputs for all samples of x [N, S, D], in chunks of the capture batch size."""
    outs = []
    for start in range(0, x.shape[0], captured):
        chunk = x[start : start + captured]
        outs.append(block_output(block, chunk, kwargs_for(kwargs, chunk.shape[0], captured)))
    return torch.cat(outs)


def tune_block(block: nn.Module, names: list[str], fp_in: torch.Tensor, q_in: torch.Tensor, kwargs: dict,
               captured: int, s: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, QuantizedWeight], dict]:
    """AutoRound of one block (its linears `names`): returns the float block's outputs on fp_in (the next
    block's float inputs), the quantized weights of the best iterate, and the losses. The block is
    given back with its float linears (the caller swaps in QuantLinears)."""
    fp_out = forward_all(block, fp_in, kwargs, captured)
    block.requires_grad_(False)  # only V, alpha, beta are trained
    originals = {name: block.get_submodule(name) for name in names}
    tuned = {}
    for name, linear in originals.items():
        tuned[name] = TunedLinear(linear, s["bits"], s["group_size"], s["sym"], s["enable_minmax_tuning"])
        set_module(block, name, tuned[name])
    rounding = [t.v for t in tuned.values()]
    minmax = [p for t in tuned.values() for p in (t.alpha, t.beta)] if s["enable_minmax_tuning"] else []
    batch = min(s["batch_size"], fp_in.shape[0])
    sampler, batch_kwargs = CyclicSampler(fp_in.shape[0], batch, generator), kwargs_for(kwargs, batch, captured)
    best_loss, best, best_iter, first_loss = float("inf"), None, 0, None
    for i in range(s["iters"]):
        idx = sampler.next()
        with torch.enable_grad():
            out = block_output(block, q_in[idx], batch_kwargs)
            loss = F.mse_loss(out.float(), fp_out[idx].float())
            (loss * LOSS_SCALE).backward()
        value = loss.item()
        first_loss = value if first_loss is None else first_loss
        if value < best_loss:  # the parameters that gave this loss, before this iteration's step
            best_loss, best_iter = value, i
            best = [(t.v.detach().clone(), t.alpha.detach().clone(), t.beta.detach().clone()) for t in tuned.values()]
        decay = 1 - i / s["iters"]
        with torch.no_grad():
            for params, lr in ((rounding, s["lr"]), (minmax, s["minmax_lr"])):
                for p in params:
                    p.add_(torch.sign(p.grad), alpha=-lr * decay)
                    p.grad = None
            for t in tuned.values():
                t.clamp_()
    if best is not None:
        with torch.no_grad():
            for t, (v, alpha, beta) in zip(tuned.values(), best):
                t.v.copy_(v), t.alpha.copy_(alpha), t.beta.copy_(beta)
    quantized = {name: t.quantized() for name, t in tuned.items()}
    for name, linear in originals.items():
        set_module(block, name, linear)
    info = {"loss_iter0": first_loss, "loss_best": None if best is None else best_loss, "best_iter": best_iter,
            "v_absmax": max(t.v.abs().max().item() for t in tuned.values()),  # how far the kept iterate moved
            "minmax_min": min(min(t.alpha.min().item(), t.beta.min().item()) for t in tuned.values())}
    return fp_out, quantized, info


def _settings(cfg) -> dict:
    m = cfg.method
    iters = int(m.iters)
    lr = (1.0 / iters if iters else 0.0) if m.lr is None else float(m.lr)
    minmax_lr = lr if m.minmax_lr is None else float(m.minmax_lr)
    if lr < 0 or minmax_lr < 0:
        raise ValueError(f"method.lr and method.minmax_lr must be >= 0, got {lr}, {minmax_lr}")
    return {"bits": resolved_bits(cfg), "group_size": resolved_group_size(cfg), "sym": bool(m.sym),
            "iters": iters, "lr": lr, "minmax_lr": minmax_lr, "batch_size": int(m.batch_size),
            "enable_minmax_tuning": bool(m.enable_minmax_tuning), "seed": int(m.seed),
            "optimizer": "signsgd", "lr_schedule": "linear to 0 over iters", "best": "lowest batch loss",
            "v_range": list(V_RANGE), "minmax_range": list(MINMAX_RANGE), "loss": "mse mean float32 x1000",
            "grid": "0 in range, float16 scales", "sampler": "cyclic shuffled",
            "block_inputs": "quantized blocks' outputs; targets from the float chain"}


def quantize(model, cfg, ctx) -> dict:
    s = _settings(cfg)
    start = start_blockwise(model, cfg, ctx)
    arch, targets = start.arch, start.targets
    captured, kwargs = start.batches[0][0].shape[0], start.batches[0][1]
    fp_in = torch.cat([h for h, _ in start.batches])
    q_in = fp_in
    generator = torch.Generator().manual_seed(s["seed"])
    timings, blocks, done = {"capture_s": start.capture_s, "tune_s": 0.0}, {}, set()
    for prefix, layer in each_block(model, arch, ctx, "autoround"):
        t = time.perf_counter()
        names = [n for n, mod in layer.named_modules() if isinstance(mod, nn.Linear) and prefix + n in targets]
        fp_out, quantized, blocks[prefix.rstrip(".")] = tune_block(layer, names, fp_in, q_in, kwargs, captured, s, generator)
        for name, qw in quantized.items():
            replace_with_quantized(layer, name, qw, cfg.kernel)
            done.add(prefix + name)
        q_in = forward_all(layer, q_in, kwargs, captured)  # the next block's inputs, through the quantized one
        fp_in = fp_out
        synchronize(ctx.device)
        timings["tune_s"] += time.perf_counter() - t
    for name in sorted(set(targets) - done):  # lm_head (quantize_lm_head=true): plain RTN
        qw = rtn_quantize(targets[name].weight.data, s["bits"], s["group_size"], s["sym"])
        replace_with_quantized(model, name, qw, cfg.kernel)
        blocks[name] = "rtn (outside the decoder blocks)"
        done.add(name)
    return {"quantized_layers": len(done), "settings": s, "calib": start.info, "timings": timings, "blocks": blocks}


def export(model, cfg, ctx, path: str) -> None:
    """A GPTQ-layout checkpoint without act-order (qbench.quant.gptq_format): the learned rounding and
    ranges are in the integer codes, scales and zeros already."""
    from qbench.quant.gptq_format import save_checkpoint

    s = _settings(cfg)
    extra = {k: s[k] for k in ("iters", "lr", "minmax_lr", "batch_size", "enable_minmax_tuning", "seed")}
    extra["lm_head"] = bool(cfg.quantize_lm_head)
    save_checkpoint(model, ctx.tokenizer, path, "autoround", False, extra)
