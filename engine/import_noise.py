"""Optional dependencies that print warnings merely by being imported, silenced unless asked for.

diffusers imports torchao whenever it is installed (it is, with `[dev]` or `[fp8]`), and torchao then warns about
each of its prebuilt C++ extensions that does not fit this torch / Python / GPU ("Failed to load ..._C_mxfp8...so"),
torch warns about how torchao registers its enums, and diffusers about torchao tensor types it cannot import. None
of it concerns a run that does not use those extensions (float8 training, train.precision=fp8-ao, does not load
them), so every command printed several alarming lines for nothing. The filters below drop exactly those messages;
`RISTRETTO_IMPORT_WARNINGS=1` shows them again (e.g. when debugging a torchao install).
"""
import logging
import os

# logger name -> the start of each message that is import noise
IMPORT_NOISE = {
    "torchao": ("Failed to load",),
    "torch.utils._pytree": ("%s is an Enum subclass",),
    "diffusers.quantizers.torchao.torchao_quantizer": ("Unable to import `torchao` Tensor objects",),
}
SHOW_ENV = "RISTRETTO_IMPORT_WARNINGS"


class DropImportNoise(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def silence_import_noise() -> None:
    """Install the filters once per process (before the noisy imports happen), unless RISTRETTO_IMPORT_WARNINGS=1."""
    if os.environ.get(SHOW_ENV) == "1":
        return
    for name, prefixes in IMPORT_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropImportNoise) for f in logger.filters):
            logger.addFilter(DropImportNoise(prefixes))
