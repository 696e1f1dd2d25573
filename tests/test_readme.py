"""The README's numbers are what the shipped quickstart prints (``benchmarks/readme_quickstart.py`` writes them)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("readme_quickstart", ROOT / "benchmarks" / "readme_quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_table_is_what_the_shipped_quickstart_prints(tmp_path):
    gen = _generator()
    output, _seconds = gen.run_quickstart(tmp_path)  # the shipped file, unchanged, run as the README says
    shown = gen.readme_table(gen.README.read_text())
    assert shown == gen.printed_table(output), "README out of date: run python benchmarks/readme_quickstart.py"
    assert "MaxSoftmax" in shown and "ID test accuracy" in shown
    assert not (tmp_path / "mlflow.db").stat().st_size == 0
