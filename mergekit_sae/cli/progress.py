"""Quiet runs: the progress bars of the libraries that load models and files turned off."""

from __future__ import annotations


def silence_progress_bars() -> None:
    """Turn off the progress bars of the libraries that load models and files."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging

    disable_progress_bars()
    logging.disable_progress_bar()
