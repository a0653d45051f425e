"""TensorFlow imported without the optional libraries Keras loads but our CLIs never use.

``import tensorflow`` imports Keras, and Keras imports pandas (so that ``fit()`` accepts DataFrames; pandas brings
pyarrow) and IPython (to display its saved-model file editor in a notebook) whenever they are installed, each behind
``try: import ... except ImportError``. A training process feeds ``fit()`` tf.data and displays nothing, yet holds
them resident for its whole run (bench/RESULTS.md, "Issue 26, eighth run"). `import_tensorflow` imports TensorFlow
with them hidden, so Keras takes the path it takes when they are not installed, then makes them importable again::

    from covidseg_tf.optional_imports import import_tensorflow
    import_tensorflow()          # in a CLI's main(), once its flags are parsed, before anything imports TensorFlow

Afterwards ``import pandas`` works as usual; only Keras' own DataFrame input and notebook display stay off in that
process. ``COVIDSEG_OPTIONAL_IMPORTS=keep`` imports TensorFlow as it comes. `hidden` is the mechanism:

    >>> import sys
    >>> with hidden(["a_module_nobody_has", "sys"]) as names:
    ...     names, "a_module_nobody_has" in sys.modules
    (['a_module_nobody_has'], True)
    >>> "a_module_nobody_has" in sys.modules
    False
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Mapping

log = logging.getLogger(__name__)

#: The libraries Keras imports if installed and a training or prediction CLI does not use.
KERAS_OPTIONAL = ("pandas", "IPython")
#: The variable that turns the hiding off: "keep" imports TensorFlow with them.
CHOICE = "COVIDSEG_OPTIONAL_IMPORTS"


@contextlib.contextmanager
def hidden(names: Iterable[str]) -> Iterator[list[str]]:
    """Within the block, ``import name`` (and ``import name.sub``) raises ImportError, as if not installed, for each
    of `names` not imported yet (Python's rule for a ``None`` entry of ``sys.modules``); afterwards they import as
    usual. Yields the names it hid (those already imported it leaves alone)."""
    names = [name for name in names if name not in sys.modules]
    for name in names:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield names
    finally:
        for name in names:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def import_tensorflow(environ: Mapping[str, str] = os.environ) -> list[str]:
    """Import TensorFlow (and with it Keras) with `KERAS_OPTIONAL` hidden; return the names left out ([] when
    TensorFlow was already imported, or with ``COVIDSEG_OPTIONAL_IMPORTS=keep``: then it imports them as usual).

    Raises:
        ImportError: a TensorFlow or Keras version that needs one of them at import, naming the variable that
            turns the hiding off.
    """
    if "tensorflow" in sys.modules:
        return []
    with hidden(KERAS_OPTIONAL if environ.get(CHOICE) != "keep" else ()) as names:
        try:
            import tensorflow  # noqa: F401
        except ImportError as e:
            if getattr(e, "name", None) in names:
                raise ImportError(f"TensorFlow or Keras needs {e.name} at import now: set {CHOICE}=keep") from e
            raise
    if names:
        log.debug("TensorFlow imported without %s", ", ".join(names))
    return names
