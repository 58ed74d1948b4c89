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
    decode_ms_per_token_graph   (GPU, eval.speed_opts.cuda_graph) batch 1, static KV cache, one decode
                         step captured in a CUDA graph and replayed new_tokens times: the GPU's time per
                         token without Python and launch overhead, which dominate the eager figure for
                         small models on a slow host (a model that cannot be captured records
                         `decode_graph_error` instead)
On a GPU, attention runs without SDPA's cuDNN backend: torch 2.11 picks it on the H100 and it rebuilds
its graph whenever the KV length changes, i.e. at every decode step (2.3 ms of CPU per attention call,
60 % of a SmolLM2 decode step, reports/kernels/NOTES.md).
Generation is fixed-length: greedy argmax tokens, no stopping at EOS. On a CPU the measurement is
kept tiny (at most 64 prefill tokens, 8-token prompt, 4 new tokens, batch 1, 2 repeats) and the
record says speed_device=cpu.
"""

import contextlib
import statistics
import time

import torch

from qbench.models import cache_keyword, output_cache

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


def no_cudnn_attention(device: str):
    """SDPA limited to flash, memory-efficient and math attention on a GPU (a no-op elsewhere)."""
    if device != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@torch.no_grad()
def static_decode(model, prompt: torch.Tensor, steps: int, repeats: int, device: str,
                  cache_factory=None) -> tuple[float, torch.Tensor]:
    """Greedy decode at batch 1 with a static KV cache: (ms per decode step, median of repeats; the
    [1, steps + 1] tokens). On a GPU the step is captured once in a CUDA graph and replayed; elsewhere
    it is called directly (the same code path minus the capture, for tests). Each repeat decodes the
    same positions again from the prompt's first token. cache_factory(model, max_cache_len) makes the
    cache (qbench.kvcache.static_factory(kind): a quantized one); None: transformers' StaticCache."""
    from transformers import StaticCache

    n = prompt.shape[1]
    length = n + steps + 8
    cache = cache_factory(model, length) if cache_factory else StaticCache(config=model.config, max_cache_len=length)
    kv = cache_keyword(model)
    with no_cudnn_attention(device):
        out = model(prompt, **{kv: cache}, cache_position=torch.arange(n, device=device), use_cache=True,
                    logits_to_keep=1)
        first = out.logits[:, -1:].argmax(-1)
        tok, pos = first.clone(), torch.tensor([n], device=device)

        def step():
            logits = model(tok, **{kv: cache}, cache_position=pos, use_cache=True, logits_to_keep=1).logits
            tok.copy_(logits[:, -1:].argmax(-1))
            pos.add_(1)

        capture = device == "cuda"
        side = torch.cuda.Stream() if capture else None  # warm-up off the default stream, as capture wants
        if capture:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if capture else contextlib.nullcontext():
            for _ in range(3):  # kernel tuning, compilation and the cache's lazy allocation, before the capture
                step()
        run = step
        if capture:
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            run = graph.replay

        def rewind():
            pos.fill_(n)
            tok.copy_(first)
            for layer in getattr(cache, "layers", []):  # newer transformers count the cached tokens per layer
                length = getattr(layer, "cumulative_length", None)
                if isinstance(length, torch.Tensor):
                    length.fill_(n)

        rewind()
        tokens = [first.clone()]
        for _ in range(steps):
            run()
            tokens.append(tok.clone())
        times = []
        for _ in range(repeats):
            rewind()
            timer = Timer(device)
            timer.mark()
            for _ in range(steps):
                run()
            timer.mark()
            times.append(timer.intervals_ms()[0] / steps)
    return statistics.median(times), torch.cat(tokens, dim=1)


def _forward(model, ids, past=None):
    return model(ids, **{cache_keyword(model): past}, use_cache=True, logits_to_keep=1)


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
        out = _forward(model, tokens[-1], output_cache(out))
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
    with no_cudnn_attention(device):
        metrics.update(_eager_speed(model, opts, batches, vocab, new, device, gen))
    if device == "cuda" and opts.get("cuda_graph", True):
        try:
            prompt = torch.randint(0, vocab, (1, int(opts["prompt_tokens"])), generator=gen).to(device)
            metrics["decode_ms_per_token_graph"] = static_decode(model, prompt, new, int(opts["repeats"]), device)[0]
        except Exception as err:  # noqa: BLE001 - a model transformers cannot run with a static cache, or capture
            metrics["decode_graph_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
            torch.cuda.synchronize()
    return metrics


def _eager_speed(model, opts: dict, batches: list, vocab: int, new: int, device: str, gen) -> dict:
    metrics = {"prefill_ms": prefill_ms(model, vocab, int(opts["prefill_tokens"]), int(opts["repeats"]), device, gen)}
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
