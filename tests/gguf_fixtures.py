"""A tiny random Llama written as a GGUF file with `gguf`'s own writer, the way llama.cpp's
converter lays it out (q/k rows permuted for its rotary layout, byte-level BPE vocabulary with
a chat template), and the Hugging Face tensors it was made from, for comparison."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

HIDDEN, HEADS, KV_HEADS, LAYERS, MLP = 32, 4, 2, 2, 64
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MERGES = ("Ġ t", "h e", "Ġt he", "a n", "Ġ a")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokens() -> list[str]:
    """GPT-2's byte-level alphabet: one printable character per byte, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD))
    printable += list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def vocabulary() -> list[str]:
    """Special tokens first, then the 256 byte tokens, then one token per merge."""
    return [*SPECIALS, *byte_tokens(), *(m.replace(" ", "") for m in MERGES)]


def random_llama_tensors(seed: int) -> dict[str, torch.Tensor]:
    """Hugging Face Llama tensors (tied embeddings) of the tiny shape, drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    vocab, head_dim = len(vocabulary()), HIDDEN // HEADS

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.1

    tensors = {"model.embed_tokens.weight": rand(vocab, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": 1 + rand(HIDDEN),
            p + "post_attention_layernorm.weight": 1 + rand(HIDDEN),
            p + "self_attn.q_proj.weight": rand(HEADS * head_dim, HIDDEN),
            p + "self_attn.k_proj.weight": rand(KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.v_proj.weight": rand(KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.o_proj.weight": rand(HIDDEN, HEADS * head_dim),
            p + "mlp.gate_proj.weight": rand(MLP, HIDDEN),
            p + "mlp.up_proj.weight": rand(MLP, HIDDEN),
            p + "mlp.down_proj.weight": rand(HIDDEN, MLP),
        }
    tensors["model.norm.weight"] = 1 + rand(HIDDEN)
    return tensors


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter reorders q/k rows from halves to interleaved pairs per head."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The Hugging Face tensors under GGUF names and in llama.cpp's layout."""
    out = {
        "token_embd.weight": tensors["model.embed_tokens.weight"].numpy(),
        "output_norm.weight": tensors["model.norm.weight"].numpy(),
    }
    for i in range(LAYERS):
        for hf, gg in GGUF_NAMES.items():
            value = tensors[f"model.layers.{i}.{hf}.weight"].numpy()
            if gg == "attn_q":
                value = llama_cpp_permute(value, HEADS)
            elif gg == "attn_k":
                value = llama_cpp_permute(value, KV_HEADS)
            out[f"blk.{i}.{gg}.weight"] = np.ascontiguousarray(value, dtype=np.float32)
    return out


def write_tiny_gguf(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a tiny random Llama with its tokenizer to `path`; return its HF tensors."""
    import gguf

    tensors = random_llama_tensors(seed)
    vocab = vocabulary()
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(MLP)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(vocab))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(vocab)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(vocab) - len(SPECIALS)))
    writer.add_token_merges(list(MERGES))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, value in gguf_tensors(tensors).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors
