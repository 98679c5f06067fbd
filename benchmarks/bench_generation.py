"""Greedy decoding speed: a hand-written KV-cache loop vs transformers' ``model.generate``.

Both decoders get the same encoded prompts in the same length-sorted batches (left padded, with
attention masks) and the same stop strings; outputs must be identical (greedy), and items/s are
measured in interleaved rounds so background load hits both alike. Models: the testbed's math
expert on its test prompts, and a larger random Llama (same tokenizer, random weights).

The hand loop was the package's decoder until this benchmark found it no faster than
``model.generate`` by a clear margin (results in ``benchmarks/results/generation.md``); it is
kept here only so the comparison can be rerun. The ``model.generate`` side is the package's
``greedy_generate``, which stops rows with a text-decoding stopping criterion because
transformers' ``stop_strings=`` fails on word-level tokenizers such as the testbed's (probed
below and reported in the JSON).

    python benchmarks/bench_generation.py [--testbed testbed] [--n 200] [--rounds 3]

The last line printed is a JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
)

from mergekit_sae.evaluate import resolve_device, subsample
from mergekit_sae.evaluate.forward import forward_cached, left_pad, model_device, pad_id
from mergekit_sae.evaluate.generation import (
    eos_ids,
    greedy_generate,
    prepare_prompts,
    texts_of,
)

REPO = Path(__file__).resolve().parents[1]
Decoder = Callable[..., list[str]]


@torch.inference_mode()
def hand_loop_generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    stop: Sequence[str],
    batch_size: int,
) -> list[str]:
    """The hand-written loop: KV cache, per-step stop check, finished rows leave the batch."""
    encoded, order = prepare_prompts(model, tokenizer, prompts, max_new_tokens)
    result = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        tokens = _hand_loop_batch(
            model, tokenizer, [encoded[i] for i in batch], max_new_tokens, tuple(stop)
        )
        for index, text in zip(batch, texts_of(model, tokenizer, tokens, stop), strict=True):
            result[index] = text
    return result


def _hand_loop_batch(
    model, tokenizer, sequences: list[list[int]], max_new_tokens: int, stop: tuple[str, ...]
) -> list[list[int]]:
    """Generated token ids of one batch; a row leaves the batch (and the cache) once it stops."""
    device = model_device(model)
    ids, mask, positions = left_pad(sequences, pad_id(tokenizer), device)
    eos = eos_ids(model, tokenizer)
    cache = DynamicCache(config=model.config)
    generated: list[list[int]] = [[] for _ in sequences]
    active = list(range(len(sequences)))
    step_ids = ids
    for step in range(max_new_tokens):
        next_ids = forward_cached(model, step_ids, mask, positions, cache).argmax(-1)
        finished = torch.isin(next_ids, eos) if eos.numel() else torch.zeros_like(next_ids).bool()
        for row, token in zip(active, next_ids.tolist(), strict=True):
            generated[row].append(token)
        if stop:
            texts = tokenizer.batch_decode([generated[r] for r in active], skip_special_tokens=True)
            finished |= torch.as_tensor([any(s in t for s in stop) for t in texts], device=device)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        keep = (~finished).nonzero().flatten()
        if len(keep) < len(active):
            cache.batch_select_indices(keep)
            active = [active[i] for i in keep.tolist()]
            next_ids, mask, positions = next_ids[keep], mask[keep], positions[keep]
        step_ids = next_ids[:, None]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        positions = positions[:, -1:] + 1
    return generated


def random_llama(tokenizer, hidden: int, layers: int, seed: int = 0) -> LlamaForCausalLM:
    """A random Llama over the tokenizer's vocabulary (default init, fp32, eval mode)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def probe_stop_strings(model, tokenizer) -> str | None:
    """None when ``model.generate(stop_strings=...)`` runs with this tokenizer, else the error."""
    ids = torch.tensor([tokenizer("a")["input_ids"]], device=model_device(model))
    try:
        model.generate(
            ids, max_new_tokens=2, do_sample=False, stop_strings=["\n"], tokenizer=tokenizer
        )
    except Exception as e:  # any failure is the finding
        return f"{type(e).__name__}: {e}"
    return None


def measure(
    decoders: dict[str, Decoder], model, tokenizer, prompts: list[str], args
) -> dict[str, object]:
    """Items/s of each decoder over interleaved rounds (after one warm-up), outputs compared."""
    kwargs = {"max_new_tokens": args.max_new_tokens, "stop": ["\n"], "batch_size": args.batch_size}
    outputs = {name: fn(model, tokenizer, prompts[:8], **kwargs) for name, fn in decoders.items()}
    rates: dict[str, list[float]] = {name: [] for name in decoders}
    for _ in range(args.rounds):
        for name, fn in decoders.items():
            start = time.perf_counter()
            outputs[name] = fn(model, tokenizer, prompts, **kwargs)
            rates[name].append(len(prompts) / (time.perf_counter() - start))
    texts = list(outputs.values())
    identical = all(t == texts[0] for t in texts)
    median = {name: statistics.median(r) for name, r in rates.items()}
    return {
        "items": len(prompts),
        "identical_outputs": identical,
        "mean_output_words": statistics.mean(len(t.split()) for t in texts[0]),
        "items_per_s": median,
        "rounds_items_per_s": rates,
        "ratio_hand_over_generate": median["hand_loop"] / median["model_generate"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", type=Path, default=REPO / "testbed")
    parser.add_argument("--n", type=int, default=200, help="test prompts of the math task")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512, help="hidden size of the random Llama")
    parser.add_argument("--layers", type=int, default=4, help="layers of the random Llama")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.testbed / "math")
    lines = (args.testbed / "data" / "math" / "test.jsonl").read_text().splitlines()
    prompts = [json.loads(line)["prompt"] for line in subsample(lines, args.n, seed=0)]
    models = {
        "testbed math expert": AutoModelForCausalLM.from_pretrained(args.testbed / "math"),
        f"random Llama (hidden {args.hidden}, {args.layers} layers)": random_llama(
            tokenizer, args.hidden, args.layers
        ),
    }
    decoders = {"hand_loop": hand_loop_generate, "model_generate": greedy_generate}
    print(
        f"device {device}, {dtype}; batch size {args.batch_size}; max_new_tokens "
        f"{args.max_new_tokens}; {torch.get_num_threads()} CPU thread(s); {args.rounds} rounds"
    )
    stop_strings_error = probe_stop_strings(next(iter(models.values())), tokenizer)
    print(
        f"model.generate(stop_strings=...) with the testbed tokenizer: {stop_strings_error or 'ok'}"
    )
    results = {}
    for label, model in models.items():
        model.to(device=device, dtype=dtype).eval()
        r = measure(decoders, model, tokenizer, prompts, args)
        results[label] = r
        rates = r["items_per_s"]
        print(
            f"{label:40} hand loop {rates['hand_loop']:8.1f} it/s   model.generate "
            f"{rates['model_generate']:8.1f} it/s   ratio {r['ratio_hand_over_generate']:.2f}x   "
            f"identical outputs: {r['identical_outputs']}"
        )
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    summary = {"settings": settings, "stop_strings_error": stop_strings_error, "results": results}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
