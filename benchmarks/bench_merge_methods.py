"""Wall time of `mergekit-yaml` with sae_evolve vs ties vs linear on the same models.

Builds three random Llama checkpoints (a base and two fine-tune-like variants) in a temporary
directory, then times each method in the same run, interleaved over several rounds, both as a
`mergekit-yaml` subprocess (what a user runs) and as an in-process `run_merge` call (without
interpreter start-up). Prints medians and ratios to ties. sae_evolve and ties both prune the
task vectors to the same density, so the comparison is like for like.

    python benchmarks/bench_merge_methods.py [--hidden 512] [--layers 6] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

DENSITY = 0.5


def build_models(root: Path, hidden: int, layers: int, vocab: int) -> dict[str, Path]:
    """A base and two variants (base + noise), saved as safetensors Llama checkpoints."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"], safe_serialization=True)
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        with torch.no_grad():
            variant = LlamaForCausalLM(config)
            variant.load_state_dict(base.state_dict())
            for parameter in variant.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.01)
        paths[name] = root / name
        variant.save_pretrained(paths[name], safe_serialization=True)
    return paths


def recipes(paths: dict[str, Path]) -> dict[str, dict]:
    """The same two models and base under each method."""
    common = {"base_model": str(paths["base"]), "dtype": "float32"}
    return {
        "linear": {
            "merge_method": "linear",
            "models": [
                {"model": str(paths["a"]), "parameters": {"weight": 0.6}},
                {"model": str(paths["b"]), "parameters": {"weight": 0.4}},
            ],
            "dtype": "float32",
        },
        "ties": {
            "merge_method": "ties",
            "models": [
                {"model": str(paths[k]), "parameters": {"weight": w, "density": DENSITY}}
                for k, w in (("a", 0.6), ("b", 0.4))
            ],
            **common,
        },
        "sae_evolve": {
            "merge_method": "sae_evolve",
            "models": [
                {"model": str(paths[k]), "parameters": {"score": s, "density": DENSITY}}
                for k, s in (("a", 0.6), ("b", 0.4))
            ],
            "parameters": {"sparsity_weight": 0.5, "prune_target": "delta"},
            **common,
        },
    }


def time_cli(recipe: Path, out: Path) -> float:
    """Seconds for one `mergekit-yaml` subprocess."""
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mergekit.scripts.run_yaml",
            str(recipe),
            str(out),
            "--quiet",
            "--no-copy-tokenizer",
        ],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


def time_in_process(recipe: dict, out: Path) -> float:
    """Seconds for one in-process run_merge (after imports)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(recipe)
    start = time.perf_counter()
    run_merge(config, str(out), MergeOptions(quiet=True, copy_tokenizer=False))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import mergekit_sae.methods  # noqa: F401  (in-process timing; the CLI relies on autoload)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = build_models(root, args.hidden, args.layers, args.vocab)
        n_params = sum(
            t.numel() for t in load_file(next(paths["base"].glob("*.safetensors"))).values()
        )
        methods = recipes(paths)
        files = {}
        for name, recipe in methods.items():
            files[name] = root / f"{name}.yml"
            files[name].write_text(yaml.safe_dump(recipe))
        cli: dict[str, list[float]] = {name: [] for name in methods}
        inproc: dict[str, list[float]] = {name: [] for name in methods}
        for round_index in range(args.rounds):
            for name in methods:
                cli[name].append(time_cli(files[name], root / f"cli-{name}-{round_index}"))
                inproc[name].append(
                    time_in_process(methods[name], root / f"ip-{name}-{round_index}")
                )

    print(
        f"models: {n_params / 1e6:.1f}M parameters each (float32), {args.rounds} rounds, "
        f"density {DENSITY} for ties and sae_evolve, torch threads {torch.get_num_threads()}"
    )
    print(
        f"{'method':<12}{'mergekit-yaml s':>17}{'ratio to ties':>15}"
        f"{'run_merge s':>13}{'ratio to ties':>15}"
    )
    ties_cli = statistics.median(cli["ties"])
    ties_ip = statistics.median(inproc["ties"])
    for name in methods:
        c, i = statistics.median(cli[name]), statistics.median(inproc[name])
        print(f"{name:<12}{c:>17.2f}{c / ties_cli:>15.3f}{i:>13.2f}{i / ties_ip:>15.3f}")


if __name__ == "__main__":
    main()
