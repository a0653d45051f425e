"""The exit codes of every command-line tool, in one place (standard library only at import: `--help` stays light).

    0    OK           everything asked for was done
    1    FAILED       some input failed (reported and skipped; the others were processed) or the work itself
                      failed (a dataset that cannot be built, a training run that produced no model)
    2    USAGE        the command line cannot be run as given: a bad flag value, a model, output or weights path
                      that cannot be used, earlier results without --overwrite; found before any work, nothing
                      written (argparse's own errors also exit 2)
    130  INTERRUPTED  Ctrl-C (SIGINT; 128 + 2, the shells' convention): one line instead of a traceback; what was
                      written is complete (each tool writes its files atomically)

`predict`, `batch_predict`, `serve_client`, `train`, `export`, `ensemble`, `evaluate`, `tune` and `demo` use these
codes; each one's ``--help`` ends with `EPILOG`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn

OK = 0
FAILED = 1
USAGE = 2
INTERRUPTED = 130

EPILOG = ("exit codes: 0 done; 1 some input failed (or the work failed); 2 usage error (bad flag or path, nothing "
          "done); 130 interrupted (Ctrl-C)")
"""One line for the end of each CLI's --help epilog."""


def interrupted(prog: str, detail: str = "") -> int:
    """Print the one line a Ctrl-C gets (``<prog>: interrupted (Ctrl-C)[; detail]``) and return INTERRUPTED."""
    print(f"{prog}: interrupted (Ctrl-C){'; ' + detail if detail else ''}", file=sys.stderr, flush=True)
    return INTERRUPTED


def run_cli(main: Callable[[], Any], prog: str, detail: str = "") -> NoReturn:
    """Run a CLI's `main()` and exit: its int result is the exit code (anything else: OK); a KeyboardInterrupt
    ends with `interrupted`'s one line and exit code 130 instead of a traceback."""
    try:
        code = main()
    except KeyboardInterrupt:
        code = interrupted(prog, detail)
    sys.exit(code if isinstance(code, int) else OK)


def run_dataset_cli(main: Callable[[], Any], prog: str, detail: str = "") -> NoReturn:
    """`run_cli` for the tools that read a TFDS dataset (evaluate, tune): a dataset that cannot be built or loaded
    ends with ``error: ...`` (FAILED), a FileNotFoundError or ValueError (a model that cannot be loaded, an unknown
    --dataset) with ``<prog>: error: ...`` (USAGE): one line each, no traceback."""

    def guarded() -> int:
        from covidseg_tf.data import DatasetError  # imported late: --help stays light
        from tfds_covidqu.covid_qu_ex.sources import CovidQuExDataError

        try:
            main()
        except (DatasetError, CovidQuExDataError) as e:
            sys.exit(f"error: {e}")  # printed by Python, exit code FAILED
        except (FileNotFoundError, ValueError) as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return USAGE
        return OK

    run_cli(guarded, prog, detail)
