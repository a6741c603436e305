"""Progress bars: on for a terminal, off otherwise (tqdm's rule), and RISTRETTO_PROGRESS=0/1 switches them."""
import io

import pytest

from ristretto.engine.progress import PROGRESS_ENV, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("setting, stream, shown", [("", Terminal, True), ("", io.StringIO, False),
                                                     ("0", Terminal, False), ("1", io.StringIO, True)])
def test_progress_bar_follows_the_terminal_and_the_switch(monkeypatch, setting, stream, shown):
    monkeypatch.setenv(PROGRESS_ENV, setting)
    out = stream()
    assert list(progress_bar(range(3), desc="work", file=out)) == [0, 1, 2]
    assert ("work" in out.getvalue()) == shown


def test_sampling_shows_its_steps(monkeypatch, capsys):
    """The sampler's loop reports each denoising step (here forced on: pytest's stderr is not a terminal)."""
    import torch

    from ristretto.engine.config import build_config
    from ristretto.engine.diffusion import Diffusion
    from ristretto.engine.sample import generate

    monkeypatch.setenv(PROGRESS_ENV, "1")
    config = build_config("tiny-class", [])
    model = lambda x, t, **kw: torch.zeros_like(x)  # noqa: E731 - the sampler's loop is what is tested
    generate(model, Diffusion(config.diffusion), {"label": torch.tensor([0])}, {"label": torch.tensor([0])},
             (1, 2, 3, 4, 4), 1.0, 3, 0, "cpu")
    err = capsys.readouterr().err
    assert "sampling:" in err and "/3 " in err  # a bar over the 3 sampler steps
