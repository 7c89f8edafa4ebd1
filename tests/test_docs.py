"""The README documents what the code does: every parameter with its real default."""

from alexnet_mlflow.config import fields, format_param
from conftest import REPO

README = (REPO / "README.md").read_text()


def test_readme_lists_every_parameter_with_its_default():
    for f in fields():
        assert f"| `{f.name}` | `{format_param(f.default)}` |" in README, f.name


def test_readme_quick_start_has_the_install_and_test_commands():
    assert "pip install -e . && alexnet-mlflow train" in README
    assert "pip install -e '.[test]' && python -m pytest -q" in README
    assert "python3 -m pytest -q" in (REPO / ".ci" / "run").read_text()
