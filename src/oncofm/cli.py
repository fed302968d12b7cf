"""The ``oncofm`` command line: a thin typer layer over the stage functions.

Each stage package contributes its commands through a ``register(app, train_app)`` function in its
own ``cli.py`` (so stages stay independent); heavy libraries are imported inside the commands, so
``oncofm --help`` is fast. Errors of type :class:`~oncofm.errors.OncoFMError` are printed as one
message without a traceback and exit with status 2.
"""

from __future__ import annotations

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
    # Help texts are plain text: with typer's default ("rich") markup mode, any "[word ...]" in a docstring
    # or option help is parsed as a rich style tag and silently dropped ("on [soft tokens + prompt] ->" became
    # "on  ->"). The root group's mode applies to every command and sub-group registered below.
    rich_markup_mode=None,
)
train_app = typer.Typer(help="Train a model: omics, slide or fusion.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(train_app, name="train")

# Stage modules that contribute commands (each defines register(app, train_app)); plain imports, so a
# broken or renamed module fails loudly here instead of silently losing its commands.
from oncofm import demo as _demo  # noqa: E402
from oncofm.cohort import cli as _cohort_cli  # noqa: E402
from oncofm.explain import cli as _explain_cli  # noqa: E402
from oncofm.fusion import cli as _fusion_cli  # noqa: E402
from oncofm.omics import cli as _omics_cli  # noqa: E402
from oncofm.pathology import cli as _pathology_cli  # noqa: E402
from oncofm.pathology import model_cli as _slide_model_cli  # noqa: E402
from oncofm.pathology.cells import cli as _cells_cli  # noqa: E402
from oncofm.survival import cli as _survival_cli  # noqa: E402
from oncofm.web import cli as _web_cli  # noqa: E402

_COMMAND_MODULES = (_cohort_cli, _survival_cli, _omics_cli, _pathology_cli, _slide_model_cli, _cells_cli,
                    _fusion_cli, _explain_cli, _web_cli, _demo)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging (also shows third-party "
                                                                      "libraries' warnings and messages).")) -> None:
    # before any command imports torch/transformers: third-party progress bars, chatter and warnings are
    # kept off the console (oncofm.logging_utils.quiet_third_party); OncoFM's own lines and warnings stay
    setup_logging("DEBUG" if verbose else "INFO", quiet_libraries=True)


def _register_all() -> None:
    for module in _COMMAND_MODULES:
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
        if _is_usage_error(exc):
            exc.show()
            sys.exit(exc.exit_code)
        raise


def _is_usage_error(exc: BaseException) -> bool:
    """A click usage error (missing or unknown option ...), from click or the copy of click typer bundles."""
    import click

    kinds: list[type] = [click.ClickException]
    try:
        from typer._click.exceptions import ClickException as BundledClickException  # typer >= 0.29

        kinds.append(BundledClickException)
    except ImportError:
        pass
    return isinstance(exc, tuple(kinds))
