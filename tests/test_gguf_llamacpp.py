"""Our GGUF files against llama.cpp's own quantizer (llama-cpp-python), on small random Llama models.

qbench exports an F32 GGUF of a model; llama.cpp quantizes it (no importance matrix); qbench quantizes
the same model itself and exports it. Every tensor must have the same type and the same bytes."""

import copy
import ctypes

import gguf
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from qbench.methods import RunContext
from qbench.methods import gguf as gguf_method
from qbench.quant import gguf_mix
from qbench.quant.gguf_export import write_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")


def random_llama(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    for p in model.parameters():  # weights at a realistic scale, with a few outliers
        p.data.normal_(0, 0.05)
        p.data.view(-1)[:: 997] *= 8
    return model


def llama_cpp_quantize(src: str, dst: str, choice: str, pure: bool) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = gguf_mix.file_type(choice)
    params.pure = pure
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) == 0


def tensors(path) -> dict[str, tuple[str, np.ndarray]]:
    return {t.name: (t.tensor_type.name, np.array(t.data)) for t in gguf.GGUFReader(str(path)).tensors}


def ours(model, choice: str, path) -> dict:
    model = copy.deepcopy(model)
    cfg = OmegaConf.create({"method": {"type": choice}, "quantize_lm_head": True, "kernel": "auto"})
    gguf_method.quantize(model, cfg, RunContext(None, "cpu", torch.float32, quiet=True))
    write_gguf(model, str(path), gguf_mix.file_type(choice))
    return tensors(path)


def assert_same_file(mine: dict, theirs: dict) -> None:
    assert set(mine) == set(theirs)
    types = {n: (mine[n][0], theirs[n][0]) for n in mine if mine[n][0] != theirs[n][0]}
    assert not types, f"tensor types differ (ours, llama.cpp): {types}"
    differ = [n for n in mine if not np.array_equal(mine[n][1], theirs[n][1])]
    assert not differ, f"bytes differ in {differ}"


@pytest.fixture(scope="module")
def whole_blocks(tmp_path_factory):
    """Every row a whole number of 256-element super-blocks: each tensor gets exactly the asked type."""
    model = random_llama(hidden=256, ffn=512, layers=2, heads=4, kv_heads=2)
    path = tmp_path_factory.mktemp("gguf") / "f32.gguf"
    write_gguf(model, str(path), 0, float_only=True)
    return model, path


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_block_types_equal_llama_cpp(whole_blocks, qtype, tmp_path):
    model, f32 = whole_blocks
    llama_cpp_quantize(str(f32), str(tmp_path / "ref.gguf"), qtype, pure=True)
    theirs = tensors(tmp_path / "ref.gguf")
    assert sum(t == qtype for t, _ in theirs.values()) == 1 + 2 * 7  # token_embd and every linear
    assert_same_file(ours(model, qtype, tmp_path / "ours.gguf"), theirs)


@pytest.fixture(scope="module")
def odd_rows(tmp_path_factory):
    """Rows of 320 (not whole super-blocks: the fallbacks) except ffn_down (512); 16 layers for the
    layer-dependent rules (use_more_bits, Q3_K_M's first n/16 layers)."""
    model = random_llama(hidden=320, ffn=512, layers=16, heads=5, kv_heads=1, seed=1)
    path = tmp_path_factory.mktemp("gguf") / "f32.gguf"
    write_gguf(model, str(path), 0, float_only=True)
    return model, path


@pytest.mark.parametrize("mix", ["Q3_K_M", "Q4_K_M", "Q5_K_M"])
def test_mixes_equal_llama_cpp(odd_rows, mix, tmp_path):
    model, f32 = odd_rows
    llama_cpp_quantize(str(f32), str(tmp_path / "ref.gguf"), mix, pure=False)
    theirs = tensors(tmp_path / "ref.gguf")
    mine = ours(model, mix, tmp_path / "ours.gguf")
    assert_same_file(mine, theirs)
    assert len({t for t, _ in mine.values()}) >= 4  # a real mix: several block types besides F32


def test_f32_export_is_the_model(whole_blocks):
    """Tensors are the model's weights (q/k rows in llama.cpp's rotary order), norms included."""
    model, f32 = whole_blocks
    found = tensors(f32)
    assert found["token_embd.weight"][0] == "F32" and "output.weight" not in found  # tied
    assert np.array_equal(found["blk.1.ffn_down.weight"][1], model.model.layers[1].mlp.down_proj.weight.detach().numpy())
    assert np.array_equal(found["output_norm.weight"][1], model.model.norm.weight.detach().numpy())
    q = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    rows = found["blk.0.attn_q.weight"][1]
    assert not np.array_equal(rows, q) and np.array_equal(np.sort(rows, axis=0), np.sort(q, axis=0))
    reader = gguf.GGUFReader(str(f32))
    assert reader.fields["llama.block_count"].contents() == 2
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2


def test_hugging_face_tokenizer_export(smollm2, tmp_path):
    """A model without a source GGUF file gets its tokenizer through gguf's vocab readers: the same
    tokens, types, merges and special ids as the original GGUF file of SmolLM2; llama.cpp reads it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qbench.models import resolve_source
    from qbench.quant.gguf_export import read_metadata

    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    path = str(tmp_path / "hf.gguf")
    write_gguf(LlamaForCausalLM(config), path, 0, tokenizer=smollm2.tokenizer)
    ours = {key: value for key, value, *_ in read_metadata(path)}
    source = {key: value for key, value, *_ in read_metadata(resolve_source("smollm2-135m").path)}
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        assert ours[key] == source[key], key
    assert ours["tokenizer.ggml.pre"] == "default" and ours["llama.vocab_size"] == 49152
    llm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    try:
        text = "Hello world, this is a test of 1234 tokens."
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == smollm2.tokenizer(text).input_ids
    finally:
        llm.close()


def test_no_weight_repacking_turns_extra_buffer_types_off_while_loading():
    """The AMX work-around (qbench.eval.llamacpp): Llama() starts from defaults without extra buffer
    types inside the context, and from llama.cpp's own defaults again after it."""
    from qbench.eval.llamacpp import no_weight_repacking

    if not hasattr(llama_cpp.llama_model_default_params(), "use_extra_bufts"):
        pytest.skip("this llama.cpp has no use_extra_bufts")
    assert llama_cpp.llama_model_default_params().use_extra_bufts
    with no_weight_repacking(llama_cpp):
        assert not llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts
