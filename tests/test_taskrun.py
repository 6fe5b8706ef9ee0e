"""``tests/taskrun.py`` against what it stands in for: the same command as a new process."""

import os
import subprocess
import sys

import pytest

from tests.taskrun import run_task

SCRIPT = '''
import os, sys
print("cwd", os.getcwd(), "env", os.environ.get("TASKRUN_CHECK"), "argv", sys.argv[1:])
print("to stderr", file=sys.stderr)
if sys.argv[1:] == ["raise"]:
    raise RuntimeError("boom")
if sys.argv[1:] == ["exit"]:
    sys.exit(2)
if sys.argv[1:] == ["message"]:
    sys.exit("error: one line")
'''


@pytest.mark.parametrize("args", [[], ["raise"], ["exit"], ["message"]])
def test_a_forked_run_gives_what_a_new_process_gives(tmp_path, args):
    (tmp_path / "probe_module.py").write_text(SCRIPT)
    env = dict(os.environ, TASKRUN_CHECK="yes")
    new = subprocess.run([sys.executable, "-m", "probe_module", *args], cwd=tmp_path,
                         capture_output=True, text=True, env=env, timeout=60)
    forked = run_task("probe_module", args, env=env, cwd=tmp_path, timeout=60)
    assert forked.returncode == new.returncode
    assert forked.stdout == new.stdout
    if args == ["raise"]:  # the same traceback's last line; the frames above it differ
        assert "Traceback" in forked.stderr and "Traceback" in new.stderr
        assert forked.stderr.splitlines()[-1] == new.stderr.splitlines()[-1]
    else:
        assert forked.stderr == new.stderr


def test_a_forked_run_past_its_time_is_stopped(tmp_path):
    (tmp_path / "sleeper.py").write_text("import time\ntime.sleep(60)\n")
    with pytest.raises(subprocess.TimeoutExpired):
        run_task("sleeper", [], cwd=tmp_path, timeout=2)
