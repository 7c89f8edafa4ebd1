import subprocess
import sys

import pytest
from typer.testing import CliRunner

from alexnet_mlflow.cli import _bool_values_as_flags, app
from alexnet_mlflow.config import fields
from alexnet_mlflow.errors import ConfigError
from conftest import free_port, run_cli

runner = CliRunner()


def test_help_lists_every_config_option():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for f in fields():
        assert f"--{f.name.replace('_', '-')}" in result.output
    assert "--experiment" in result.output and "--tracking-uri" in result.output


def test_importing_the_cli_imports_neither_torch_nor_mlflow():
    code = "import sys, alexnet_mlflow.cli; print(sorted({'torch', 'mlflow'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_python_dash_m_works():
    result = subprocess.run([sys.executable, "-m", "alexnet_mlflow", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout


def test_bool_values_become_flags_for_mlproject():
    assert _bool_values_as_flags(["train", "--batch-norm=true", "--hflip=false", "--lr=1"]) == \
        ["train", "--batch-norm", "--no-hflip", "--lr=1"]
    assert _bool_values_as_flags(["train", "--batch-norm=TRUE"]) == ["train", "--batch-norm"]
    # flags without an off form are dropped when false
    assert _bool_values_as_flags(["compare", "--all=false", "--asc=true", "--desc=false"]) == ["compare", "--asc"]
    assert _bool_values_as_flags(["--help"]) == ["--help"]
    with pytest.raises(ConfigError, match="batch_norm='maybe' is invalid: expected true or false"):
        _bool_values_as_flags(["train", "--batch-norm=maybe"])


def test_integers_accept_integral_floats_from_mlproject(workdir):
    result = runner.invoke(app, ["train", "--dataset", "synthetic", "--epochs", "2.0", "--dry-run"])
    assert result.exit_code == 0, result.output


def test_dry_run_checks_and_logs_nothing(workdir):
    result = runner.invoke(app, ["train", "--dataset", "synthetic", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "dry run ok: relu-lr1e-4-bs64-do0.8 on cpu: 900 train / 100 val / 200 test images" in result.output
    assert "35,855,178 parameters" in result.output
    assert not (workdir / "mlflow.db").exists()


BAD_INPUTS = [
    (["--activation", "foo"], ["'foo'", "relu, leaky_relu, sigmoid"]),
    (["--dropout", "1.5"], ["dropout=1.5", "[0, 1)"]),
    (["--dropout", "-0.1"], ["dropout=-0.1", "[0, 1)"]),
    (["--batch-size", "0"], ["batch_size=0", "> 0"]),
    (["--lr", "0"], ["lr=0.0", "> 0"]),
    (["--lr", "abc"], ["'abc'", "--lr", "not a number"]),
    (["--epochs", "2.5"], ["'2.5'", "--epochs", "not an integer"]),
    (["--epochs", "0"], ["epochs=0", "> 0"]),
    (["--batch-norm=maybe"], ["'maybe'", "true or false"]),
]


@pytest.mark.parametrize("args, words", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_no_run(workdir, args, words):
    result = run_cli("train", "--dataset", "synthetic", *args, cwd=workdir, timeout=10)
    assert_one_line_error(result, words)
    assert not (workdir / "mlflow.db").exists()  # rejected before any run was created


def test_folder_without_cifar10(workdir):
    data_dir = workdir / "mydata"
    data_dir.mkdir()
    (data_dir / "readme.txt").write_text("cats")
    result = run_cli("train", "--data-dir", str(data_dir), cwd=workdir, timeout=10)
    assert_one_line_error(result, [str(data_dir), "holds no CIFAR-10", "cifar-10-batches-py"])
    assert not (workdir / "mlflow.db").exists()


def test_unreachable_tracking_server(workdir):
    uri = f"http://127.0.0.1:{free_port()}"
    result = run_cli("train", "--dataset", "synthetic", "--tracking-uri", uri, cwd=workdir, timeout=10)
    assert_one_line_error(result, [uri, "does not answer", "mlflow server"])


def assert_one_line_error(result: subprocess.CompletedProcess, words: list[str]) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("alexnet-mlflow: error: ")
    for word in words:
        assert word in lines[0]


def test_train_on_an_image_folder_without_test_split(workdir, write_image_folder):
    write_image_folder(workdir / "images", ["cat", "dog"], per_class=6, test=False)
    bad = workdir / "images" / "train" / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG broken")
    result = run_cli("train", "--data-dir", str(workdir / "images"), "--epochs", "1", "--batch-size", "4",
                     "--val-fraction", "0.25", "--quiet", cwd=workdir)
    assert_one_line_error(result, [str(bad), "not a readable image", "--skip-bad-images"])
    result = run_cli("train", "--data-dir", str(workdir / "images"), "--epochs", "1", "--batch-size", "4",
                     "--val-fraction", "0.25", "--skip-bad-images", "--quiet", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "no test split: test metrics not logged" in result.stdout


@pytest.mark.parametrize("layout", ["cifar-10-batches-py", "cifar-10-python.tar.gz", "image-folder"])
def test_every_layout_trains_from_data_dir(workdir, layout, write_cifar_batches, write_image_folder):
    import tarfile

    root = workdir / "data"
    if layout == "image-folder":
        write_image_folder(root, ["cat", "dog", "ship"], per_class=10)
    else:
        batches = write_cifar_batches(workdir / "src" / "cifar-10-batches-py", per_batch=10)
        if layout == "cifar-10-batches-py":
            root = batches.parent
        else:
            root.mkdir()
            with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
                tar.add(batches, arcname="cifar-10-batches-py")
    result = runner.invoke(app, ["train", "--data-dir", str(root), "--batch-size", "8", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"{layout} at {root}" in result.output
