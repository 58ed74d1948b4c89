"""Weight storage, latency, throughput and peak memory of a (quantized) model.

weight_stats (always recorded, any device): bytes of every parameter and buffer as stored
(`model_bytes`), and over the quantized linears (every module with in_features/out_features, the
lm_head only when quantize_lm_head) the bytes of all their parameters and buffers except biases,
i.e. packed weights, scales, zeros and indices, divided by their in*out weights: `bits_per_weight`.

measure_speed (eval.speed=true), on random token ids (never zeros), after one warm-up, median of
`repeats` timed repeats, timed with CUDA events on a GPU:
    prefill_ms           one forward of 1 x prefill_tokens, filling the KV cache
    decode_ms_per_token  batch 1, greedy, KV cache: mean time of one decode step (median of repeats)
    tok_s_b<B>           B x new_tokens generated tokens / time of prefill (prompt_tokens) + decode
Generation is fixed-length: greedy argmax tokens, no stopping at EOS. On a CPU the measurement is
kept tiny (at most 64 prefill tokens, 8-token prompt, 4 new tokens, batch 1, 2 repeats) and the
record says speed_device=cpu.
"""

import statistics
import time

import torch

CPU_CAPS = {"prefill_tokens": 64, "prompt_tokens": 8, "new_tokens": 4, "repeats": 2}


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def quantized_modules(model, include_lm_head: bool) -> dict:
    """name -> module for each linear-like module (outermost only), lm_head only when asked."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = {}
    for name, module in model.named_modules():
        if not (hasattr(module, "in_features") and hasattr(module, "out_features")):
            continue
        if module is head and not include_lm_head:
            continue
        if any(name.startswith(outer + ".") for outer in found):
            continue
        found[name] = module
    return found


def weight_stats(model, include_lm_head: bool = False) -> dict:
    total = _tensor_bytes(list(model.parameters()) + list(model.buffers()))
    linear_bytes, weights = 0, 0
    for module in quantized_modules(model, include_lm_head).values():
        tensors = [t for n, t in list(module.named_parameters()) + list(module.named_buffers())
                   if n.rpartition(".")[2] != "bias"]
        linear_bytes += _tensor_bytes(tensors)
        weights += int(module.in_features) * int(module.out_features)
    out = {"model_bytes": total, "linear_weight_bytes": linear_bytes, "linear_weights": weights}
    if weights:
        out["bits_per_weight"] = 8 * linear_bytes / weights
    return out


class Timer:
    """Elapsed milliseconds between marks: CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.marks = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1000 for a, b in zip(self.marks, self.marks[1:])]


def _forward(model, ids, past=None):
    return model(ids, past_key_values=past, use_cache=True, logits_to_keep=1)


@torch.no_grad()
def prefill_ms(model, vocab: int, tokens: int, repeats: int, device: str, gen: torch.Generator) -> float:
    ids = torch.randint(0, vocab, (1, tokens), generator=gen).to(device)
    _forward(model, ids)  # warm-up
    times = []
    for _ in range(repeats):
        timer = Timer(device)
        timer.mark()
        _forward(model, ids)
        timer.mark()
        times.append(timer.intervals_ms()[0])
    return statistics.median(times)


@torch.no_grad()
def generate_timed(model, prompt: torch.Tensor, new_tokens: int, device: str) -> tuple[list[float], torch.Tensor]:
    """Greedy fixed-length generation: ([prefill ms, decode step ms, ...], [batch, new_tokens] tokens)."""
    timer = Timer(device)
    tokens = []
    timer.mark()
    out = _forward(model, prompt)
    timer.mark()
    for step in range(new_tokens):
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
        if step == new_tokens - 1:
            break
        out = _forward(model, tokens[-1], out.past_key_values)
        timer.mark()
    return timer.intervals_ms(), torch.cat(tokens, dim=1)


@torch.no_grad()
def measure_speed(model, cfg, device: str) -> dict:
    opts = dict(cfg.eval.speed_opts)
    batches = [int(b) for b in opts["batch_sizes"]]
    if device != "cuda":
        opts.update({k: min(int(opts[k]), cap) for k, cap in CPU_CAPS.items()})
        batches = [1]
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    new = max(int(opts["new_tokens"]), 2)
    metrics = {"speed_device": device, "speed_prefill_tokens": int(opts["prefill_tokens"]),
               "speed_prompt_tokens": int(opts["prompt_tokens"]), "speed_new_tokens": new}
    metrics["prefill_ms"] = prefill_ms(model, vocab, int(opts["prefill_tokens"]), int(opts["repeats"]), device, gen)
    for batch in batches:
        prompt = torch.randint(0, vocab, (batch, int(opts["prompt_tokens"])), generator=gen).to(device)
        generate_timed(model, prompt, new, device)  # warm-up
        totals, steps = [], []
        for _ in range(int(opts["repeats"])):
            times, _ = generate_timed(model, prompt, new, device)
            totals.append(sum(times))
            steps.append(statistics.fmean(times[1:]))
        metrics[f"tok_s_b{batch}"] = batch * new / (statistics.median(totals) / 1000)
        if batch == 1:
            metrics["decode_ms_per_token"] = statistics.median(steps)
    return metrics


class PeakMemory:
    """Peak GPU memory while a model is evaluated. `vram_peak_run_gib` leaves out what other objects
    held when the evaluation started (e.g. the unquantized model kept for the next run of a sweep)."""

    def __init__(self, model, device: str):
        self.cuda = device == "cuda" and torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            own = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()) if t.is_cuda)
            self.other = torch.cuda.memory_allocated() - own

    def metrics(self) -> dict:
        if not self.cuda:
            return {}
        torch.cuda.synchronize()
        gib = 2.0**30
        peak = torch.cuda.max_memory_allocated()
        return {"vram_peak_allocated_gib": peak / gib, "vram_peak_reserved_gib": torch.cuda.max_memory_reserved() / gib,
                "vram_peak_run_gib": (peak - self.other) / gib}
