"""The ``oncofm`` command line: a thin typer layer over the stage functions.

Each stage package contributes its commands through a ``register(app, train_app)`` function in its
own ``cli.py`` (so stages stay independent); heavy libraries are imported inside the commands, so
``oncofm --help`` is fast. Errors of type :class:`~oncofm.errors.OncoFMError` are printed as one
message without a traceback and exit with status 2.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import typer

from oncofm.errors import OncoFMError
from oncofm.logging_utils import setup_logging

app = typer.Typer(
    name="oncofm",
    help="OncoFM: explainable 5-year cancer survival prediction from multi-omics and H&E slides.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
train_app = typer.Typer(help="Train a model: omics, slide or fusion.", no_args_is_help=True)
app.add_typer(train_app, name="train")

# Stage modules that contribute commands (each defines register(app, train_app)).
_COMMAND_MODULES = (
    "oncofm.cohort.cli",
    "oncofm.survival.cli",
    "oncofm.omics.cli",
    "oncofm.pathology.cli",
    "oncofm.pathology.model_cli",
    "oncofm.fusion.cli",
    "oncofm.report.cli",
    "oncofm.web.cli",
    "oncofm.demo",
)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    setup_logging("DEBUG" if verbose else "INFO")


def _register_all() -> None:
    for name in _COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register(app, train_app)


_register_all()


def main() -> None:
    """Entry point: run the app, turning OncoFM errors into a clean message and exit status 2."""
    # OpenMP threads that spin while waiting make torch 10-30x slower on a CPU shared with other work
    # (measured here: 150 s vs 8 s for the same generation); passive waiting costs little when it is not.
    # Must be set before torch loads (commands import it lazily); a user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        app(standalone_mode=False)
    except OncoFMError as exc:
        logging.getLogger("oncofm").debug("error", exc_info=True)
        typer.secho(f"Error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.secho("Aborted.", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.secho("Interrupted; finished artifacts are kept, the next run resumes.", err=True)
        sys.exit(130)
    except Exception as exc:  # click usage errors come here with standalone_mode=False
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
