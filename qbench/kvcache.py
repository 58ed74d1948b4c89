"""Quantized KV caches (kv_cache=int8|fp8): keys and values stored as 8-bit codes plus one float16
scale per token and head, dequantized on every read for attention.

    int8  symmetric absmax: s = max|x| / 127 over the head_dim values of one (batch, head, token),
          codes round(x / s) in [-127, 127]
    fp8   s = max|x| / 448 (e4m3; 57344 for e5m2), codes x / s cast to the format (kept as uint8 bytes,
          which index_copy_ and cat handle on every device)
The scale is rounded to float16 before the codes are computed, so codes * scale is exactly what attention
reads. A read returns the whole cache dequantized, the token just written included: attention sees
quantized keys and values at every position, as a decode step that writes its token into the cache and
reads the cache back.

make_dynamic_cache(model, kind): grows with each forward (eager generation, perplexity).
make_static_cache(model, kind, max_cache_len, batch): [batch, kv_heads, max_cache_len, head_dim] buffers
allocated on the first write and then written in place (index_copy_ at the layer's cumulative_length, a
tensor), so a decode step can be captured in a CUDA graph. kind "none" gives transformers' own caches.
kv_bytes(config, kind, tokens, batch, dtype): the cache's bytes from the shapes, scales included.
"""

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticCache, StaticLayer

KINDS = ("none", "int8", "fp8_e4m3", "fp8_e5m2")
CODE_MAX = {"int8": 127.0, "fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
CODE_DTYPE = {"int8": torch.int8, "fp8_e4m3": torch.uint8, "fp8_e5m2": torch.uint8}
SCALE_DTYPE = torch.float16
SCALE_MIN = torch.finfo(torch.float16).tiny  # an all-zero vector still gets a finite scale


def cache_kind(kv_cfg) -> str:
    """The kind of a kv_cache config entry (conf/kv_cache): none, int8, fp8_e4m3 or fp8_e5m2; no entry: none."""
    if not kv_cfg or kv_cfg.get("name", "none") == "none":
        return "none"
    if kv_cfg["name"] == "fp8":
        return f"fp8_{kv_cfg.get('format', 'e4m3')}"
    return str(kv_cfg["name"])


def _check(kind: str) -> str:
    kind = "fp8_e4m3" if kind == "fp8" else kind
    if kind not in KINDS:
        raise ValueError(f"unknown KV cache kind {kind!r}; valid: {', '.join(KINDS)}")
    return kind


def quantize(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., head_dim] -> (codes of CODE_DTYPE[kind], float16 scales [..., 1])."""
    kind = _check(kind)
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / CODE_MAX[kind]).clamp_min(SCALE_MIN).to(SCALE_DTYPE)
    scaled = x.float() / scale.float()
    if kind == "int8":
        return scaled.round().clamp(-127, 127).to(torch.int8), scale
    limit = CODE_MAX[kind]  # the float16 scale may round down a hair: keep the largest value in range
    return scaled.clamp(-limit, limit).to(FP8_DTYPES[kind]).view(torch.uint8), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, kind: str, dtype) -> torch.Tensor:
    kind = _check(kind)
    values = codes.float() if kind == "int8" else codes.view(FP8_DTYPES[kind]).float()
    return (values * scale.float()).to(dtype)


class QuantizedDynamicLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are codes (its scales beside them), concatenated per forward."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = _check(kind)

    def lazy_initialization(self, key_states, value_states=None):
        self.dtype, self.device = key_states.dtype, key_states.device
        empty = key_states.shape[:2] + (0,)
        self.keys = torch.empty(empty + key_states.shape[3:], dtype=CODE_DTYPE[self.kind], device=self.device)
        self.values = torch.empty(empty + (value_states if value_states is not None else key_states).shape[3:],
                                  dtype=CODE_DTYPE[self.kind], device=self.device)
        self.key_scales = torch.empty(empty + (1,), dtype=SCALE_DTYPE, device=self.device)
        self.value_scales = torch.empty(empty + (1,), dtype=SCALE_DTYPE, device=self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k, ks = quantize(key_states, self.kind)
        v, vs = quantize(value_states, self.kind)
        self.keys, self.key_scales = torch.cat([self.keys, k], dim=-2), torch.cat([self.key_scales, ks], dim=-2)
        self.values, self.value_scales = torch.cat([self.values, v], dim=-2), torch.cat([self.value_scales, vs], dim=-2)
        return (dequantize(self.keys, self.key_scales, self.kind, self.dtype),
                dequantize(self.values, self.value_scales, self.kind, self.dtype))


class QuantizedStaticLayer(StaticLayer):
    """A StaticLayer of code and scale buffers written in place at cumulative_length (a tensor, as
    transformers' own StaticLayer keeps it; eval.speed's static-cache decode resets it between repeats)."""

    def __init__(self, kind: str, max_cache_len: int, batch: int):
        super().__init__(max_cache_len=max_cache_len)
        self.kind, self.batch = _check(kind), batch
        self.cumulative_length = torch.tensor(0, dtype=torch.long)

    def lazy_initialization(self, key_states, value_states=None):
        value_states = key_states if value_states is None else value_states
        if key_states.shape[0] != self.batch:
            raise ValueError(f"static KV cache made for batch {self.batch}, got batch {key_states.shape[0]}")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.num_heads = key_states.shape[1]
        rows = (self.batch, self.num_heads, self.max_cache_len)
        code = CODE_DTYPE[self.kind]
        self.keys = torch.zeros(rows + key_states.shape[3:], dtype=code, device=self.device)
        self.values = torch.zeros(rows + value_states.shape[3:], dtype=code, device=self.device)
        self.key_scales = torch.zeros(rows + (1,), dtype=SCALE_DTYPE, device=self.device)
        self.value_scales = torch.zeros(rows + (1,), dtype=SCALE_DTYPE, device=self.device)
        self.cumulative_length = self.cumulative_length.to(self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # Positions from the layer's own counter (not cache_position, which transformers 5.17 no longer
        # passes to update): tensor ops only, so the step stays capturable.
        position = torch.arange(key_states.shape[-2], device=self.device) + self.cumulative_length
        self.cumulative_length.add_(key_states.shape[-2])
        for codes, scales, states in ((self.keys, self.key_scales, key_states),
                                      (self.values, self.value_scales, value_states)):
            q, s = quantize(states, self.kind)
            codes.index_copy_(2, position, q)
            scales.index_copy_(2, position, s)
        # Unwritten slots are zero codes and scales, i.e. zeros, and the static mask hides them.
        return (dequantize(self.keys, self.key_scales, self.kind, self.dtype),
                dequantize(self.values, self.value_scales, self.kind, self.dtype))

    def get_seq_length(self):
        return self.cumulative_length if self.is_initialized else 0


def _attention_layers(config) -> int:
    """Layers of full attention; other kinds (sliding windows, linear attention) are refused."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None)
    kinds = set(getattr(config, "layer_types", None) or ["sliding_attention" if window else "full_attention"])
    if kinds != {"full_attention"}:
        raise ValueError(f"quantized KV caches support full-attention models only (layer types {sorted(kinds)})")
    return int(config.num_hidden_layers)


def make_dynamic_cache(model, kind: str) -> Cache:
    kind = _check(kind)
    if kind == "none":
        return DynamicCache(config=model.config)
    return Cache(layers=[QuantizedDynamicLayer(kind) for _ in range(_attention_layers(model.config))])


def make_static_cache(model, kind: str, max_cache_len: int, batch: int = 1) -> Cache:
    """kind none: transformers' StaticCache (which takes its batch from the first forward)."""
    kind = _check(kind)
    if kind == "none":
        return StaticCache(config=model.config, max_cache_len=max_cache_len)
    layers = [QuantizedStaticLayer(kind, max_cache_len, batch) for _ in range(_attention_layers(model.config))]
    return Cache(layers=layers)


def static_factory(kind: str):
    """For eval.speed's static-cache decode (cache_factory=...): (model, max_cache_len, batch=1) -> a cache."""
    return lambda model, max_cache_len, batch=1: make_static_cache(model, kind, max_cache_len, batch)


def kv_bytes(config, kind: str, tokens: int, batch: int = 1, dtype=torch.float16) -> int:
    """Bytes of keys and values for `tokens` positions: elements of `dtype` (the run's) for none; one code
    byte per element plus one float16 scale per (layer, K or V, batch, kv head, token) otherwise."""
    kind = _check(kind)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    if kind == "none":
        per_vector = head_dim * torch.empty((), dtype=dtype).element_size()
    else:
        per_vector = head_dim * 1 + torch.empty((), dtype=SCALE_DTYPE).element_size()
    return 2 * int(config.num_hidden_layers) * batch * kv_heads * tokens * per_vector
