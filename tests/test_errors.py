"""Every bad input of docs/errors.md: a one-line error, a non-zero exit, no traceback, nothing written,
and the row docs/errors.md shows for it."""

import re

import pytest
from error_cases import CASES, ERRORS_MD, cleanup_outputs, documented_rows, make_fixtures, run_case, table_row

DOCUMENTED = documented_rows(ERRORS_MD.read_text())


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-inputs")
    make_fixtures(d)
    return d


@pytest.mark.parametrize("what,args", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_error(fixtures, what, args):
    before = sorted(p.name for p in fixtures.iterdir())
    code, err = run_case(args, fixtures)
    assert code != 0
    progress = ("usage:", "note:", "calibrate:", "second moment:")  # what came before the failure
    lines = [line for line in err.replace("\r", "\n").splitlines() if line and not line.startswith(progress)]
    assert len(lines) == 1, err
    assert "Traceback" not in err and re.match(r"glu-prune( \w+)?: error: ", lines[0]), lines[0]
    after = sorted(p.name for p in fixtures.iterdir())
    cleanup_outputs(fixtures)
    assert after == before, "a failed command left files behind"
    row = table_row(what, args, code, err)
    assert row == DOCUMENTED.get(what), (f"docs/errors.md shows another answer (regenerate it with "
                                         f"scripts/error_table.py if the change is meant)\n  ran:  {row}\n"
                                         f"  docs: {DOCUMENTED.get(what)}")


def test_docs_list_exactly_the_cases():
    names = [what for what, _ in CASES]
    assert len(set(names)) == len(names), "two cases share a name"
    assert list(DOCUMENTED) == names, "docs/errors.md is stale: python scripts/error_table.py > docs/errors.md"


def test_debug_shows_the_traceback(fixtures):
    from calibrate.errors import GluPruneError
    from glu_prune_cli.main import main

    with pytest.raises(GluPruneError):
        main(["--debug", "eval", "--model", str(fixtures / "missing"), "--corpus", str(fixtures / "c.txt")])


def test_ctrl_c_delivered_to_the_cli_process(tmp_path):
    """SIGINT while calibrating: exit 130, one line, no statistics file, no temporary file."""
    import signal
    import subprocess
    import sys
    import threading

    from tiny import save_tiny

    save_tiny(tmp_path / "m")
    (tmp_path / "big.txt").write_text("\n\n".join(f"a long document {i} " * 40 for i in range(300)))
    out = tmp_path / "out"
    out.mkdir()
    # A background job of a non-interactive shell (CI under nohup, `make test &`) inherits SIGINT ignored,
    # and Python then installs no KeyboardInterrupt handler: restore the handler a terminal's process has.
    # The first forward pass of the calibration says so on stderr and then waits for the signal, so that
    # the signal arrives mid-calibration however fast the machine is.
    child = ("import signal, sys, time, torch\n"
             "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
             "def started(module, args, output):\n"
             "    sys.stderr.write('test: calibrating\\n'); sys.stderr.flush()\n"
             "    time.sleep(600)\n"
             "torch.nn.modules.module.register_module_forward_hook(started)\n"
             "from glu_prune_cli.main import main; sys.exit(main(sys.argv[1:]))")
    command = [sys.executable, "-c", child,
               "calibrate", "--model", str(tmp_path / "m"), "--corpus", str(tmp_path / "big.txt"), "--part", "all",
               "--seq-len", "128", "--out", str(out / "s.safetensors")]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    err, calibrating = bytearray(), threading.Event()

    def read() -> None:
        for line in iter(proc.stderr.readline, b""):
            err.extend(line)
            if b"test: calibrating" in line:
                calibrating.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert calibrating.wait(timeout=300), err.decode()[-500:]  # a safety net: the event comes in seconds
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
    reader.join(timeout=10)
    lines = [line for line in err.decode().replace("\r", "\n").splitlines() if line.startswith("glu-prune")]
    assert lines == ["glu-prune: interrupted; nothing partial was written"]
    assert "Traceback" not in err.decode()
    assert list(out.iterdir()) == []
