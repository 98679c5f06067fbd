"""Merge throughput against an I/O floor and MergeKit `linear`, on a Llama-shaped model.

Builds (once, cached under a temporary folder) a base and two fine-tune-like variants (base +
small noise) with random weights, in bfloat16 and in float32 (about 0.47B parameters by
default), then measures in one run, interleaved over rounds, for each dtype:

- ``floor``: the fastest plain pass: both variants memory-mapped (each tensor a view of the
  map, never copied), tensor by tensor one torch add (into a reused buffer), streamed to an
  output file whose header is written first; ``floor_durable``: the same, then the file and
  its folder flushed to disk (``fsync``), as this package's writers flush every output before
  moving it into place;
- ``linear``: MergeKit ``linear`` in-process (``run_merge``, what ``mergekit-yaml`` runs);
- ``sae``: ``sae_evolve`` without pruning; ``sae_pruned_weights`` / ``sae_pruned_delta``:
  density ``--density`` on the weights / on the task vectors (reads the base too), in-process;
- ``driver_disk`` / ``driver_resident``: one offspring through the driver's ``stream_merge``
  (to disk; to disk and into a resident scoring model, as a step does).

Throughput is GB/s of bytes read plus bytes written to disk. Every case gets three ratios from
the same round: to the floor (GB/s over the floor's GB/s; the floor must beat ``linear``), to
the durable floor, and ``x linear`` (its seconds over ``linear``'s). The last line printed is
one JSON object.

``--device cuda`` does the math of every case on the GPU (MergeKit's ``device`` option, the
driver's ``device``): the floor then copies each pair of tensors to the card, adds there and
copies the sum back before streaming it out; ``--write`` then writes
``results/throughput_cuda.*``.

``--profile CASE`` instead runs one merge of CASE under cProfile on one kernel thread and
prints where the seconds go.

    python benchmarks/bench_throughput.py [--rounds 3] [--dtypes bfloat16,float32] [--write]
        [--device cuda]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import mmap
import os
import pstats
import shutil
import statistics
import struct
import tempfile
import time
import warnings
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


def write_config(
    path: Path, hidden: int, layers: int, intermediate: int, vocab: int, dtype: str = "bfloat16"
) -> None:
    """A transformers LlamaConfig for the shapes above."""
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
        dtype=dtype,
        architectures=["LlamaForCausalLM"],
    ).save_pretrained(path)


def build_models(
    hidden: int, layers: int, intermediate: int, vocab: int, dtype: str = "bfloat16"
) -> dict[str, Path]:
    """Base and variants a, b (base + noise) as safetensors, cached by shape and dtype."""
    from safetensors.torch import save_file

    stored = getattr(torch, dtype)
    suffix = "" if dtype == "bfloat16" else f"-{dtype}"
    root = CACHE / f"h{hidden}-l{layers}-i{intermediate}-v{vocab}{suffix}"
    paths = {name: root / name for name in ("base", "a", "b")}
    if all((p / "model.safetensors").is_file() for p in paths.values()):
        return paths
    shapes = llama_shapes(hidden, layers, intermediate, vocab)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=stored)
        else:
            tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(stored)
    for key, seed in (("base", None), ("a", 1), ("b", 2)):
        paths[key].mkdir(parents=True, exist_ok=True)
        write_config(paths[key], hidden, layers, intermediate, vocab, dtype)
        if seed is None:
            out = tensors
        else:
            noise = torch.Generator().manual_seed(seed)
            out = {
                n: (t.float() + torch.randn(t.shape, generator=noise) * NOISE).to(stored)
                for n, t in tensors.items()
            }
        save_file(out, str(paths[key] / "model.safetensors"), metadata={"format": "pt"})
        del out
    return paths


def model_bytes(path: Path) -> int:
    """Bytes of a model's safetensors files."""
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def mapped_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view of one read-only memory map (no copy)."""
    with path.open("rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    (length,) = struct.unpack("<Q", mapped[:8])
    header = json.loads(mapped[8 : 8 + length])
    tensors = {}
    with warnings.catch_warnings():  # the views are only read
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            begin, end = entry["data_offsets"]
            count = (end - begin) // dtype.itemsize
            flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=8 + length + begin)
            tensors[name] = flat.view(entry["shape"])
    return tensors


def floor(paths: dict[str, Path], out: Path, durable: bool = False, device: str = "cpu") -> None:
    """The plain pass: a and b memory-mapped (tensors are views of the maps, never copied),
    each pair added into a reused buffer, the sums streamed to one safetensors file (header
    first, then the data); ``durable``: then the file and the folder flushed to disk. On
    another device each pair is copied there, added into a reused buffer there, and the sum
    copied back into the reused host buffer."""
    left_tensors = mapped_tensors(paths["a"] / "model.safetensors")
    right_tensors = mapped_tensors(paths["b"] / "model.safetensors")
    out.mkdir(parents=True, exist_ok=True)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, tensor in left_tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": SAFETENSORS_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(out / "model.safetensors", "wb") as output:
        output.write(struct.pack("<Q", len(raw)) + raw)
        buffer, card = torch.empty(0), torch.empty(0, device=device)
        for name, left in left_tensors.items():
            if buffer.dtype != left.dtype or buffer.numel() < left.numel():
                buffer = torch.empty(left.numel(), dtype=left.dtype)
                card = buffer if device == "cpu" else torch.empty_like(buffer, device=device)
            total = card[: left.numel()].view(left.shape)
            torch.add(left.to(device), right_tensors[name].to(device), out=total)
            host = buffer[: left.numel()]
            if device != "cpu":
                host.copy_(total.reshape(-1))
            output.write(host.view(torch.uint8).numpy().data)
        if durable:
            output.flush()
            os.fsync(output.fileno())
    if durable:
        folder = os.open(out, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def yaml_recipes(paths: dict[str, Path], dtype: str, density: float) -> dict[str, dict]:
    """MergeKit configurations of the in-process methods, written in ``dtype``."""

    def sae(model_density: float, target: str) -> dict:
        recipe = {
            "merge_method": "sae_evolve",
            "models": [
                {"model": str(paths[k]), "parameters": {"score": s, "density": model_density}}
                for k, s in (("a", 0.6), ("b", 0.4))
            ],
            "parameters": {"sparsity_weight": 0.5, "prune_target": target},
            "dtype": dtype,
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
            "dtype": dtype,
        },
        "sae": sae(1.0, "weights"),
        "sae_pruned_weights": sae(density, "weights"),
        "sae_pruned_delta": sae(density, "delta"),
    }


def run_in_process(recipe: dict, out: Path, device: str = "cpu") -> None:
    """One in-process MergeKit run_merge, its math on ``device``."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(recipe)
    run_merge(config, str(out), MergeOptions(quiet=True, copy_tokenizer=False, device=device))


def offspring_record(dtype: str, density: float):
    """The sae_evolve stage a search step makes (global scope, offspring pruned)."""
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
            "offspring_density": density,
            "redense": "parents",
        },
        dtype=dtype,
    )


def resident_sink(path: Path, dtype: str, device: str) -> Callable[[str, torch.Tensor], None]:
    """The receive() of a ResidentEvaluator over the model at path, on ``device`` (no tasks)."""
    from transformers import AutoModelForCausalLM

    from mergekit_sae.evaluate.evaluator import ResidentEvaluator

    class _Resident:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        model = model.to(device).eval()
        tokenizer = None

    return ResidentEvaluator(_Resident(), []).receive


def timed(fn: Callable[[], None]) -> float:
    """Wall seconds of one call, started with no dirty pages in the page cache (``sync``
    first, untimed): a case that leaves its output unflushed would otherwise slow the next
    one's writes, and the cases' order would decide their times."""
    gc.collect()
    os.sync()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


Case = tuple[Callable[[Path], None], int]


def dtype_cases(
    paths: dict[str, Path], dtype: str, density: float, only: set | None, device: str
) -> dict:
    """The timed cases of one dtype: name -> (run into an output folder, bytes moved)."""
    from mergekit_sae.merging.stream import stream_merge

    size = model_bytes(paths["a"])
    record = offspring_record(dtype, density)
    parents = [paths["a"], paths["b"]]
    cases: dict[str, Case] = {
        "floor": (lambda out: floor(paths, out, device=device), size * 3),
        "floor_durable": (lambda out: floor(paths, out, True, device), size * 3),
    }
    for name, recipe in yaml_recipes(paths, dtype, density).items():
        inputs = 3 if "base_model" in recipe else 2
        cases[name] = (
            lambda out, r=recipe: run_in_process(r, out, device),
            size * (inputs + 1),
        )
    cases["driver_disk"] = (
        lambda out: stream_merge(record, parents, None, out, device=device),
        size * 3,
    )
    if only is None or "driver_resident" in only:
        sink = resident_sink(paths["a"], dtype, device)
        cases["driver_resident"] = (
            lambda out: stream_merge(record, parents, None, out, device=device, sink=sink),
            size * 3,
        )
    keep = {"floor", "floor_durable", "linear", *(only or cases)}
    return {name: case for name, case in cases.items() if name in keep}


def measure(cases: dict[str, dict[str, Case]], rounds: int, tmp: Path) -> dict[str, dict]:
    """Seconds of every case in every round, dtypes and cases interleaved (reversed order on
    odd rounds); per case the medians of seconds, GB/s, ratios to both floors and x linear."""
    seconds = {d: {name: [] for name in c} for d, c in cases.items()}
    to_floor = {d: {name: [] for name in c} for d, c in cases.items()}
    to_durable = {d: {name: [] for name in c} for d, c in cases.items()}
    to_linear = {d: {name: [] for name in c} for d, c in cases.items()}
    order = [(d, name) for d, c in cases.items() for name in c]
    for round_index in range(rounds):
        for dtype, name in order if round_index % 2 == 0 else reversed(order):
            out = tmp / f"{dtype}-{name}-{round_index}"
            seconds[dtype][name].append(timed(lambda o=out, f=cases[dtype][name][0]: f(o)))
            shutil.rmtree(out, ignore_errors=True)
        for dtype, table in cases.items():
            floor_rate = table["floor"][1] / seconds[dtype]["floor"][-1]
            durable_rate = table["floor_durable"][1] / seconds[dtype]["floor_durable"][-1]
            for name, (_, moved) in table.items():
                rate = moved / seconds[dtype][name][-1]
                to_floor[dtype][name].append(rate / floor_rate)
                to_durable[dtype][name].append(rate / durable_rate)
                to_linear[dtype][name].append(
                    seconds[dtype][name][-1] / seconds[dtype]["linear"][-1]
                )
    return {
        dtype: {
            name: {
                "seconds": statistics.median(seconds[dtype][name]),
                "gbps": moved / statistics.median(seconds[dtype][name]) / 1e9,
                "ratio": statistics.median(to_floor[dtype][name]),
                "durable": statistics.median(to_durable[dtype][name]),
                "x_linear": statistics.median(to_linear[dtype][name]),
            }
            for name, (_, moved) in table.items()
        }
        for dtype, table in cases.items()
    }


def summary(medians: dict[str, dict]) -> dict:
    """The JSON result: per dtype, every case's GB/s, ratio to the floor and x linear."""
    result = {}
    for dtype, table in medians.items():
        for name, row in table.items():
            result[f"{dtype}_{name}_gbps"] = round(row["gbps"], 3)
            if name != "floor":
                result[f"{dtype}_ratio_{name}"] = round(row["ratio"], 3)
            if name != "floor_durable":
                result[f"{dtype}_durable_{name}"] = round(row["durable"], 3)
            if name != "linear":
                result[f"{dtype}_x_linear_{name}"] = round(row["x_linear"], 3)
    return result


def profile(case: Case, out: Path, top: int) -> None:
    """One run of a case under cProfile on one kernel thread (workers are invisible to
    cProfile): the functions that took the most seconds, inclusive and exclusive."""
    from mergekit_sae import parallel

    case[0](out / "warm-up")
    with parallel.kernel_threads(1):
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.runcall(case[0], out / "profiled")
        print(f"wall {time.perf_counter() - start:.2f} s on one kernel thread")
    stats = pstats.Stats(profiler)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--density", type=float, default=DENSITY)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="where the math runs: cpu or cuda")
    parser.add_argument("--only", default=None, help="comma-separated subset of the methods")
    parser.add_argument("--profile", default=None, help="profile one merge of this case")
    parser.add_argument("--keep", action="store_true", help="keep the cached models")
    parser.add_argument("--write", action="store_true", help="write results/throughput.*")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import mergekit_sae.methods  # noqa: F401  (registers sae_evolve in this process)

    dtypes = args.dtypes.split(",")
    shape = (args.hidden, args.layers, args.intermediate, args.vocab)
    paths = {dtype: build_models(*shape, dtype) for dtype in dtypes}
    only = set(args.only.split(",")) if args.only else None
    if args.profile:
        only = {args.profile}
    cases = {d: dtype_cases(paths[d], d, args.density, only, args.device) for d in dtypes}
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        if args.profile:
            profile(cases[dtypes[0]][args.profile], Path(tmp), 30)
            return
        medians = measure(cases, args.rounds, Path(tmp))
    size = model_bytes(paths[dtypes[0]]["a"])
    params = size / torch.empty((), dtype=getattr(torch, dtypes[0])).element_size() / 1e9
    header = (
        f"model: {params:.2f}B parameters, device {device_name(args.device)}, "
        f"{args.rounds} rounds, density {args.density}, "
        f"torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs"
    )
    rows = [
        f"| {dtype} | {name} | {row['seconds']:.2f} | {row['gbps']:.3f} | {row['ratio']:.3f} "
        f"| {row['durable']:.3f} | {row['x_linear']:.2f} |"
        for dtype, table in medians.items()
        for name, row in table.items()
    ]
    print(header)
    print(
        f"{'dtype':<10}{'case':<20}{'median s':>10}{'GB/s':>8}{'to floor':>10}"
        f"{'durable':>10}{'x linear':>10}"
    )
    for dtype, table in medians.items():
        for name, row in table.items():
            print(
                f"{dtype:<10}{name:<20}{row['seconds']:>10.2f}{row['gbps']:>8.2f}"
                f"{row['ratio']:>10.3f}{row['durable']:>10.3f}{row['x_linear']:>10.2f}"
            )
    result = {
        "params_b": round(params, 3),
        "device": args.device,
        "rounds": args.rounds,
        "density": args.density,
        "load_avg": round(os.getloadavg()[0], 2),
        **summary(medians),
    }
    if args.write:
        write_results(header, rows, result, "" if args.device == "cpu" else f"_{args.device}")
    if not args.keep:
        for folder in paths.values():
            shutil.rmtree(folder["a"].parent, ignore_errors=True)
    print(json.dumps(result))


def device_name(device: str) -> str:
    """The device as the header names it: ``cpu``, or the GPU's own name."""
    return device if device == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})"


def write_results(header: str, rows: list[str], result: dict, suffix: str = "") -> None:
    """benchmarks/results/throughput{suffix}.{md,json}; the md keeps its sections (``## ...``)."""
    from mergekit_sae.atomic import write_text

    results = Path(__file__).parent / "results"
    head = [
        "| dtype | case | median s | GB/s | to floor | to durable floor | x linear |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    table = "\n".join([*head, *rows])
    markdown = results / f"throughput{suffix}.md"
    text = markdown.read_text() if markdown.is_file() else ""
    marker = text.find("\n## ")
    sections = text[marker:] if marker >= 0 else ""
    latest = f"```json\n{json.dumps(result)}\n```\n"
    write_text(markdown, f"# Merge throughput\n\n{header}\n\n{table}\n\n{latest}{sections}")
    write_text(results / f"throughput{suffix}.json", json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
