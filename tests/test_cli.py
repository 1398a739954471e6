import subprocess
import sys

import pytest

from belm_kernels.cli import main


def test_demo_prints_table_step_times_and_plot(tmp_path, capsys):
    plot = tmp_path / "conv.png"
    assert main(["demo", "--steps", "10,20", "--method", "obelm,ddim", "--dtype", "float32",
                 "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "| obelm | 20 |" in out and "| ddim | 10 |" in out
    assert "round trip float32" in out
    assert "| torch |" in out and " us |" in out
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args", [["demo", "--method", "dpm"], ["demo", "--dtype", "int8"],
                                  ["demo", "--steps", "ten"], ["demo", "--backend", "metal"]])
def test_demo_rejects_bad_options(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert "error: argument --" in capsys.readouterr().err


def test_backends_command(capsys):
    assert main(["backends"]) == 0
    assert "cpu   torch   available" in capsys.readouterr().out


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "belm_kernels.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "demo" in out and "build" in out


def test_build_command_builds_the_cpu_extension(capsys):
    assert main(["build", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "cpu: built" in out
    assert ("cuda: built" if __import__("torch").cuda.is_available() else "cuda: skipped") in out
