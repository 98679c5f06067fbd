"""`scf_rkl` functional importance: the KL against direct computations, -g*delta against finite
differences, layer-by-layer gradients against the single pass, and `mergekit-sae scf-rkl
importance` feeding plain `mergekit-yaml`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from mergekit.merge_methods import merge_tensors
from method_fixtures import load_weights, run_cli, write_recipe
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_models import make_llama

from mergekit_sae.calibration.scf_rkl import (
    NON_LAYER_GROUP,
    SIDECAR,
    compute_importance,
    functional_scores,
    kl_gradients,
    next_token_kl,
    parameter_groups,
    target_log_probs,
    tokenize_batches,
)
from mergekit_sae.cli.scf_rkl import scf_rkl as scf_rkl_command
from mergekit_sae.methods import register_all
from mergekit_sae.testbed.vocab import build_tokenizer, build_vocab

WORDS = ["cat", "dog", "runs", "sits", "fast", "slow", "the", "a", "red", "blue"]
PROMPTS = ["the cat runs fast", "a dog sits", "the red dog runs slow", "a blue cat", "dog"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(build_vocab(WORDS), 32)


def pair(vocab_size: int, dtype=torch.float64):
    """An anchor and a donor near it (a fine-tune-like perturbation), in `dtype`."""
    anchor = make_llama(0, vocab_size=vocab_size, matrix_std=0.2).to(dtype)
    donor = make_llama(0, vocab_size=vocab_size, matrix_std=0.2).to(dtype)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for parameter in donor.parameters():
            noise = torch.randn(parameter.shape, generator=gen, dtype=torch.float64)
            parameter.add_(0.05 * noise.to(dtype))
    return anchor, donor


def test_kl_matches_torch_distributions_on_the_two_models_logits(tokenizer):
    anchor, donor = pair(len(tokenizer))
    (batch,) = tokenize_batches(tokenizer, PROMPTS, 8, 32)
    mask = batch["attention_mask"]
    assert int(mask.sum()) < mask.numel()  # padding present and excluded
    (target,) = target_log_probs(donor, [batch], CPU)
    with torch.no_grad():
        logits = anchor(**batch).logits
        ours = next_token_kl(logits, target, mask)
        donor_logits = donor(**batch).logits
    p = torch.distributions.Categorical(logits=logits)
    q = torch.distributions.Categorical(logits=donor_logits)
    expected = (torch.distributions.kl_divergence(p, q) * mask).sum()
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    assert float(ours) > 0


def mean_kl(model, batches, targets) -> float:
    n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    with torch.no_grad():
        total = sum(
            float(next_token_kl(model(**b).logits, t, b["attention_mask"]))
            for b, t in zip(batches, targets, strict=True)
        )
    return total / n_tokens


def test_scores_match_a_finite_difference_of_the_kl(tokenizer):
    anchor, donor = pair(len(tokenizer))
    batches = tokenize_batches(tokenizer, PROMPTS, 2, 32)  # several batches, one mean
    targets = target_log_probs(donor, batches, CPU)
    grads, kl = kl_gradients(anchor, batches, targets, CPU)
    assert kl == pytest.approx(mean_kl(anchor, batches, targets), rel=1e-12)
    donor_state = {n: p.detach().clone() for n, p in donor.named_parameters()}
    anchor_state = {n: p.detach().clone() for n, p in anchor.named_parameters()}
    scores = functional_scores(grads, anchor_state, donor_state.__getitem__)
    assert set(scores) == set(anchor_state)

    params = dict(anchor.named_parameters())
    gen = torch.Generator().manual_seed(3)
    names = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]
    for name in names:
        for _ in range(2):
            index = int(torch.randint(params[name].numel(), (1,), generator=gen))
            delta = float((donor_state[name] - anchor_state[name]).view(-1)[index])
            h = 0.2  # a fraction of the way to the donor (RMSNorm computes in float32)
            values = []
            for step in (h, -h):
                with torch.no_grad():
                    params[name].view(-1)[index] = anchor_state[name].view(-1)[index] + step * delta
                values.append(mean_kl(anchor, batches, targets))
            with torch.no_grad():
                params[name].view(-1)[index] = anchor_state[name].view(-1)[index]
            finite_difference = -(values[0] - values[1]) / (2 * h)
            score = float(scores[name].view(-1)[index])
            assert score == pytest.approx(finite_difference, rel=1e-2, abs=1e-7), (name, index)


def test_parameter_groups_are_the_decoder_layers_then_the_rest():
    names = [name for name, _ in make_llama(0, num_hidden_layers=3).named_parameters()]
    groups = parameter_groups(names, "layer")
    expected = [(f"layer {i}", [n for n in names if f".layers.{i}." in n]) for i in range(3)]
    expected.append((NON_LAYER_GROUP, [n for n in names if ".layers." not in n]))
    assert groups == expected
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} == set(
        expected[-1][1]
    )
    assert parameter_groups(names, "model") == [("model", names)]
    with pytest.raises(ValueError, match="granularity"):
        parameter_groups(names, "row")


def test_one_groups_gradients_equal_the_full_pass_and_only_it_requires_grad(tokenizer):
    anchor, donor = pair(len(tokenizer))
    batches = tokenize_batches(tokenizer, PROMPTS, 2, 32)
    targets = target_log_probs(donor, batches, CPU)
    full, full_kl = kl_gradients(anchor, batches, targets, CPU)
    names = [n for n in full if ".layers.1." in n]
    seen = []

    def record(module, _args):
        seen.append({n for n, p in module.named_parameters() if p.requires_grad})

    hook = anchor.register_forward_pre_hook(record)
    part, kl = kl_gradients(anchor, batches, targets, CPU, names=names)
    hook.remove()
    assert seen == [set(names)] * len(batches)
    assert list(part) == names and kl == pytest.approx(full_kl, rel=1e-12)
    for name in names:
        torch.testing.assert_close(part[name], full[name], rtol=1e-12, atol=1e-15)
    assert not any(p.requires_grad or p.grad is not None for p in anchor.parameters())


def save_pair(root: Path, tokenizer, dtype=torch.float32) -> dict[str, Path]:
    anchor, donor = pair(len(tokenizer), dtype)
    paths = {"anchor": root / "anchor", "donor": root / "donor"}
    for key, model in (("anchor", anchor), ("donor", donor)):
        model.save_pretrained(paths[key], safe_serialization=True)
        tokenizer.save_pretrained(paths[key])
    return paths


def test_layer_granularity_writes_the_single_pass_scores(tmp_path, tokenizer):
    paths = save_pair(tmp_path, tokenizer, torch.float64)
    run = {
        granularity: compute_importance(
            str(paths["anchor"]),
            [str(paths["donor"])],
            PROMPTS,
            tmp_path / granularity,
            device=CPU,
            dtype=torch.float64,
            batch_size=2,
            granularity=granularity,
        )
        for granularity in ("layer", "model")
    }
    batches, groups = 3, 2 + 1  # 5 prompts in batches of 2; 2 decoder layers + the rest
    assert run["model"]["calibration_passes"] == {"forward": 2 * batches, "backward": batches}
    layer_passes = {"forward": batches + groups * batches, "backward": groups * batches}
    assert run["layer"]["calibration_passes"] == layer_passes
    assert (run["layer"]["gradient_groups"], run["model"]["gradient_groups"]) == (groups, 1)
    sidecar = json.loads((tmp_path / "layer" / SIDECAR).read_text())
    assert sidecar["granularity"] == "layer" and sidecar["calibration_passes"] == layer_passes
    kl = {g: r["donors"][0]["kl"] for g, r in run.items()}
    assert kl["layer"] == pytest.approx(kl["model"], rel=1e-12)

    # independent reference: the in-memory models, one full pass, -g * delta
    anchor, donor = pair(len(tokenizer), torch.float64)
    batch_list = tokenize_batches(tokenizer, PROMPTS, 2, 256)
    grads, _ = kl_gradients(anchor, batch_list, target_log_probs(donor, batch_list, CPU), CPU)
    anchor_state = {n: p.detach() for n, p in anchor.named_parameters()}
    donor_state = {n: p.detach() for n, p in donor.named_parameters()}
    expected = functional_scores(grads, anchor_state, donor_state.__getitem__)
    for granularity, report in run.items():
        file = report["donors"][0]["file"]
        scores = load_file(file)
        assert sorted(scores) == sorted(expected), granularity
        with safe_open(file, framework="pt") as handle:
            assert handle.metadata() == {"format": "pt", "donor": str(paths["donor"])}
        for name, score in scores.items():
            assert score.dtype == torch.float64, name
            torch.testing.assert_close(score, expected[name], rtol=1e-10, atol=1e-14)
    layer, model = (load_file(run[g]["donors"][0]["file"]) for g in ("layer", "model"))
    for name in model:
        torch.testing.assert_close(layer[name], model[name], rtol=1e-12, atol=1e-15)


def test_importance_command_feeds_plain_mergekit_yaml(tmp_path, tokenizer):
    paths = save_pair(tmp_path, tokenizer)
    data = tmp_path / "calibration.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": "x"}) + "\n" for p in PROMPTS))
    recipe = write_recipe(
        tmp_path / "recipe.yml",
        {
            "merge_method": "scf_rkl",
            "base_model": str(paths["anchor"]),
            "models": [{"model": str(paths["donor"])}],
            "parameters": {"density": 0.2},
            "dtype": "float32",
        },
    )
    out_dir = tmp_path / "importance"
    args = ["importance", str(recipe), str(out_dir), "--data", str(data), "--items", "4"]
    result = CliRunner().invoke(scf_rkl_command, [*args, "--batch-size", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    # default --granularity layer: 2 donor forwards, then 2 batches x (2 layers + the rest)
    assert "passes: 8 forward, 6 backward (3 gradient group(s), granularity layer)" in result.output

    sidecar = json.loads((out_dir / SIDECAR).read_text())
    assert sidecar["calibration_passes"] == {"forward": 8, "backward": 6}
    assert sidecar["granularity"] == "layer" and sidecar["gradient_groups"] == 3
    assert sidecar["items"] == 4 and sidecar["batches"] == 2 and sidecar["peak_rss_mib"] > 0
    scores = load_file(out_dir / "donor_0.safetensors")
    anchor, donor = (load_weights(paths[k]) for k in ("anchor", "donor"))
    assert set(scores) == set(anchor)

    copy = yaml.safe_load((out_dir / "recipe.yml").read_text())
    importance_file = copy["models"][0]["parameters"]["importance"]
    assert Path(importance_file) == (out_dir / "donor_0.safetensors").resolve()
    merged_dir = tmp_path / "merged"
    run = run_cli("mergekit-yaml", str(out_dir / "recipe.yml"), str(merged_dir))
    assert run.returncode == 0, run.stderr[-3000:]
    merged = load_weights(merged_dir)
    register_all()
    for name, tensor in merged.items():
        expected = merge_tensors(
            [anchor[name], donor[name]],
            "scf_rkl",
            base_index=0,
            name=name,
            parameters={"density": 0.2, "importance": importance_file},
        )
        assert torch.equal(tensor, expected), name
        if tensor.dim() == 2 and "embed" not in name and "lm_head" not in name:
            keep = torch.zeros(tensor.numel(), dtype=torch.bool)
            keep[scores[name].view(-1).topk(round(0.2 * tensor.numel())).indices] = True
            assert torch.equal(tensor != anchor[name], keep.view(tensor.shape)), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_scores_agree_with_cpu(tokenizer):
    anchor, donor = pair(len(tokenizer), torch.float32)
    batches = tokenize_batches(tokenizer, PROMPTS, 8, 32)
    cuda = torch.device("cuda")
    cpu_grads, _ = kl_gradients(anchor, batches, target_log_probs(donor, batches, CPU), CPU)
    anchor16, donor16 = anchor.to(cuda, torch.bfloat16), donor.to(cuda, torch.bfloat16)
    targets = target_log_probs(donor16, batches, cuda)
    gpu_grads, kl = kl_gradients(anchor16, batches, targets, cuda)
    assert kl > 0
    for name, grad in cpu_grads.items():
        gpu = gpu_grads[name]
        assert bool(torch.isfinite(gpu).all()), name
        cosine = torch.nn.functional.cosine_similarity(grad.view(-1), gpu.view(-1), dim=0)
        assert float(cosine) > 0.9, name
