"""Scoring through the lm-eval adapter outside a git checkout prints no git error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

TESTS = Path(__file__).parent
SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from evaluate_toy import make_tokenizer, random_llama
from mergekit_sae.evaluate import TaskSpec, load_task
from mergekit_sae.evaluate.lm_eval_export import write_lm_eval_task
root = Path.cwd()
items = [{"prompt": "the sky is", "choices": ["blue", "green"], "label": 0},
         {"prompt": "grass is", "choices": ["blue", "green"], "label": 1}]
(root / "mc.jsonl").write_text("".join(__import__("json").dumps(i) + "\\n" for i in items))
spec = TaskSpec(name="mc", type="multiple_choice", test=root / "mc.jsonl")
write_lm_eval_task(spec, root, "toy_mc")
task = load_task({"name": "toy_mc", "type": "lm_eval", "include_path": [root]})
import lm_eval.evaluator as evaluator
hashes = []
original = evaluator.simple_evaluate
def spy(*args, **kwargs):
    result = original(*args, **kwargs)
    hashes.append(result.get("git_hash"))
    return result
evaluator.simple_evaluate = spy
import lm_eval
lm_eval.simple_evaluate = spy
scores = task.score(random_llama(seed=2), make_tokenizer(), task.items("test"))
print("RESULT", __import__("json").dumps({"scores": scores, "hashes": hashes}))
"""


def score_in(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["GIT_CEILING_DIRECTORIES"] = str(cwd.parent)  # no repository above the folder either
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(TESTS)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_no_git_noise_outside_a_repository(tmp_path: Path) -> None:
    result = score_in(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not a git repository" not in result.stderr + result.stdout
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    data = json.loads(line.removeprefix("RESULT "))
    assert len(data["scores"]) == 2
    assert data["hashes"] == [None]  # lm-eval's own answer outside a repository, unchanged
