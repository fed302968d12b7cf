"""The console of an OncoFM command shows OncoFM's log lines and warnings, not third-party chatter.

Checked in a fresh interpreter, as the ``oncofm`` command runs: inside pytest the root logger already has
pytest's capture handlers (so ``setup_logging`` would not install its rich handler) and pytest records
warnings itself. The child calls ``setup_logging`` and then emits, from modules named like a third-party
library and like OncoFM, what the demo's console used to be cluttered with; the test reads the child's
stdout and stderr together (rich writes log lines to stdout, libraries write to stderr).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent('''
    import logging, sys, warnings
    from oncofm.logging_utils import setup_logging

    setup_logging(sys.argv[1])

    def module(name, source):  # run `source` as module `name` (its frames carry that __name__)
        ns = {"__name__": name, "warnings": warnings, "logging": logging}
        exec(compile(source, f"/opt/site-packages/{name.replace('.', '/')}.py", "exec"), ns)
        return ns

    lib = module("fakelib.core", "def old_api():\\n"
                 "    warnings.warn('FAKELIB-FUTURE', FutureWarning, stacklevel=2)\\n"
                 "warnings.warn('FAKELIB-USER', UserWarning)\\n")
    # a library's deprecation warning attributed (stacklevel=2) to the OncoFM code that called it
    own = module("oncofm.fakestage", "def run(lib):\\n    lib['old_api']()\\n"
                 "warnings.warn('ONCOFM-OWN-WARNING')\\n")
    own["run"](lib)
    module("fakelib.numeric", "import numpy\\nnumpy.log(numpy.zeros(1))\\n")  # a RuntimeWarning from C code
    logging.getLogger("transformers.modeling_utils").info("TRANSFORMERS-INFO")
    logging.getLogger("transformers.modeling_utils").warning("TRANSFORMERS-WARNING")
    logging.getLogger("accelerate.state").info("ACCELERATE-INFO")
    logging.getLogger("PIL.PngImagePlugin").debug("PIL-DEBUG")
    logging.getLogger("oncofm.pipeline").info("ONCOFM-INFO")
    from tqdm import tqdm
    for _ in tqdm(range(3), desc="TQDM-BAR"):
        pass
    if len(sys.argv) > 2:  # the real libraries
        from transformers.utils import logging as hf_logging
        hf_logging.get_logger("transformers.modeling_utils").warning("HF-LOGGER-WARNING")
        for _ in hf_logging.tqdm(range(3), desc="Loading weights"):
            pass
    from oncofm.logging_utils import make_progress, track
    for _ in track(range(2), "ONCOFM-PROGRESS"):
        pass
    with make_progress() as bar:  # a hidden bar (progress=False) leaves no empty line behind
        bar.advance(bar.add_task("HIDDEN-BAR", total=1, visible=False))
    logging.getLogger("oncofm.pipeline").info("ONCOFM-LAST")
''')

THIRD_PARTY = ("FAKELIB-FUTURE", "FAKELIB-USER", "divide by zero", "TRANSFORMERS-INFO", "TRANSFORMERS-WARNING",
               "ACCELERATE-INFO", "PIL-DEBUG", "TQDM-BAR", "HF-LOGGER-WARNING", "Loading weights")


def _console(level: str, *extra: str) -> str:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TQDM_", "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS"))}
    env.update(COLUMNS="200", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, level, *extra], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_third_party_output_stays_off_the_console() -> None:
    out = _console("INFO")
    assert "ONCOFM-INFO" in out
    assert "ONCOFM-OWN-WARNING" in out  # OncoFM's own warnings are not hidden
    assert "ONCOFM-PROGRESS" in out  # nor its own progress bars
    leaked = [s for s in THIRD_PARTY if s in out]
    assert not leaked, f"third-party output on the console: {leaked}\n{out}"
    assert "ONCOFM-LAST" in out and "HIDDEN-BAR" not in out and "\n\n" not in out, out


def test_verbose_shows_third_party_warnings_as_debug() -> None:
    out = _console("DEBUG")
    assert "ONCOFM-INFO" in out and "ONCOFM-OWN-WARNING" in out
    assert "FAKELIB-FUTURE" in out and "divide by zero" in out  # `oncofm -v`: routed to DEBUG records
    assert "TRANSFORMERS-WARNING" in out  # libraries one level louder
    assert "TQDM-BAR" not in out and "PIL-DEBUG" not in out


def test_real_transformers_logging_and_bars_are_quiet() -> None:
    pytest.importorskip("transformers")
    out = _console("INFO", "transformers")
    assert "ONCOFM-INFO" in out
    assert "HF-LOGGER-WARNING" not in out and "Loading weights" not in out, out
