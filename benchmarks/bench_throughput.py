"""Merge throughput against the I/O floor on a Llama-shaped bfloat16 model (about 0.5B params).

Builds (once, cached under a temporary folder) a base and two fine-tune-like variants (base +
small noise) with random weights, then measures in one run, interleaved over rounds:

- ``floor``: read the two variants with safetensors, add them with torch, write one output;
- ``linear``: MergeKit ``linear`` in-process (``run_merge``);
- ``sae``: ``sae_evolve`` without pruning; ``sae_pruned_weights`` / ``sae_pruned_delta``:
  density 0.5 on the weights / on the task vectors (reads the base too), in-process;
- ``driver_disk`` / ``driver_resident``: one offspring through the driver's ``stream_merge``
  (to disk; to disk and into a resident scoring model, as a step does).

Throughput is GB/s of bytes read plus bytes written to disk; each method's ratio is to the
floor of the same round. The last line printed is one JSON object.

    python benchmarks/bench_throughput.py [--rounds 3] [--hidden 1024 --layers 24] [--write]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

CACHE = Path(os.environ.get("BENCH_CACHE", Path(tempfile.gettempdir()) / "mergekit_sae_bench"))
DENSITY = 0.5
NOISE = 0.002


def llama_shapes(hidden: int, layers: int, intermediate: int, vocab: int) -> dict[str, tuple]:
    """Tensor names and shapes of an untied Llama with full multi-head attention."""
    shapes: dict[str, tuple] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        prefix = f"model.layers.{i}"
        for proj in ("q", "k", "v", "o"):
            shapes[f"{prefix}.self_attn.{proj}_proj.weight"] = (hidden, hidden)
        shapes[f"{prefix}.mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[f"{prefix}.mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[f"{prefix}.mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[f"{prefix}.input_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_config(path: Path, hidden: int, layers: int, intermediate: int, vocab: int) -> None:
    """A transformers LlamaConfig for the shapes above, in bfloat16."""
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        tie_word_embeddings=False,
        max_position_embeddings=256,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    ).save_pretrained(path)


def build_models(hidden: int, layers: int, intermediate: int, vocab: int) -> dict[str, Path]:
    """Base and variants a, b (base + noise) as bf16 safetensors, cached by shape."""
    from safetensors.torch import save_file

    root = CACHE / f"h{hidden}-l{layers}-i{intermediate}-v{vocab}"
    paths = {name: root / name for name in ("base", "a", "b")}
    if all((p / "model.safetensors").is_file() for p in paths.values()):
        return paths
    shapes = llama_shapes(hidden, layers, intermediate, vocab)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
    for key, seed in (("base", None), ("a", 1), ("b", 2)):
        paths[key].mkdir(parents=True, exist_ok=True)
        write_config(paths[key], hidden, layers, intermediate, vocab)
        if seed is None:
            out = tensors
        else:
            noise = torch.Generator().manual_seed(seed)
            out = {
                n: (t.float() + torch.randn(t.shape, generator=noise) * NOISE).to(torch.bfloat16)
                for n, t in tensors.items()
            }
        save_file(out, str(paths[key] / "model.safetensors"), metadata={"format": "pt"})
        del out
    return paths


def model_bytes(path: Path) -> int:
    """Bytes of a model's safetensors files."""
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def floor(paths: dict[str, Path], out: Path) -> None:
    """Read a and b tensor by tensor, add them in bf16 and write one safetensors file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    merged = {}
    with (
        safe_open(str(paths["a"] / "model.safetensors"), "pt") as fa,
        safe_open(str(paths["b"] / "model.safetensors"), "pt") as fb,
    ):
        for name in fa.keys():  # noqa: SIM118 - safe_open is not a mapping
            merged[name] = fa.get_tensor(name).add_(fb.get_tensor(name))
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(out / "model.safetensors"), metadata={"format": "pt"})


def yaml_recipes(paths: dict[str, Path]) -> dict[str, dict]:
    """MergeKit configurations of the in-process methods (all written in bfloat16)."""

    def sae(density: float, target: str) -> dict:
        recipe = {
            "merge_method": "sae_evolve",
            "models": [
                {"model": str(paths[k]), "parameters": {"score": s, "density": density}}
                for k, s in (("a", 0.6), ("b", 0.4))
            ],
            "parameters": {"sparsity_weight": 0.5, "prune_target": target},
            "dtype": "bfloat16",
        }
        if target == "delta":
            recipe["base_model"] = str(paths["base"])
        return recipe

    return {
        "linear": {
            "merge_method": "linear",
            "models": [
                {"model": str(paths["a"]), "parameters": {"weight": 0.6}},
                {"model": str(paths["b"]), "parameters": {"weight": 0.4}},
            ],
            "dtype": "bfloat16",
        },
        "sae": sae(1.0, "weights"),
        "sae_pruned_weights": sae(DENSITY, "weights"),
        "sae_pruned_delta": sae(DENSITY, "delta"),
    }


def run_in_process(recipe: dict, out: Path) -> None:
    """One in-process MergeKit run_merge."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(recipe)
    run_merge(config, str(out), MergeOptions(quiet=True, copy_tokenizer=False))


def offspring_record():
    """The sae_evolve stage a search step makes (global scope, offspring pruned to 0.5)."""
    from mergekit_sae.records import MergeInput, MergeRecord

    return MergeRecord(
        method="sae_evolve",
        inputs=[
            MergeInput(member="m0000", parameters={"score": 0.6, "global_sparsity": 0.0}),
            MergeInput(member="m0001", parameters={"score": 0.4, "global_sparsity": 0.0}),
        ],
        parameters={
            "sparsity_weight": 1.0,
            "sparsity_measure": "zero_count",
            "sparsity_scope": "global",
            "renormalize": True,
            "prune_target": "weights",
            "offspring_density": DENSITY,
            "redense": "parents",
        },
        dtype="bfloat16",
    )


def resident_sink(path: Path) -> Callable[[str, torch.Tensor], None]:
    """The receive() of a ResidentEvaluator over the model at path (no tasks)."""
    from transformers import AutoModelForCausalLM

    from mergekit_sae.evaluate.evaluator import ResidentEvaluator

    class _Resident:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        tokenizer = None

    return ResidentEvaluator(_Resident(), []).receive


def timed(fn: Callable[[], None]) -> float:
    """Wall seconds of one call."""
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", default=None, help="comma-separated subset of the methods")
    parser.add_argument("--keep", action="store_true", help="keep the cached models")
    parser.add_argument("--write", action="store_true", help="write results/throughput.*")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import mergekit_sae.methods  # noqa: F401  (registers sae_evolve in this process)
    from mergekit_sae.merging.stream import stream_merge

    paths = build_models(args.hidden, args.layers, args.intermediate, args.vocab)
    size = {k: model_bytes(p) for k, p in paths.items()}
    sink = resident_sink(paths["a"])
    record = offspring_record()
    recipes = yaml_recipes(paths)
    cases: dict[str, tuple[Callable[[Path], None], int]] = {
        "floor": (lambda out: floor(paths, out), size["a"] * 3),
        **{
            name: (
                lambda out, r=recipe: run_in_process(r, out),
                size["a"] * (4 if "base_model" in recipe else 3),
            )
            for name, recipe in recipes.items()
        },
        "driver_disk": (
            lambda out: stream_merge(record, [paths["a"], paths["b"]], None, out),
            size["a"] * 3,
        ),
        "driver_resident": (
            lambda out: stream_merge(record, [paths["a"], paths["b"]], None, out, sink=sink),
            size["a"] * 3,
        ),
    }
    if args.only:
        keep = {"floor", *args.only.split(",")}
        cases = {k: v for k, v in cases.items() if k in keep}
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    ratios: dict[str, list[float]] = {name: [] for name in cases}
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        for round_index in range(args.rounds):
            order = list(cases) if round_index % 2 == 0 else list(reversed(cases))
            for name in order:
                out = Path(tmp) / f"{name}-{round_index}"
                seconds[name].append(timed(lambda fn=cases[name][0], o=out: fn(o)))
                shutil.rmtree(out, ignore_errors=True)
            for name in cases:
                floor_rate = cases["floor"][1] / seconds["floor"][-1]
                ratios[name].append(cases[name][1] / seconds[name][-1] / floor_rate)

    gbps = {n: cases[n][1] / statistics.median(s) / 1e9 for n, s in seconds.items()}
    ratio = {n: statistics.median(r) for n, r in ratios.items()}
    params = size["a"] / 2 / 1e9
    header = (
        f"model: {params:.2f}B parameters (bfloat16, {size['a'] / 1e9:.2f} GB), {args.rounds} "
        f"rounds, torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs"
    )
    print(header)
    print(f"{'case':<20}{'median s':>10}{'GB/s':>8}{'ratio to floor':>16}")
    rows = []
    for name in cases:
        median = statistics.median(seconds[name])
        print(f"{name:<20}{median:>10.2f}{gbps[name]:>8.2f}{ratio[name]:>16.3f}")
        rows.append(f"| {name} | {median:.2f} | {gbps[name]:.3f} | {ratio[name]:.3f} |")
    pruned = [n for n in ("sae_pruned_weights", "sae_pruned_delta") if n in cases]
    result = {
        "params_b": round(params, 3),
        "rounds": args.rounds,
        "load_avg": round(os.getloadavg()[0], 2),
        **{f"{n}_gbps": round(v, 3) for n, v in gbps.items()},
        **{f"ratio_{n}": round(v, 3) for n, v in ratio.items() if n != "floor"},
    }
    if "sae" in cases:
        result["sae_gbps"] = round(gbps["sae"], 3)
    if pruned:
        worst = min(pruned, key=lambda n: ratio[n])
        result["sae_pruned_gbps"] = round(gbps[worst], 3)
        result["ratio_sae_pruned"] = round(ratio[worst], 3)
    if "driver_resident" in cases:
        result["driver_ratio"] = round(ratio["driver_resident"], 3)
    if args.write:
        write_results(header, rows, result)
    if not args.keep:
        shutil.rmtree(CACHE / paths["a"].parent.name, ignore_errors=True)
    print(json.dumps(result))


def write_results(header: str, rows: list[str], result: dict) -> None:
    """benchmarks/results/throughput.{md,json}."""
    from mergekit_sae.atomic import write_text

    results = Path(__file__).parent / "results"
    head = ["| case | median s | GB/s | ratio to floor |", "|---|---:|---:|---:|"]
    table = "\n".join([*head, *rows])
    write_text(results / "throughput.md", f"# Merge throughput\n\n{header}\n\n{table}\n")
    write_text(results / "throughput.json", json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
