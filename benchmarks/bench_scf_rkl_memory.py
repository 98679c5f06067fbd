"""Peak memory and wall time of the SCF-RKL functional importance pass, layer by layer against
one pass over the whole model.

    python benchmarks/bench_scf_rkl_memory.py [--hidden 512] [--layers 8] [--vocab 8192]

Builds a random Llama anchor and a donor near it (saved with a word-level tokenizer in a
temporary folder), then runs `compute_importance` once per granularity, each in a fresh
subprocess on the CPU with one thread, so that getrusage's maxrss is that mode's own peak
(the build runs in a subprocess too: this process stays small, and a child's maxrss counts
the process it was forked from).
Prints, per mode: the resident memory after the imports (the runtime), the peak, the peak
above the runtime, the wall time and the passes, plus the model's size in memory and the
largest difference between the two modes' scores. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("layer", "model")


def build(root: Path, args: argparse.Namespace) -> tuple[list[str], int]:
    """Save anchor and donor under `root`; return calibration prompts and the model's bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mergekit_sae.testbed.vocab import build_tokenizer, build_vocab

    words = [f"w{i}" for i in range(400)]
    tokenizer = build_tokenizer(build_vocab(words), args.max_length)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=args.max_length,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(root / "anchor", safe_serialization=True)
    tokenizer.save_pretrained(root / "anchor")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    model.save_pretrained(root / "donor", safe_serialization=True)
    tokenizer.save_pretrained(root / "donor")
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(args.max_length // 2, args.max_length, (args.prompts,), generator=gen)
    prompts = [
        " ".join(words[int(i)] for i in torch.randint(len(words), (int(n) - 1,), generator=gen))
        for n in lengths
    ]
    return prompts, model_bytes


def child(root: Path, mode: str, batch_size: int, max_length: int) -> None:
    """Run one granularity in this process; print its figures as one JSON line."""
    import torch

    from mergekit_sae.calibration.scf_rkl import compute_importance, peak_rss_mib

    torch.set_num_threads(1)
    runtime = peak_rss_mib()
    prompts = json.loads((root / "prompts.json").read_text())
    report = compute_importance(
        str(root / "anchor"),
        [str(root / "donor")],
        prompts,
        root / mode,
        device=torch.device("cpu"),
        dtype=torch.float32,
        batch_size=batch_size,
        max_length=max_length,
        granularity=mode,
    )
    print(json.dumps({"runtime_mib": round(runtime, 1), **report}))


def subprocess_json(root: Path, step: str, args: argparse.Namespace) -> dict:
    """Run one step (`build` or a granularity) in a fresh single-threaded subprocess.

    This process imports no torch before the modes have run: a child's maxrss starts from
    the size of the process it was forked from."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--child", step, "--root", str(root)]
    for flag in ("hidden", "intermediate", "layers", "vocab", "prompts", "max_length"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    command += ["--batch-size", str(args.batch_size)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{step}: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def score_difference(reports: dict[str, dict]) -> tuple[float, bool]:
    """Largest |layer - model| over every score, and whether the files are bitwise equal."""
    from safetensors.torch import load_file

    layer, model = (load_file(reports[m]["donors"][0]["file"]) for m in MODES)
    diff = max(float((layer[n] - model[n]).abs().max()) for n in model)
    return diff, all(bool((layer[n] == model[n]).all()) for n in model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--child", choices=("build", *MODES), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "build":
        prompts, model_bytes = build(args.root, args)
        (args.root / "prompts.json").write_text(json.dumps(prompts))
        print(json.dumps({"model_bytes": model_bytes}))
        return
    if args.child:
        child(args.root, args.child, args.batch_size, args.max_length)
        return
    with tempfile.TemporaryDirectory(prefix="scf_rkl_memory_") as folder:
        root = Path(folder)
        model_bytes = subprocess_json(root, "build", args)["model_bytes"]
        reports = {mode: subprocess_json(root, mode, args) for mode in MODES}
        diff, equal = score_difference(reports)
    model_mib = model_bytes / 2**20
    print(
        f"random Llama: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
        f"{model_bytes // 4 / 1e6:.1f}M parameters, {model_mib:.1f} MiB in float32; "
        f"{reports['layer']['tokens']} calibration tokens in {reports['layer']['batches']} "
        "batches; CPU, 1 thread, one donor"
    )
    print("| granularity | groups | passes f/b | runtime MiB | peak MiB | peak - runtime | s |")
    print("|---|---|---|---|---|---|---|")
    for mode, report in reports.items():
        passes = report["calibration_passes"]
        above = report["peak_rss_mib"] - report["runtime_mib"]
        print(
            f"| {mode} | {report['gradient_groups']} | {passes['forward']}/{passes['backward']} "
            f"| {report['runtime_mib']:.0f} | {report['peak_rss_mib']:.0f} | {above:.0f} "
            f"| {report['seconds']:.1f} |"
        )
    saved = reports["model"]["peak_rss_mib"] - reports["layer"]["peak_rss_mib"]
    ratio = reports["layer"]["seconds"] / reports["model"]["seconds"]
    print(
        f"layer saves {saved:.0f} MiB of peak RSS ({saved / model_mib:.2f} model sizes) "
        f"and takes {ratio:.2f}x the time; max |layer - model| score = {diff:.3g} "
        f"(bitwise equal: {equal})"
    )


if __name__ == "__main__":
    main()
