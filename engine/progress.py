"""Progress bars for every command that works for more than a few seconds (tqdm, on stderr).

Shown only when stderr is a terminal (tqdm's own rule, so logs and CI output stay clean); RISTRETTO_PROGRESS=0 hides
them everywhere, RISTRETTO_PROGRESS=1 forces them on (e.g. under `script` or a notebook).
"""
import os

from tqdm import tqdm

PROGRESS_ENV = "RISTRETTO_PROGRESS"


def progress_disabled() -> bool | None:
    """tqdm's `disable`: True (off), False (on), None (on only on a terminal)."""
    return {"0": True, "1": False}.get(os.environ.get(PROGRESS_ENV, "").strip())


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """tqdm with Ristretto's on/off rule; inner bars (e.g. sampler steps under the training bar) pass leave=False."""
    return tqdm(iterable, disable=progress_disabled(), dynamic_ncols=True, **kwargs)
