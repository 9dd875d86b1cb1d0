"""`fieldlib --help` lists every sub-command; each sub-command's --help explains its options."""

from __future__ import annotations

import pytest

from fieldlib.cli import main


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_lists_commands(capsys):
    out = _help(capsys)
    for command in ("infer", "gradcheck", "charades"):
        assert command in out


@pytest.mark.parametrize("argv, options", [
    (("infer",), ["--evid", "--task", "--engine", "--output", "--memory-budget", "--option",
                  "--list-options"]),
    (("gradcheck",), ["--seed", "--trials"]),
    (("charades", "eval", "classify"), ["--gt", "--submission", "--json", "--lenient"]),
    (("charades", "info"), ["--train"]),
    (("charades", "train"), ["--run-dir", "--resume", "--mode", "--backbone", "--data",
                             "--weights", "--drop", "--accumulate", "--lr-milestones"]),
    (("charades", "predict"), ["--run-dir", "--flow-run-dir", "--fusion", "--split"]),
])
def test_subcommand_help_explains_options(capsys, argv, options):
    out = _help(capsys, *argv)
    for option in options:
        assert option in out, f"{' '.join(argv)} --help does not mention {option}"


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: fieldlib" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--help"], ["nosuch"], ["infer"], ["infer", "--bogus"],
                                  ["gradcheck", "--trials", "x"], []])
def test_help_and_argument_errors_answer_without_importing_torch(argv):
    """The command line imports only the sub-command it runs, and checks arguments before
    anything heavy (issue 9): no torch for help text or a usage error."""
    import subprocess
    import sys

    code = ("import sys\nfrom fieldlib.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "False"
