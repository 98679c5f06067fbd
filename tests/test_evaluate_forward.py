"""The cached forward pass under the installed transformers' name for the key-value cache."""

from __future__ import annotations

import warnings

import torch
from tiny_models import make_llama
from transformers import DynamicCache

from mergekit_sae.evaluate.forward import cache_argument, forward_cached, left_pad


class NewStyle(torch.nn.Module):
    def forward(self, input_ids=None, cache=None):
        return cache


class OldStyle(torch.nn.Module):
    def forward(self, input_ids=None, past_key_values=None):
        return past_key_values


def test_the_cache_goes_under_the_name_the_forward_takes() -> None:
    cache = object()
    assert cache_argument(NewStyle(), cache) == {"cache": cache}
    assert cache_argument(OldStyle(), cache) == {"past_key_values": cache}
    for model in (NewStyle(), OldStyle()):
        assert model(**cache_argument(model, cache)) is cache


def test_cached_steps_match_a_full_forward_without_deprecation_warnings() -> None:
    model = make_llama(0).eval()
    ids, mask, positions = left_pad([[5, 6, 7, 8], [9, 10]], pad=0, device="cpu")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        cache = DynamicCache()
        first = forward_cached(model, ids[:, :-1], mask[:, :-1], positions[:, :-1], cache)
        step = forward_cached(model, ids[:, -1:], mask, positions[:, -1:], cache)
        full = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert torch.allclose(first, full[:, -2], atol=1e-5)
    assert torch.allclose(step, full[:, -1], atol=1e-5)
