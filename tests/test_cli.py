import subprocess
import sys

import pytest

from ttc_vllm.cli import main


@pytest.mark.parametrize("argv, needle", [
    (["demo", "--tiers", "easy,extreme"], "unknown tier extreme"),
    (["demo", "--tiers", ""], "unknown tier"),
    (["demo", "--problems", "0"], "positive integer"),
    (["demo", "--k", "-3"], "positive integer"),
    (["demo", "--k", "many"], "positive integer"),
    (["demo", "--model", "/definitely/not/here"], "not a readable directory"),
    (["testbed", "train-policy", "--out", "/proc/version/x"], "not a writable directory"),
    (["nonsense"], "invalid choice"),
])
def test_bad_arguments_give_one_line_and_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err
    assert len(err.splitlines()) == 1


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "ttc_vllm.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout


def test_serve_comes_from_the_plugins_by_entry_point():
    from ttc_vllm.cli import registered_commands

    assert registered_commands()["serve"].value == "ttc_vllm_plugins.serve:serve_main"
    out = subprocess.run([sys.executable, "-m", "ttc_vllm.cli", "--help"], capture_output=True, text=True)
    assert "serve" in out.stdout
