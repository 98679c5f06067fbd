"""Throughput of the built-in evaluators vs lm-eval-harness's HF backend, in one run.

Same model, same items, same device and batch size for both; each side is warmed up first
(lm-eval's task index and dataset load are not timed). The items come from the testbed when it
has been built (``mergekit-sae testbed build``), else from a random Llama of the testbed's size.

    python benchmarks/bench_evaluators.py [--testbed testbed] [--n 200] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tokenizers import Regex, Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    StoppingCriteria,
)

from mergekit_sae.evaluate import TaskSpec, load_task, resolve_device, subsample  # noqa: E402
from mergekit_sae.evaluate.generation import greedy_generate  # noqa: E402
from mergekit_sae.evaluate.lm_eval_export import write_lm_eval_task  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def random_setup(folder: Path, n: int, seed: int = 0):
    """A random Llama of the testbed's size over a word vocabulary, and synthetic items."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(300)] + [str(i) for i in range(100)]
    vocab = ["<pad>", "<s>", "</s>", "<unk>", "\n", "####", "Q:", "A:"] + words
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Split("\n", behavior="isolated"),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()

    def sentence(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    gen = [
        {"prompt": f"Q: {sentence(rng.randint(8, 16))} A:", "answer": str(rng.randint(0, 99))}
        for _ in range(n)
    ]
    mc = [
        {
            "prompt": f"Q: {sentence(rng.randint(8, 16))} A:",
            "choices": [sentence(rng.randint(1, 3)) for _ in range(4)],
            "label": rng.randrange(4),
        }
        for _ in range(n)
    ]
    paths = {}
    for name, items in (("gen", gen), ("mc", mc)):
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(i) + "\n" for i in items))
    return {"gen": (model, tokenizer), "mc": (model, tokenizer)}, paths, "random Llama"


def testbed_setup(testbed: Path, folder: Path, n: int):
    """The testbed's experts and its test items (the first n of a seeded subsample)."""
    pairs, paths = {}, {}
    for name, expert, data in (("gen", "math", "math"), ("mc", "multilingual", "multilingual")):
        model = AutoModelForCausalLM.from_pretrained(testbed / expert, dtype=torch.float32).eval()
        pairs[name] = (model, AutoTokenizer.from_pretrained(testbed / expert))
        lines = (testbed / "data" / data / "test.jsonl").read_text().splitlines()
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("\n".join(subsample(lines, n, seed=0)) + "\n")
    return pairs, paths, f"testbed experts ({testbed})"


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


class StopOnNewline(StoppingCriteria):
    """Per-row stop once the generated text holds a newline (what the built-in loop checks)."""

    def __init__(self, tokenizer, prompt_length: int):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :])
        return torch.tensor(["\n" in t for t in texts], device=input_ids.device)


def hf_generate(model, tokenizer, prompts, max_new_tokens, batch_size):
    """Generation through transformers' model.generate with the same batching (for comparison)."""
    texts = []
    tokenizer.padding_side = "left"
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
        batch = {k: v.to(model.device) for k, v in batch.items() if k != "token_type_ids"}
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            stopping_criteria=[StopOnNewline(tokenizer, batch["input_ids"].shape[1])],
            pad_token_id=tokenizer.pad_token_id,
        )
        texts += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :])
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", type=Path, default=REPO / "testbed")
    parser.add_argument("--n", type=int, default=200, help="items per task type")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    args = parser.parse_args()
    device, dtype = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if (args.testbed / "math").is_dir() and (args.testbed / "data").is_dir():
            pairs, paths, source = testbed_setup(args.testbed, folder, args.n)
        else:
            pairs, paths, source = random_setup(folder, args.n)
        for model, _ in pairs.values():
            model.to(device=device, dtype=dtype)
        specs = {
            "gen": TaskSpec(
                name="bench_gen",
                type="generate_exact_match",
                test=paths["gen"],
                max_new_tokens=args.max_new_tokens,
                extraction="strict",
            ),
            "mc": TaskSpec(name="bench_mc", type="multiple_choice", test=paths["mc"]),
        }
        lm_filter = {"gen": "strict-match", "mc": None}
        print(
            f"model: {source}; device {device}, {dtype}; batch size {args.batch_size}; "
            f"{torch.get_num_threads()} CPU thread(s)"
        )
        print(
            f"{'task type':22} {'items':>6} {'built-in it/s':>14} {'lm-eval it/s':>13} "
            f"{'ratio':>6} {'acc (ours/lm-eval)':>20}"
        )
        for kind, spec in specs.items():
            model, tokenizer = pairs[kind]
            builtin = load_task(spec)
            write_lm_eval_task(spec, folder / "tasks")
            adapter = load_task(
                {
                    "name": spec.name,
                    "type": "lm_eval",
                    "include_path": [folder / "tasks"],
                    **({"filter": lm_filter[kind]} if lm_filter[kind] else {}),
                    **({"metric": "acc"} if kind == "mc" else {}),
                }
            )
            ours_items, their_items = builtin.items("test"), adapter.items("test")
            builtin.score(model, tokenizer, ours_items[:4], batch_size=args.batch_size)
            adapter.score(model, tokenizer, their_items[:4], batch_size=args.batch_size)
            ours, t_ours = timed(
                builtin.score, model, tokenizer, ours_items, batch_size=args.batch_size
            )
            theirs, t_theirs = timed(
                adapter.score, model, tokenizer, their_items, batch_size=args.batch_size
            )
            n = len(ours_items)
            accuracy = f"{builtin.aggregate(ours):.3f}/{adapter.aggregate(theirs):.3f}"
            print(
                f"{spec.type:22} {n:6d} {n / t_ours:14.1f} {n / t_theirs:13.1f} "
                f"{t_theirs / t_ours:5.1f}x {accuracy:>20}"
            )
            agree = sum(a == b for a, b in zip(ours, theirs, strict=True))
            print(f"{'':22} per-item agreement {agree}/{n}")
            if kind == "gen":
                prompts = [i["prompt"] for i in ours_items]
                _, t_loop = timed(
                    greedy_generate,
                    model,
                    tokenizer,
                    prompts,
                    max_new_tokens=args.max_new_tokens,
                    batch_size=args.batch_size,
                )
                _, t_hf = timed(
                    hf_generate, model, tokenizer, prompts, args.max_new_tokens, args.batch_size
                )
                print(
                    f"{'':22} generation alone: greedy_generate {n / t_loop:.1f} it/s, "
                    f"plain model.generate {n / t_hf:.1f} it/s ({t_hf / t_loop:.1f}x)"
                )
        print("ratio = built-in items/s divided by lm-eval items/s (target >= 2x)")


if __name__ == "__main__":
    main()
