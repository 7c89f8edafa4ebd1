import subprocess
import sys

import pytest

from alexnet_mlflow.runtime import GLIBC_TUNABLES, malloc_env
from conftest import cli_env

pytestmark = pytest.mark.skipif(not malloc_env(), reason="GLIBC_TUNABLES exists on glibc (Linux) only")

SHOW = ("from alexnet_mlflow import runtime; runtime.restart_with_fast_malloc(); "
        "import os, sys; print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])")


def run_python(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in cli_env().items() if k != "GLIBC_TUNABLES"}
    return subprocess.run([sys.executable, *args], env={**base, **env}, capture_output=True, text=True, timeout=60)


def test_restarts_once_with_the_malloc_setting_and_the_same_arguments():
    result = run_python("-c", SHOW, "train", "--epochs", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{GLIBC_TUNABLES} ['train', '--epochs', '2']"


def test_a_users_own_setting_is_left_alone():
    result = run_python("-c", SHOW, GLIBC_TUNABLES="glibc.malloc.arena_max=2")
    assert result.stdout.strip() == "glibc.malloc.arena_max=2 []"


@pytest.mark.parametrize("command, restarts", [("train", True), ("sweep", True), ("compare", False)])
def test_only_training_commands_restart(command, restarts):
    """The code prints the setting it sees, then runs the CLI: a restart runs it twice."""
    code = (f"import os, sys; print('seen', os.environ.get('GLIBC_TUNABLES'), flush=True); "
            f"sys.argv = ['alexnet-mlflow', '{command}', '--help']; from alexnet_mlflow import cli; cli.main()")
    result = run_python("-c", code)
    assert result.returncode == 0, result.stderr
    seen = [line for line in result.stdout.splitlines() if line.startswith("seen")]
    assert seen == (["seen None", f"seen {GLIBC_TUNABLES}"] if restarts else ["seen None"])
