import subprocess
import sys

import pytest

from belm_kernels.cli import main


def test_demo_prints_table_step_times_and_plot(tmp_path, capsys):
    plot = tmp_path / "conv.png"
    assert main(["demo", "--steps", "10,20", "--method", "obelm,ddim", "--dtype", "float32",
                 "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    vp, flow = out.split("Rectified flow")
    assert "| obelm | 20 |" in vp and "| ddim | 10 |" in vp and "euler" not in vp
    assert "| obelm | 20 |" in flow and "| euler | 10 |" in flow  # ddim is Euler on a flow
    assert "FlowSchedule(shift=3.0" in flow
    assert "round trip float32" in out
    assert "| torch |" in out and " us |" in out
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_demo_flow_only_with_dynamic_shifting(capsys):
    assert main(["demo", "--schedule", "flow", "--mu", "1.15", "--steps", "4,8",
                 "--method", "euler,obelm", "--dtype", "float64"]) == 0
    out = capsys.readouterr().out
    assert "Accuracy on the analytic" not in out
    assert "FlowSchedule(use_dynamic_shifting=True, mu=1.15" in out
    assert "| euler | 4 |" in out and "| obelm | 8 |" in out
    assert "Measured convergence order (slope of error vs N): euler" in out


def test_demo_rejects_a_bad_flow_schedule(capsys):
    assert main(["demo", "--shift", "0"]) == 2
    assert "shift must be > 0" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["demo", "--method", "dpm"], ["demo", "--dtype", "int8"],
                                  ["demo", "--steps", "ten"], ["demo", "--backend", "metal"],
                                  ["demo", "--schedule", "ve"], ["demo", "--shift", "big"]])
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
