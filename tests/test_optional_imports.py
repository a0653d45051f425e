"""covidseg_tf.optional_imports: TensorFlow imported without Keras' optional pandas / IPython, which stay importable."""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from covidseg_tf import optional_imports
from covidseg_tf.optional_imports import hidden, import_tensorflow

REPO = Path(__file__).resolve().parents[1]

# a fresh interpreter: this test process has imported TensorFlow already
PROBE = textwrap.dedent("""
    import json, sys
    from covidseg_tf.optional_imports import import_tensorflow
    left_out = import_tensorflow()
    loaded = sorted(name for name in ("pandas", "IPython") if sys.modules.get(name) is not None)
    from keras.src.trainers.data_adapters import array_slicing
    import numpy as np, keras
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    loss = model.fit(np.ones((4, 3)), np.ones((4, 1)), verbose=0).history["loss"][0]
    import pandas
    print(json.dumps({"left_out": left_out, "loaded": loaded, "keras_pandas": array_slicing.pandas is not None,
                      "pandas_after": pandas.DataFrame({"a": [1]}).shape[0], "loss": loss}))
""")


def _probe(**env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tensorflow_without_pandas_and_ipython_which_import_afterwards():
    pytest.importorskip("pandas")
    got = _probe()
    assert set(got["left_out"]) <= {"pandas", "IPython"} and "pandas" in got["left_out"]
    assert got["loaded"] == []  # neither was imported with TensorFlow and Keras
    assert got["keras_pandas"] is False  # Keras took its "not installed" path
    assert got["loss"] >= 0  # Keras trains on arrays as before
    assert got["pandas_after"] == 1  # and pandas imports and works afterwards


def test_keep_imports_tensorflow_as_it_comes():
    pytest.importorskip("pandas")
    got = _probe(**{optional_imports.CHOICE: "keep"})
    assert got["left_out"] == [] and "pandas" in got["loaded"] and got["keras_pandas"] is True


def test_nothing_hidden_once_tensorflow_is_imported():
    import tensorflow  # noqa: F401

    assert import_tensorflow() == []


def test_hidden_raises_import_error_inside_and_restores_afterwards():
    name = "covidseg_test_not_a_module"
    with hidden([name, "json"]) as names:
        assert names == [name]  # json is imported already: left alone
        with pytest.raises(ImportError):
            __import__(name)
        with pytest.raises(ImportError):
            __import__(f"{name}.sub")
        assert sys.modules["json"] is json
    assert name not in sys.modules


def test_hidden_restores_after_an_error():
    name = "covidseg_test_not_a_module"
    with pytest.raises(RuntimeError), hidden([name]):
        raise RuntimeError("boom")
    assert name not in sys.modules


def test_a_version_needing_a_hidden_module_names_the_variable(monkeypatch):
    class NeedsPandas:  # stands for a TensorFlow whose import needs pandas
        def find_spec(self, fullname, path=None, target=None):
            if fullname == "tensorflow":
                import pandas  # noqa: F401  (hidden: raises ImportError with name="pandas")
            return None

    finder = NeedsPandas()
    saved = {name: mod for name, mod in sys.modules.items() if name in ("tensorflow", "pandas", "IPython")}
    for name in saved:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    with pytest.raises(ImportError, match=optional_imports.CHOICE):
        import_tensorflow({})
    assert sys.modules.get("pandas", "absent") is not None  # not left hidden


def test_docstring_examples():
    assert doctest.testmod(optional_imports).failed == 0


@pytest.mark.parametrize("cli", ["train", "demo"])
def test_training_clis_import_tensorflow_lean_after_parsing_their_flags(cli):
    """`--help` imports no TensorFlow; a command imports it without pandas right after parsing its flags (a fresh
    process: this one has TensorFlow; the command stops there)."""
    probe = textwrap.dedent(f"""
        import json, sys
        from covidseg_tf import optional_imports, {cli}
        try:
            {cli}.main(["--help"])
        except SystemExit:
            pass
        helped = "tensorflow" in sys.modules
        lean = optional_imports.import_tensorflow

        def then_stop():
            lean()
            raise SystemExit(0)

        optional_imports.import_tensorflow = then_stop
        try:
            {cli}.main(["--stage", "lung"] if "{cli}" == "train" else [])
        except SystemExit:
            pass
        print(json.dumps({{"help": helped, "tf": "tensorflow" in sys.modules, "pandas": "pandas" in sys.modules}}))
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"help": False, "tf": True, "pandas": False}
