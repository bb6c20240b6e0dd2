"""Every bad input of docs/errors.md: a one-line error, a non-zero exit, no traceback, nothing written."""

import re

import pytest
from error_cases import CASES, cleanup_outputs, make_fixtures, run_case


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
    import time

    from tiny import save_tiny

    slow = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=4)  # a few seconds per thousand tokens: still calibrating at the signal
    save_tiny(tmp_path / "m", **slow)
    (tmp_path / "big.txt").write_text("\n\n".join(f"a long document {i} " * 40 for i in range(300)))
    out = tmp_path / "out"
    out.mkdir()
    # A background job of a non-interactive shell (CI under nohup, `make test &`) inherits SIGINT ignored,
    # and Python then installs no KeyboardInterrupt handler: restore the handler a terminal's process has.
    child = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "from glu_prune_cli.main import main; sys.exit(main(sys.argv[1:]))")
    command = [sys.executable, "-c", child,
               "calibrate", "--model", str(tmp_path / "m"), "--corpus", str(tmp_path / "big.txt"), "--part", "all",
               "--max-tokens", "5000000", "--seq-len", "128", "--out", str(out / "s.safetensors")]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    err = bytearray()
    def read() -> None:
        for chunk in iter(lambda: proc.stderr.read(1), b""):
            err.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.time() + 120
    while b"calibrate:" not in err and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert b"calibrate:" in err, err.decode()[-500:]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    reader.join(timeout=10)
    lines = [line for line in err.decode().replace("\r", "\n").splitlines() if line.startswith("glu-prune")]
    assert lines == ["glu-prune: interrupted; nothing partial was written"]
    assert "Traceback" not in err.decode()
    assert list(out.iterdir()) == []
