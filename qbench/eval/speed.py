"""Weight storage, latency, throughput and peak memory of a (quantized) model.

weight_stats (always recorded, any device): bytes of every parameter and buffer as stored
(`model_bytes`), and over the quantized linears (every module with in_features/out_features, the
lm_head only when quantize_lm_head) the bytes of all their parameters and buffers except biases,
i.e. packed weights, scales, zeros and indices, divided by their in*out weights: `bits_per_weight`.

measure_speed (eval.speed=true), on random token ids (never zeros), after one warm-up, the median of
at most `repeats` timed repeats (stopping once three agree within 2 %), timed with CUDA events on a GPU:
    prefill_ms_<N>       one forward of 1 x N tokens for each N of prefill_tokens, filling a KV cache;
                         prefill_ms is the first; vram_peak_prefill_<N>_gib the peak GPU memory of it
    speed_path           how generation is timed. cuda_graph (the default on a GPU, how a serving stack
                         runs decode): a static KV cache, the prompt prefilled in one forward, then each
                         decode step one replay of a CUDA graph of the step, so no Python or kernel-launch
                         overhead is timed; static_cache (CPU: the same code minus the capture); eager
                         (eval.speed_opts.cuda_graph=false, or a model that cannot be captured, which
                         records decode_graph_error): the eager figures below stand in.
                         eval.speed_opts.compile=true: compile+cuda_graph (compile+static_cache on a
                         CPU), the step's forward through torch.compile before the capture (fuses the
                         elementwise kernels between the matmuls, as gpt-fast does)
    tok_s_b<B>           served: B x new_tokens generated tokens / time of prefill (prompt_tokens) + decode
    decode_ms_per_token  served: batch 1, time of one decode step
    eager_tok_s_b<B>, eager_decode_ms_per_token   the same from a Python loop of forwards with
                         transformers' dynamic cache, at eager_batch_sizes (a secondary figure)
    copy_gbs             GPU: bandwidth of a plain 1 GiB device copy (read + write), measured in the run
    decode_bytes_per_token  bytes a batch-1 decode step reads (weights, less the input embedding table)
    decode_bandwidth_fraction  decode_bytes_per_token / decode_ms_per_token over copy_gbs: how close a
                         decode step comes to the bandwidth bound
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


def timed_repeats(run, repeats: int, tolerance: float = 0.02, min_repeats: int = 3) -> list[float]:
    """Times of run() (each returns its ms): at most `repeats`, stopping early once the last
    `min_repeats` lie within `tolerance` of their median (a stable figure needs no more repeats)."""
    times = []
    for _ in range(max(int(repeats), 1)):
        times.append(run())
        last = sorted(times[-min_repeats:])
        if len(times) >= min_repeats and last[-1] - last[0] <= tolerance * last[len(last) // 2]:
            break
    return times


@torch.no_grad()
def static_generate(model, prompt: torch.Tensor, steps: int, repeats: int, device: str,
                    cache_factory=None, compile_step: bool = False) -> tuple[float, float, torch.Tensor]:
    """Fixed-length greedy generation as a serving stack runs it: a static KV cache, the prompt
    prefilled in one forward, then `steps` decode steps, each one replay of a CUDA graph of the step
    (GPU; elsewhere the step is called directly, the same code path minus the capture, for tests).
    Returns (ms of prefill + all decode steps, ms per decode step, the [B, steps + 1] greedy tokens),
    medians over the timed repeats (timed_repeats); every repeat prefills and decodes the same
    positions again. cache_factory(model, max_cache_len, batch) makes the cache (a quantized one,
    qbench.kvcache); None: transformers' StaticCache."""
    from transformers import StaticCache

    batch, n = prompt.shape
    length = n + steps + 8
    cache = cache_factory(model, length, batch) if cache_factory else StaticCache(config=model.config, max_cache_len=length)
    kv = cache_keyword(model)
    positions = torch.arange(n, device=device)
    tok, pos = torch.zeros(batch, 1, dtype=torch.long, device=device), torch.tensor([n], device=device)

    def prefill():
        for layer in getattr(cache, "layers", []):  # newer transformers count the cached tokens per layer
            cached = getattr(layer, "cumulative_length", None)
            if isinstance(cached, torch.Tensor):
                cached.fill_(0)
        logits = model(prompt, **{kv: cache}, cache_position=positions, use_cache=True, logits_to_keep=1).logits
        tok.copy_(logits[:, -1:].argmax(-1))
        pos.fill_(n)

    decode = torch.compile(model, dynamic=False) if compile_step else model

    def step():
        logits = decode(tok, **{kv: cache}, cache_position=pos, use_cache=True, logits_to_keep=1).logits
        tok.copy_(logits[:, -1:].argmax(-1))
        pos.add_(1)

    with no_cudnn_attention(device):
        capture = device == "cuda"
        side = torch.cuda.Stream() if capture else None  # warm-up off the default stream, as capture wants
        if capture:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if capture else contextlib.nullcontext():
            prefill()
            for _ in range(3):  # kernel tuning, compilation and the cache's lazy allocation, before the capture
                step()
        run = step
        if capture:
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            run = graph.replay

        prefill()
        tokens = [tok.clone()]
        for _ in range(steps):
            run()
            tokens.append(tok.clone())
        splits = []

        def generate() -> float:
            timer = Timer(device)
            timer.mark()
            prefill()
            timer.mark()
            for _ in range(steps):
                run()
            timer.mark()
            prefill_ms, decode_ms = timer.intervals_ms()
            splits.append(decode_ms / steps)
            return prefill_ms + decode_ms

        totals = timed_repeats(generate, repeats)
    return statistics.median(totals), statistics.median(splits), torch.cat(tokens, dim=1)


def static_decode(model, prompt: torch.Tensor, steps: int, repeats: int, device: str,
                  cache_factory=None) -> tuple[float, torch.Tensor]:
    """static_generate's (ms per decode step, tokens)."""
    _, step_ms, tokens = static_generate(model, prompt, steps, repeats, device, cache_factory)
    return step_ms, tokens


def _forward(model, ids, past=None):
    return model(ids, **{cache_keyword(model): past}, use_cache=True, logits_to_keep=1)


@torch.no_grad()
def prefill_ms(model, vocab: int, tokens: int, repeats: int, device: str, gen: torch.Generator) -> float:
    ids = torch.randint(0, vocab, (1, tokens), generator=gen).to(device)
    _forward(model, ids)  # warm-up

    def once() -> float:
        timer = Timer(device)
        timer.mark()
        _forward(model, ids)
        timer.mark()
        return timer.intervals_ms()[0]

    return statistics.median(timed_repeats(once, repeats))


@torch.no_grad()
def generate_timed(model, prompt: torch.Tensor, new_tokens: int, device: str,
                   cache=None) -> tuple[list[float], torch.Tensor]:
    """Greedy fixed-length generation: ([prefill ms, decode step ms, ...], [batch, new_tokens] tokens);
    cache: an empty cache to fill (a quantized one, qbench.kvcache), else transformers' dynamic cache."""
    timer = Timer(device)
    tokens = []
    timer.mark()
    out = _forward(model, prompt, cache)
    timer.mark()
    for step in range(new_tokens):
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
        if step == new_tokens - 1:
            break
        out = _forward(model, tokens[-1], output_cache(out))
        timer.mark()
    return timer.intervals_ms(), torch.cat(tokens, dim=1)


def copy_bandwidth_gbs(device: str, gib: float = 1.0, copies: int = 10) -> float:
    """Device memory bandwidth of a plain copy (bytes read + written per second, GB/s): the bound a
    weight-streaming decode step can reach, measured in the same run as the model."""
    if device != "cuda":
        return 0.0
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    timer = Timer(device)
    timer.mark()
    for _ in range(copies):
        dst.copy_(src)
    timer.mark()
    return 2 * src.numel() * copies / (timer.intervals_ms()[0] / 1000) / 1e9


def decode_bytes_per_token(model) -> int:
    """Bytes a batch-1 decode step reads: every parameter and buffer once, except the input embedding
    table (one row is gathered) unless the output layer shares it. The KV cache is left out."""
    total = _tensor_bytes(list(model.parameters()) + list(model.buffers()))
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(embed, "weight", None)
    if weight is None or (head is not None and getattr(head, "weight", None) is weight):
        return total
    return total - _tensor_bytes([weight])


def _prefill_lengths(opts: dict) -> list[int]:
    value = opts["prefill_tokens"]
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


@torch.no_grad()
def measure_speed(model, cfg, device: str, kv_cache: str = "none") -> dict:
    """Prefill at each eval.speed_opts.prefill_tokens, then generation on the served path (the
    module docstring); eager generation at eager_batch_sizes as a secondary figure. Generation keeps
    its keys and values in a `kv_cache` cache (qbench.kvcache kind: none, int8, fp8_e4m3, ...)."""
    from qbench.kvcache import make_dynamic_cache, static_factory

    cache_factory = None if kv_cache == "none" else static_factory(kv_cache)
    dynamic = None if kv_cache == "none" else (lambda: make_dynamic_cache(model, kv_cache))
    opts = dict(cfg.eval.speed_opts)
    lengths = _prefill_lengths(opts)
    batches = [int(b) for b in opts["batch_sizes"]]
    eager_batches = [int(b) for b in opts.get("eager_batch_sizes") or []]
    if device != "cuda":
        lengths = [min(lengths[0], CPU_CAPS["prefill_tokens"])]
        opts.update({k: min(int(opts[k]), cap) for k, cap in CPU_CAPS.items() if k != "prefill_tokens"})
        batches, eager_batches = [1], [1]
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    new, repeats = max(int(opts["new_tokens"]), 2), int(opts["repeats"])
    metrics = {"speed_device": device, "speed_prefill_tokens": lengths[0],
               "speed_prompt_tokens": int(opts["prompt_tokens"]), "speed_new_tokens": new}
    with no_cudnn_attention(device):
        for i, tokens in enumerate(lengths):
            reset_peak(device)
            ms = prefill_ms(model, vocab, tokens, repeats, device, gen)
            metrics[f"prefill_ms_{tokens}"] = ms
            if i == 0:
                metrics["prefill_ms"] = ms
            if device == "cuda":
                metrics[f"vram_peak_prefill_{tokens}_gib"] = torch.cuda.max_memory_allocated() / 2**30
        prompts = {b: torch.randint(0, vocab, (b, int(opts["prompt_tokens"])), generator=gen).to(device)
                   for b in sorted(set(batches) | set(eager_batches))}
        eager = _eager_speed(model, prompts, eager_batches, new, repeats, device, dynamic)
        metrics.update({f"eager_{k}": v for k, v in eager.items()})
        served = _served_speed(model, prompts, batches, new, repeats, device, opts, cache_factory)
        if served["speed_path"] == "eager":  # the eager figures stand in for the served ones
            served.update(_eager_speed(model, prompts, [b for b in batches if b not in eager_batches], new, repeats,
                                       device, dynamic))
            served.update({k: v for k, v in eager.items()})
        metrics.update(served)
    if device == "cuda":
        metrics["copy_gbs"] = copy_bandwidth_gbs(device)
        metrics["decode_bytes_per_token"] = decode_bytes_per_token(model)
        if metrics.get("decode_ms_per_token") and metrics["copy_gbs"]:
            achieved = metrics["decode_bytes_per_token"] / (metrics["decode_ms_per_token"] / 1000) / 1e9
            metrics["decode_bandwidth_fraction"] = achieved / metrics["copy_gbs"]
    return metrics


def _served_speed(model, prompts: dict, batches: list, new: int, repeats: int, device: str, opts: dict,
                  cache_factory) -> dict:
    """tok_s_b<B> and decode_ms_per_token from static_generate (speed_path cuda_graph on a GPU,
    static_cache elsewhere); a model that cannot be captured records decode_graph_error and speed_path eager."""
    if device == "cuda" and not opts.get("cuda_graph", True):
        return {"speed_path": "eager"}
    compile_step = bool(opts.get("compile", False))
    out = {"speed_path": ("compile+" if compile_step else "") + ("cuda_graph" if device == "cuda" else "static_cache")}
    try:
        for batch in batches:
            total, step, _ = static_generate(model, prompts[batch], new, repeats, device, cache_factory, compile_step)
            out[f"tok_s_b{batch}"] = batch * new / (total / 1000)
            if batch == 1:
                out["decode_ms_per_token"] = step
    except Exception as err:  # noqa: BLE001 - a model transformers cannot run with a static cache, or capture
        if device == "cuda":
            torch.cuda.synchronize()
        first = str(err).splitlines()[0][:300] if str(err) else ""
        return {"speed_path": "eager", "decode_graph_error": f"{type(err).__name__}: {first}"}
    return out


def _eager_speed(model, prompts: dict, batches: list, new: int, repeats: int, device: str, new_cache=None) -> dict:
    """tok_s_b<B> and decode_ms_per_token of a Python loop of forwards with transformers' dynamic cache."""
    metrics = {}
    for batch in batches:
        prompt = prompts[batch]
        fresh = new_cache or (lambda: None)
        generate_timed(model, prompt, new, device, fresh())  # warm-up
        steps = []

        def once() -> float:
            times, _ = generate_timed(model, prompt, new, device, fresh())
            steps.append(statistics.fmean(times[1:]))
            return sum(times)

        totals = timed_repeats(once, repeats)
        metrics[f"tok_s_b{batch}"] = batch * new / (statistics.median(totals) / 1000)
        if batch == 1:
            metrics["decode_ms_per_token"] = statistics.median(steps)
    return metrics


_folded = {"allocated": 0, "reserved": 0}  # peaks seen before a reset_peak, so PeakMemory still sees them


def reset_peak(device: str) -> None:
    """Start a fresh peak-memory window (e.g. one prefill) without losing the run's peak."""
    if device != "cuda" or not torch.cuda.is_available():
        return
    torch.cuda.synchronize()
    _folded["allocated"] = max(_folded["allocated"], torch.cuda.max_memory_allocated())
    _folded["reserved"] = max(_folded["reserved"], torch.cuda.max_memory_reserved())
    torch.cuda.reset_peak_memory_stats()


class PeakMemory:
    """Peak GPU memory while a model is evaluated. `vram_peak_run_gib` leaves out what other objects
    held when the evaluation started (e.g. the unquantized model kept for the next run of a sweep)."""

    def __init__(self, model, device: str):
        self.cuda = device == "cuda" and torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            _folded.update(allocated=0, reserved=0)
            own = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()) if t.is_cuda)
            self.other = torch.cuda.memory_allocated() - own

    def metrics(self) -> dict:
        if not self.cuda:
            return {}
        torch.cuda.synchronize()
        gib = 2.0**30
        peak = max(torch.cuda.max_memory_allocated(), _folded["allocated"])
        reserved = max(torch.cuda.max_memory_reserved(), _folded["reserved"])
        return {"vram_peak_allocated_gib": peak / gib, "vram_peak_reserved_gib": reserved / gib,
                "vram_peak_run_gib": (peak - self.other) / gib}
