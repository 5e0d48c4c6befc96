"""The third-party model libraries' own output: kept out of ours."""

from __future__ import annotations


def quiet_libraries() -> None:
    """Keep diffusers/transformers progress bars and advisory warnings out of our output."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
