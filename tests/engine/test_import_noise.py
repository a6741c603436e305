"""Importing diffusers (which imports torchao when installed) prints nothing unless RISTRETTO_IMPORT_WARNINGS=1."""
import importlib.util
import os
import subprocess
import sys

import pytest

IMPORTS = "import ristretto.engine; from diffusers import AutoencoderKL"


def stderr_of(code: str, **env) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stderr


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed: nothing to silence")
def test_optional_dependency_import_warnings_are_silenced_unless_asked():
    shown = stderr_of(IMPORTS, RISTRETTO_IMPORT_WARNINGS="1")
    if "Failed to load" not in shown and "torchao" not in shown:
        pytest.skip("this torchao build loads all its extensions: no noise to silence here")
    assert stderr_of(IMPORTS) == ""
